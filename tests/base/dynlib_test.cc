#include "base/dynlib.h"

#include <dlfcn.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>

#include "tests/testutil/testutil.h"

namespace ztier {
namespace {

using ::testing::HasSubstr;

// libm is in every C++ test process (libstdc++ needs it); libz is on every
// Debian system but nothing here links it.
constexpr const char* kLoaded = "libm.so.6";
constexpr const char* kOnDiskOnly = "libz.so.1";
constexpr const char* kEnv = "ZTIER_DYNLIB_TEST_LIBRARY";

SharedLibrarySearch Search(std::vector<std::string> sonames) {
  SharedLibrarySearch s;
  s.what = "the test library";
  s.env_var = kEnv;
  s.sonames = std::move(sonames);
  s.fix = "install it";
  return s;
}

TEST(DynlibTest, NamesEveryCandidateAndTheFixWhenNoneLoads) {
  testing::ScopedEnv env(kEnv, nullptr);
  auto lib = OpenSharedLibrary(Search({"libztier_absent_a.so.1", "libztier_absent_b.so"}));
  ASSERT_FALSE(lib.ok());
  EXPECT_EQ(lib.status().code(), StatusCode::kUnavailable);
  const std::string msg(lib.status().message());
  EXPECT_THAT(msg, HasSubstr("the test library cannot be loaded"));
  EXPECT_THAT(msg, HasSubstr("libztier_absent_a.so.1 (libztier_absent_a.so.1: cannot open"));
  EXPECT_THAT(msg, HasSubstr("libztier_absent_b.so ("));
  EXPECT_THAT(msg, HasSubstr("fix: install it"));
}

// A copy already in the process wins over an earlier candidate that would
// have to be loaded from disk.
TEST(DynlibTest, PrefersALibraryAlreadyLoaded) {
  testing::ScopedEnv env(kEnv, nullptr);
  void* on_disk = dlopen(kOnDiskOnly, RTLD_NOW | RTLD_NOLOAD);
  if (on_disk != nullptr) {
    dlclose(on_disk);
    GTEST_SKIP() << kOnDiskOnly << " is already loaded here";
  }
  auto lib = OpenSharedLibrary(Search({kOnDiskOnly, kLoaded}));
  ASSERT_TRUE(lib.ok()) << lib.status().ToString();
  EXPECT_EQ(lib->name, kLoaded);
  EXPECT_TRUE(lib->was_loaded);
  void* mine = dlopen(kLoaded, RTLD_NOW | RTLD_NOLOAD);
  ASSERT_NE(mine, nullptr);
  EXPECT_EQ(lib->handle, mine);
  dlclose(mine);
  EXPECT_EQ(dlopen(kOnDiskOnly, RTLD_NOW | RTLD_NOLOAD), nullptr) << "loaded for nothing";
}

TEST(DynlibTest, LoadsFromDiskWhenNothingIsLoaded) {
  testing::ScopedEnv env(kEnv, nullptr);
  auto lib = OpenSharedLibrary(Search({"libztier_absent.so", kOnDiskOnly}));
  ASSERT_TRUE(lib.ok()) << lib.status().ToString();
  EXPECT_EQ(lib->name, kOnDiskOnly);
  auto fn = FindSymbol(*lib, "zlibVersion");
  ASSERT_TRUE(fn.ok()) << fn.status().ToString();
  EXPECT_NE(*fn, nullptr);
}

// The override is the only candidate: no fallback to a library it did not
// name, even one already loaded.
TEST(DynlibTest, OverrideIsTheOnlyCandidate) {
  testing::ScopedEnv env(kEnv, "/nonexistent/libztier_override.so");
  auto lib = OpenSharedLibrary(Search({kLoaded}));
  ASSERT_FALSE(lib.ok());
  EXPECT_EQ(lib.status().code(), StatusCode::kUnavailable);
  const std::string msg(lib.status().message());
  EXPECT_THAT(msg, HasSubstr(std::string("from ") + kEnv + "=/nonexistent/libztier_override.so"));
  EXPECT_THAT(msg, HasSubstr("No such file or directory"));
  EXPECT_THAT(msg, ::testing::Not(HasSubstr(kLoaded)));
}

TEST(DynlibTest, OverrideLoadsThatPath) {
  // Whatever path the loader has for libz, through its own answer.
  testing::ScopedEnv none(kEnv, nullptr);
  auto found = OpenSharedLibrary(Search({kOnDiskOnly}));
  ASSERT_TRUE(found.ok()) << found.status().ToString();
  auto fn = FindSymbol(*found, "zlibVersion");
  ASSERT_TRUE(fn.ok());
  Dl_info info{};
  ASSERT_NE(dladdr(*fn, &info), 0);
  testing::ScopedEnv env(kEnv, info.dli_fname);
  auto lib = OpenSharedLibrary(Search({"libztier_absent.so"}));
  ASSERT_TRUE(lib.ok()) << lib.status().ToString();
  EXPECT_EQ(lib->name, info.dli_fname);
  EXPECT_EQ(lib->handle, found->handle);
}

// A candidate `accept` refuses is skipped, and its reason reported.
TEST(DynlibTest, RefusedCandidatesAreSkippedWithTheirReason) {
  testing::ScopedEnv env(kEnv, nullptr);
  SharedLibrarySearch s = Search({kLoaded, kOnDiskOnly});
  s.accept = [](const SharedLibrary& lib) {
    return lib.name == kLoaded ? Status::Unavailable("wrong version 1.0") : Status::Ok();
  };
  auto lib = OpenSharedLibrary(s);
  ASSERT_TRUE(lib.ok()) << lib.status().ToString();
  EXPECT_EQ(lib->name, kOnDiskOnly);

  s.accept = [](const SharedLibrary&) { return Status::Unavailable("wrong version 1.0"); };
  auto none = OpenSharedLibrary(s);
  ASSERT_FALSE(none.ok());
  EXPECT_THAT(std::string(none.status().message()),
              HasSubstr(std::string(kLoaded) + " (wrong version 1.0)"));
}

TEST(DynlibTest, MissingSymbolNamesLibraryAndSymbol) {
  testing::ScopedEnv env(kEnv, nullptr);
  auto lib = OpenSharedLibrary(Search({kLoaded}));
  ASSERT_TRUE(lib.ok());
  EXPECT_TRUE(FindSymbol(*lib, "cos").ok());
  auto missing = FindSymbol(*lib, "ztier_no_such_function");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), StatusCode::kUnavailable);
  EXPECT_THAT(std::string(missing.status().message()),
              HasSubstr("libm.so.6 has no symbol ztier_no_such_function"));
}

}  // namespace
}  // namespace ztier
