// The CUDA runtime's loader (tiering/cudart.h), on the runtime installed
// here; where ztier is built without CUDA there is nothing to load.
//
// The first two tests look at what the process has loaded, so they come
// first: under ctest each test is a fresh process, and in one run of the
// whole binary nothing before them has loaded the runtime.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#if defined(ZTIER_HAVE_CUDA)
#include <dlfcn.h>

#include <cmath>
#include <string>
#include <thread>
#include <vector>

#include "tests/testutil/testutil.h"
#include "tiering/cudart.h"
#include "tiering/device.h"

namespace ztier::tiering {
namespace {

using ::testing::HasSubstr;
constexpr const char* kEnv = "ZTIER_CUDART_LIBRARY";

std::string Soname() { return "libcudart.so." + std::to_string(CUDART_VERSION / 1000); }

bool RuntimeLoaded() {
  void* h = dlopen(Soname().c_str(), RTLD_NOW | RTLD_NOLOAD);
  if (h != nullptr) dlclose(h);
  return h != nullptr;
}

TEST(CudartTest, HostEmulationDoesNotLoadTheRuntime) {
  if (RuntimeLoaded()) GTEST_SKIP() << "the runtime was loaded before this test";
  auto dev = CreateHostDeviceBackend();
  ASSERT_TRUE(dev.ok());
  auto s = (*dev)->CreateStream();
  ASSERT_TRUE(s.ok());
  auto p = (*dev)->Alloc(4096, *s);
  ASSERT_TRUE(p.ok());
  ASSERT_TRUE((*dev)->Free(*p, *s).ok());
  ASSERT_TRUE((*dev)->DestroyStream(*s).ok());
  EXPECT_FALSE(RuntimeLoaded());
}

// A framework (PyTorch) loaded the runtime first: ztier uses that copy.
TEST(CudartTest, UsesTheCopyAlreadyLoaded) {
  testing::ScopedEnv env(kEnv, nullptr);
  const bool before = RuntimeLoaded();
  void* mine = dlopen(Soname().c_str(), RTLD_NOW | RTLD_LOCAL);
  ASSERT_NE(mine, nullptr) << dlerror();
  auto rt = LoadCudaRuntime();
  ASSERT_TRUE(rt.ok()) << rt.status().ToString();
  EXPECT_EQ((*rt)->library.handle, mine);
  EXPECT_TRUE((*rt)->library.was_loaded) << "loaded, not found loaded"
                                         << (before ? " (was loaded before the test)" : "");
  EXPECT_EQ(reinterpret_cast<void*>((*rt)->cudaGetDeviceCount), dlsym(mine, "cudaGetDeviceCount"));
  EXPECT_EQ(reinterpret_cast<void*>((*rt)->cudaMemcpyAsync), dlsym(mine, "cudaMemcpyAsync"));
  // The process-wide table is the same library too.
  auto shared = CudaRuntime();
  ASSERT_TRUE(shared.ok());
  EXPECT_EQ((*shared)->library.handle, mine);
}

TEST(CudartTest, MissingOverrideNamesItAndTheFix) {
  testing::ScopedEnv env(kEnv, "/nonexistent/cuda/libcudart.so.13");
  auto rt = LoadCudaRuntime();
  ASSERT_FALSE(rt.ok());
  EXPECT_EQ(rt.status().code(), StatusCode::kUnavailable);
  const std::string msg(rt.status().message());
  EXPECT_THAT(msg, HasSubstr("ZTIER_CUDART_LIBRARY=/nonexistent/cuda/libcudart.so.13"));
  EXPECT_THAT(msg, HasSubstr("No such file or directory"));
  EXPECT_THAT(msg, HasSubstr("fix: install the CUDA"));
}

// A library that is not the runtime (here libm) is refused by name.
TEST(CudartTest, OverrideThatIsNotTheRuntimeIsRefused) {
  Dl_info info{};
  ASSERT_NE(dladdr(reinterpret_cast<void*>(static_cast<double (*)(double)>(&::cos)), &info), 0);
  testing::ScopedEnv env(kEnv, info.dli_fname);
  auto rt = LoadCudaRuntime();
  ASSERT_FALSE(rt.ok());
  EXPECT_EQ(rt.status().code(), StatusCode::kUnavailable);
  EXPECT_THAT(std::string(rt.status().message()), HasSubstr("has no symbol cudaRuntimeGetVersion"));
}

TEST(CudartTest, ResolvesEveryFunction) {
  testing::ScopedEnv env(kEnv, nullptr);
  auto rt = LoadCudaRuntime();
  ASSERT_TRUE(rt.ok()) << rt.status().ToString();
  EXPECT_EQ((*rt)->library.name, Soname());
  EXPECT_EQ((*rt)->version / 1000, CUDART_VERSION / 1000);
#define ZTIER_EXPECT_RESOLVED(fn) EXPECT_NE((*rt)->fn, nullptr) << #fn;
  ZTIER_CUDART_FUNCTIONS(ZTIER_EXPECT_RESOLVED)
#undef ZTIER_EXPECT_RESOLVED
  int version = 0;
  ASSERT_EQ((*rt)->cudaRuntimeGetVersion(&version), cudaSuccess);
  EXPECT_EQ(version, (*rt)->version);
}

// Without a usable GPU (this machine: a runtime but no driver), the
// device count's error is the reason given, as before the runtime was loaded
// at run time; with one, the backend starts.
TEST(CudartTest, DeviceCountDecidesAvailability) {
  testing::ScopedEnv env(kEnv, nullptr);
  auto rt = CudaRuntime();
  ASSERT_TRUE(rt.ok()) << rt.status().ToString();
  int count = 0;
  const cudaError_t err = (*rt)->cudaGetDeviceCount(&count);
  std::string why;
  const bool available = CudaDeviceAvailable(&why);
  if (err != cudaSuccess || count == 0) {
    EXPECT_FALSE(available);
    if (err != cudaSuccess) {
      EXPECT_THAT(why, HasSubstr("cudaGetDeviceCount"));
      EXPECT_THAT(why, HasSubstr((*rt)->cudaGetErrorName(err)));
    }
    auto b = CreateCudaDeviceBackend(0);
    ASSERT_FALSE(b.ok());
    EXPECT_EQ(b.status().code(), StatusCode::kUnavailable) << b.status().ToString();
  } else {
    EXPECT_TRUE(available) << why;
    EXPECT_TRUE(CreateCudaDeviceBackend(0).ok());
  }
}

TEST(CudartTest, ProcessTableIsLoadedOnceForAllThreads) {
  std::vector<const CudaRuntimeApi*> seen(8, nullptr);
  std::vector<std::thread> threads;
  for (size_t i = 0; i < seen.size(); ++i) {
    threads.emplace_back([&seen, i] {
      auto rt = CudaRuntime();
      if (rt.ok()) seen[i] = *rt;
    });
  }
  for (auto& t : threads) t.join();
  for (const CudaRuntimeApi* p : seen) {
    ASSERT_NE(p, nullptr);
    EXPECT_EQ(p, seen[0]);
  }
}

}  // namespace
}  // namespace ztier::tiering
#else
TEST(CudartTest, BuiltWithoutCuda) { GTEST_SKIP() << "built without the CUDA toolkit"; }
#endif
