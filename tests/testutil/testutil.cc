#include "tests/testutil/testutil.h"

#include <stdlib.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <new>
#include <string>

namespace ztier::testing {
namespace fs = std::filesystem;

ScratchDir::ScratchDir() {
  const char* root = getenv("ZTIER_TEST_TMPDIR");
  fs::path base = root && *root ? fs::path(root) : fs::current_path() / "test_tmp";
  fs::create_directories(base);
  static std::atomic<int> counter{0};
  for (;;) {
    fs::path p = base / ("t" + std::to_string(getpid()) + "_" +
                         std::to_string(counter.fetch_add(1)));
    std::error_code ec;
    if (fs::create_directory(p, ec)) {
      path_ = p.string();
      return;
    }
  }
}

ScratchDir::~ScratchDir() {
  std::error_code ec;
  fs::remove_all(path_, ec);
}

ScopedEnv::ScopedEnv(const char* name, const char* value) : name_(name) {
  if (const char* old = getenv(name)) old_ = old;
  if (value != nullptr) {
    setenv(name, value, 1);
  } else {
    unsetenv(name);
  }
}

ScopedEnv::~ScopedEnv() {
  if (old_) {
    setenv(name_.c_str(), old_->c_str(), 1);
  } else {
    unsetenv(name_.c_str());
  }
}

void FreeDeleter::operator()(void* p) const { free(p); }

AlignedBuffer MakeAligned(size_t bytes, size_t alignment) {
  void* p = nullptr;
  if (posix_memalign(&p, alignment, bytes == 0 ? alignment : bytes) != 0) {
    throw std::bad_alloc();
  }
  memset(p, 0, bytes);
  return AlignedBuffer(static_cast<uint8_t*>(p));
}

namespace {
// splitmix64: a cheap, well-mixed function of (seed, word index).
inline uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}
inline uint8_t PatternByte(uint64_t seed, uint64_t pos) {
  return static_cast<uint8_t>(Mix(seed * 0x100000001b3ULL + (pos >> 3)) >> ((pos & 7) * 8));
}
}  // namespace

void FillPattern(uint8_t* data, size_t bytes, uint64_t seed, uint64_t position) {
  size_t i = 0;
  // Whole 8-byte words at once for speed (multi-GiB tests).
  while (i < bytes && ((position + i) & 7) != 0) {
    data[i] = PatternByte(seed, position + i);
    ++i;
  }
  for (; i + 8 <= bytes; i += 8) {
    uint64_t w = Mix(seed * 0x100000001b3ULL + ((position + i) >> 3));
    memcpy(data + i, &w, 8);
  }
  for (; i < bytes; ++i) data[i] = PatternByte(seed, position + i);
}

int64_t FirstMismatch(const uint8_t* data, size_t bytes, uint64_t seed,
                      uint64_t position) {
  size_t i = 0;
  while (i < bytes && ((position + i) & 7) != 0) {
    if (data[i] != PatternByte(seed, position + i)) return static_cast<int64_t>(i);
    ++i;
  }
  for (; i + 8 <= bytes; i += 8) {
    uint64_t w = Mix(seed * 0x100000001b3ULL + ((position + i) >> 3));
    if (memcmp(data + i, &w, 8) != 0) {
      for (size_t j = i; j < i + 8; ++j) {
        if (data[j] != PatternByte(seed, position + j)) return static_cast<int64_t>(j);
      }
    }
  }
  for (; i < bytes; ++i) {
    if (data[i] != PatternByte(seed, position + i)) return static_cast<int64_t>(i);
  }
  return -1;
}

}  // namespace ztier::testing
