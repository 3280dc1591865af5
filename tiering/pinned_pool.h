// PinnedPool: the host swap buffers through which every NVMe read and write
// passes. `buffer_count` buffers of `buffer_bytes` (rounded up to the I/O
// alignment) live in one contiguous, aligned allocation that is pinned once:
// with cudaHostRegister when a DeviceBackend that pins is given (the CUDA
// runtime with a device), else with mlock. Pinned pages let the host-to-device
// copy run as DMA and let io_uring use the region as fixed buffers (register
// IoRegions() with io::Engine::RegisterBuffers once, after Create).
//
// Buffers are handed out as spans of `count` adjacent buffers (a partition
// larger than one buffer gets contiguous memory). Acquiring never blocks:
// TryAcquire returns nothing when no run of free buffers is long enough, and
// a request that could never be met (count > buffer_count) is an error that
// names the pool's shape and the size asked for; callers that want to wait do
// so explicitly, with a deadline (WaitForFree, AcquireUntil). Nothing is ever
// allocated or pinned beyond buffer_count x buffer_bytes.
//
// When mlock is refused (RLIMIT_MEMLOCK), Create reports the limit, the bytes
// needed and the fixes; it goes on unpinned (and logs the same text as a
// warning) only if allow_unpinned is set.
//
// Ownership: the pool owns the memory; a BufferSpan is a lease that must be
// given back with Release() before the pool is destroyed. The DeviceBackend
// passed to Create must outlive the pool (it unregisters in the destructor).
// Thread-safety: all methods are safe to call concurrently (one mutex and a
// condition variable); the memory inside a span belongs to its holder.
#pragma once

#include <sys/uio.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"

namespace ztier::tiering {

class DeviceBackend;

enum class PinMode : uint8_t {
  kAuto = 0,  // cudaHostRegister if the device backend pins, else mlock
  kMlock,     // mlock
  kCuda,      // cudaHostRegister; an error if the backend cannot pin
  kNone,      // pageable memory (slower copies; for tests and small hosts)
};

std::string_view PinModeName(PinMode mode);
// Parses "auto", "mlock", "cuda", "none".
Result<PinMode> ParsePinMode(std::string_view name);

struct PoolOptions {
  uint32_t buffer_count = 0;
  uint64_t buffer_bytes = 0;  // bytes per buffer, rounded up to `alignment`
  uint32_t alignment = 4096;  // bytes; a power of two (direct-I/O alignment)
  PinMode pin = PinMode::kAuto;
  // Keep going with pageable memory when pinning is refused (logged).
  bool allow_unpinned = false;
};

// A lease on `count` adjacent buffers starting at buffer `first`.
struct BufferSpan {
  uint8_t* data = nullptr;  // start of buffer `first`
  uint64_t bytes = 0;       // count x buffer_bytes
  uint32_t first = 0;       // index of the first buffer
  uint32_t count = 0;       // buffers
  uint64_t lease = 0;  // identifies this acquisition (catches stale Release)
};

struct PoolStats {
  uint64_t bytes_allocated = 0;  // buffer_count x buffer_bytes
  uint64_t bytes_pinned = 0;     // bytes_allocated, or 0 when unpinned
  uint32_t buffers_free = 0;
  uint32_t buffers_in_use = 0;
  uint32_t high_water_buffers = 0;  // most buffers in use at once
  uint64_t acquires = 0;            // spans handed out
  uint64_t acquire_misses = 0;      // TryAcquire calls that found no room
  std::string pin_method;           // "cuda", "mlock", "none", or "none (...)"
};

class PinnedPool {
 public:
  // io_uring refuses a fixed buffer larger than 1 GiB.
  static constexpr uint64_t kMaxIoRegionBytes = uint64_t{1} << 30;

  // Allocates and pins. `device` may be null (then kAuto means mlock, kCuda
  // is an error); it must outlive the pool.
  static Result<std::unique_ptr<PinnedPool>> Create(
      const PoolOptions& options, DeviceBackend* device = nullptr);
  ~PinnedPool();  // unpins and frees; logs an error if spans are still leased
  PinnedPool(const PinnedPool&) = delete;
  PinnedPool& operator=(const PinnedPool&) = delete;

  // `count` adjacent free buffers, or nullopt when no such run is free now.
  // Errors: count == 0, or count > buffer_count (could never succeed).
  Result<std::optional<BufferSpan>> TryAcquire(uint32_t count);
  // As TryAcquire, but waits up to `deadline` for a run to free up; nullopt
  // on timeout.
  Result<std::optional<BufferSpan>> AcquireUntil(
      uint32_t count, std::chrono::steady_clock::time_point deadline);
  // Waits until `count` adjacent buffers are free (true) or `deadline`
  // passes (false). Returns false at once if count is 0 or > buffer_count.
  // Another thread may take the buffers before the caller does.
  bool WaitForFree(uint32_t count,
                   std::chrono::steady_clock::time_point deadline);

  // Gives a span back. Releasing a span twice, a stale copy of a span, or a
  // span of another pool is an error and changes nothing.
  Status Release(const BufferSpan& span);

  // The bytes a span of `count` buffers covers, and how many buffers `bytes`
  // needs (rounded up).
  uint64_t SpanBytes(uint32_t count) const { return count * buffer_bytes_; }
  uint32_t BuffersFor(uint64_t bytes) const;

  uint8_t* buffer(uint32_t index) const {
    return base_ + index * buffer_bytes_;
  }
  uint32_t buffer_count() const { return buffer_count_; }
  uint64_t buffer_bytes() const { return buffer_bytes_; }  // after rounding
  uint32_t alignment() const { return alignment_; }

  // The whole pool as one region (for io::Engine::RegisterBuffers).
  iovec region() const { return iovec{base_, total_bytes_}; }
  // The region cut at buffer boundaries into pieces of at most `max_bytes`
  // (a single buffer larger than that is cut at max_bytes steps), for
  // io_uring's per-buffer limit.
  std::vector<iovec> IoRegions(uint64_t max_bytes = kMaxIoRegionBytes) const;

  PoolStats stats() const;

 private:
  PinnedPool(const PoolOptions& options, uint64_t buffer_bytes, uint8_t* base,
             uint64_t total_bytes, void* mapping, uint64_t mapping_bytes,
             DeviceBackend* device);
  Status Pin(const PoolOptions& options);
  Status PinWithMlock();
  // First run of `count` free buffers, or buffer_count_ if none. Needs mu_.
  uint32_t FindRun(uint32_t count) const;
  BufferSpan TakeRun(uint32_t first, uint32_t count);  // needs mu_
  Status CheckCount(uint32_t count) const;

  const uint32_t buffer_count_;
  const uint64_t buffer_bytes_;  // bytes, multiple of alignment_
  const uint32_t alignment_;
  uint8_t* const base_;         // aligned start of buffer 0
  const uint64_t total_bytes_;  // buffer_count_ x buffer_bytes_
  void* const mapping_;         // what mmap returned (munmap'd in ~)
  const uint64_t mapping_bytes_;
  DeviceBackend* const device_;
  enum class Pinned : uint8_t { kNo, kMlock, kCuda };
  Pinned pinned_ = Pinned::kNo;
  std::string pin_method_;

  mutable std::mutex mu_;
  std::condition_variable freed_cv_;
  // lease_[i] != 0: buffer i starts a leased run of run_[i] buffers.
  std::vector<uint64_t> lease_;
  std::vector<uint32_t> run_;
  std::vector<bool> in_use_;
  uint64_t next_lease_ = 1;
  uint32_t in_use_count_ = 0;
  uint32_t high_water_ = 0;
  uint64_t acquires_ = 0;
  uint64_t misses_ = 0;
};

}  // namespace ztier::tiering
