// Test helpers shared by the suites: scratch directories on a real disk
// (direct I/O needs one: /tmp may be tmpfs), aligned buffers, patterns.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

namespace ztier::testing {

// A fresh directory under $ZTIER_TEST_TMPDIR (set by ctest to build/test_tmp)
// or ./test_tmp, removed with its contents on destruction.
class ScratchDir {
 public:
  ScratchDir();
  ~ScratchDir();
  const std::string& path() const { return path_; }
  std::string File(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Sets (or, with nullptr, unsets) an environment variable for its lifetime,
// then restores what was there.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value);
  ~ScopedEnv();
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  std::string name_;
  std::optional<std::string> old_;
};

struct FreeDeleter {
  void operator()(void* p) const;
};
using AlignedBuffer = std::unique_ptr<uint8_t[], FreeDeleter>;

// `bytes` bytes aligned to `alignment` (default 4096), zero-filled.
AlignedBuffer MakeAligned(size_t bytes, size_t alignment = 4096);

// Fills with a pattern that depends on (seed, absolute byte position), so any
// misplaced block shows up when compared.
void FillPattern(uint8_t* data, size_t bytes, uint64_t seed, uint64_t position = 0);
// Index of the first byte that differs from the pattern, or -1.
int64_t FirstMismatch(const uint8_t* data, size_t bytes, uint64_t seed,
                      uint64_t position = 0);

}  // namespace ztier::testing
