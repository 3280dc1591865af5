// NCCL's loader (coordinator/nccl_api.h), on the NCCL installed here; where
// ztier is built without NCCL there is nothing to load. None of this needs a
// GPU: symbols and the version come from the library alone.
//
// The first test looks at what the process has loaded, so it comes first:
// under ctest each test is a fresh process, and in one run of the whole
// binary nothing before it has loaded NCCL.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#if defined(ZTIER_HAVE_NCCL)
#include <dlfcn.h>

#include <string>

#include "coordinator/collective.h"
#include "coordinator/nccl_api.h"
#include "tiering/device.h"
#include "tests/testutil/testutil.h"

namespace ztier::coordinator {
namespace {

using ::testing::HasSubstr;
constexpr const char* kEnv = "ZTIER_NCCL_LIBRARY";
const std::string kSoname = "libnccl.so." + std::to_string(NCCL_MAJOR);

// The framework's NCCL is the one ztier must use: a communicator it created
// can only be driven by the same copy.
TEST(NcclApiTest, UsesTheCopyAlreadyLoaded) {
  testing::ScopedEnv env(kEnv, nullptr);
  void* mine = dlopen(kSoname.c_str(), RTLD_NOW | RTLD_LOCAL);
  ASSERT_NE(mine, nullptr) << dlerror();
  auto nccl = LoadNccl();
  ASSERT_TRUE(nccl.ok()) << nccl.status().ToString();
  EXPECT_EQ((*nccl)->library.handle, mine);
  EXPECT_TRUE((*nccl)->library.was_loaded);
  EXPECT_EQ(reinterpret_cast<void*>((*nccl)->ncclAllGather), dlsym(mine, "ncclAllGather"));
  EXPECT_EQ(reinterpret_cast<void*>((*nccl)->ncclCommInitRank), dlsym(mine, "ncclCommInitRank"));
  auto shared = Nccl();
  ASSERT_TRUE(shared.ok());
  EXPECT_EQ((*shared)->library.handle, mine);
}

TEST(NcclApiTest, MissingOverrideNamesItAndTheFix) {
  testing::ScopedEnv env(kEnv, "/nonexistent/nccl/libnccl.so.2");
  auto nccl = LoadNccl();
  ASSERT_FALSE(nccl.ok());
  EXPECT_EQ(nccl.status().code(), StatusCode::kUnavailable);
  const std::string msg(nccl.status().message());
  EXPECT_THAT(msg, HasSubstr("ZTIER_NCCL_LIBRARY=/nonexistent/nccl/libnccl.so.2"));
  EXPECT_THAT(msg, HasSubstr("No such file or directory"));
  EXPECT_THAT(msg, HasSubstr("fix: install NCCL"));
}

TEST(NcclApiTest, ResolvesEveryFunctionAndReportsVersion2) {
  testing::ScopedEnv env(kEnv, nullptr);
  auto nccl = LoadNccl();
  ASSERT_TRUE(nccl.ok()) << nccl.status().ToString();
  EXPECT_EQ((*nccl)->library.name, kSoname);
#define ZTIER_EXPECT_RESOLVED(fn) EXPECT_NE((*nccl)->fn, nullptr) << #fn;
  ZTIER_NCCL_FUNCTIONS(ZTIER_EXPECT_RESOLVED)
#undef ZTIER_EXPECT_RESOLVED
  int version = 0;
  ASSERT_EQ((*nccl)->ncclGetVersion(&version), ncclSuccess);
  EXPECT_EQ(version, (*nccl)->version);
  EXPECT_EQ(version / 10000, 2) << version;
  EXPECT_GE(version % 10000 / 100, 14) << "ncclCommFinalize needs 2.14";
  EXPECT_NE((*nccl)->ncclGetErrorString(ncclInvalidArgument), nullptr);
}

// With NCCL loadable, availability is the device's: without a GPU the
// runtime's reason, as before NCCL was loaded at run time.
TEST(NcclApiTest, AvailabilityFollowsTheDevice) {
  testing::ScopedEnv env(kEnv, nullptr);
  ASSERT_TRUE(Nccl().ok()) << Nccl().status().ToString();
  std::string cuda_why;
  std::string why;
  const bool cuda = tiering::CudaDeviceAvailable(&cuda_why);
  EXPECT_EQ(NcclAvailable(&why), cuda);
  if (!cuda) {
    EXPECT_EQ(why, cuda_why);
  }
}

// A communicator from a framework whose NCCL ztier cannot see (linked
// statically, another name) must not be handed to a second copy. In a fresh
// process (ctest runs each test alone) nothing loaded NCCL before ztier did.
TEST(NcclApiTest, ForeignCommunicatorNeedsTheNcclThatMadeIt) {
  testing::ScopedEnv env(kEnv, nullptr);
  auto nccl = Nccl();
  ASSERT_TRUE(nccl.ok()) << nccl.status().ToString();
  int dummy = 0;  // never dereferenced: refused before any NCCL call
  auto wrapped = WrapNcclCommunicator(&dummy, nullptr);
  ASSERT_FALSE(wrapped.ok());
  if ((*nccl)->library.was_loaded) {
    GTEST_SKIP() << "NCCL was loaded before ztier's first use in this process (the whole binary "
                    "in one run): the refusal needs a fresh process";
  }
  EXPECT_EQ(wrapped.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(wrapped.status().message()), HasSubstr("ZTIER_NCCL_LIBRARY"));
}

}  // namespace
}  // namespace ztier::coordinator
#else
TEST(NcclApiTest, BuiltWithoutNccl) { GTEST_SKIP() << "built without NCCL"; }
#endif
