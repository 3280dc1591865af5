#include "tiering/pinned_pool.h"

#include <fmt/format.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <fstream>
#include <string>
#include <utility>

#include "base/log.h"
#include "tiering/device.h"

namespace ztier::tiering {
namespace {

std::string LimitText(rlim_t v) {
  return v == RLIM_INFINITY ? std::string("unlimited")
                            : fmt::format("{} bytes", v);
}

// Bytes this process already holds locked (VmLck in /proc/self/status, which
// counts toward RLIMIT_MEMLOCK), or -1 if unknown.
int64_t LockedBytes() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmLck:", 0) == 0) {
      try {
        return std::stoll(line.substr(6)) * 1024;  // the file says kB
      } catch (...) {
        return -1;
      }
    }
  }
  return -1;
}

uint64_t RoundUp(uint64_t v, uint64_t to) { return (v + to - 1) / to * to; }

// mlock/munlock through the raw system call: the sanitizer runtimes replace
// the libc functions with no-ops, which would make sanitized builds neither
// pin nor see the RLIMIT_MEMLOCK refusal that real runs meet.
int LockPages(void* p, uint64_t bytes) {
  return static_cast<int>(syscall(SYS_mlock, p, bytes));
}
int UnlockPages(void* p, uint64_t bytes) {
  return static_cast<int>(syscall(SYS_munlock, p, bytes));
}

}  // namespace

std::string_view PinModeName(PinMode mode) {
  switch (mode) {
    case PinMode::kAuto:
      return "auto";
    case PinMode::kMlock:
      return "mlock";
    case PinMode::kCuda:
      return "cuda";
    case PinMode::kNone:
      return "none";
  }
  return "unknown";
}

Result<PinMode> ParsePinMode(std::string_view name) {
  for (PinMode m :
       {PinMode::kAuto, PinMode::kMlock, PinMode::kCuda, PinMode::kNone}) {
    if (name == PinModeName(m)) return m;
  }
  return Status::InvalidArgument(fmt::format(
      "unknown pin mode '{}' (expected auto, mlock, cuda or none)", name));
}

Result<std::unique_ptr<PinnedPool>> PinnedPool::Create(
    const PoolOptions& options, DeviceBackend* device) {
  if (options.buffer_count == 0) {
    return Status::InvalidArgument(
        "host buffer pool: buffer_count must be at least 1");
  }
  if (options.buffer_bytes == 0) {
    return Status::InvalidArgument(
        "host buffer pool: buffer_size must be at least 1 byte");
  }
  const uint64_t align = options.alignment;
  if (align == 0 || (align & (align - 1)) != 0) {
    return Status::InvalidArgument(
        fmt::format("host buffer pool: alignment {} is not a power of two",
                    options.alignment));
  }
  if (options.buffer_bytes > UINT64_MAX - align) {
    return Status::InvalidArgument(
        "host buffer pool: buffer_size is too large");
  }
  const uint64_t buffer_bytes = RoundUp(options.buffer_bytes, align);
  uint64_t total = 0;
  if (__builtin_mul_overflow(buffer_bytes, uint64_t{options.buffer_count},
                             &total) ||
      total > (uint64_t{1} << 56)) {
    return Status::InvalidArgument(fmt::format(
        "host buffer pool: {} buffers x {} bytes does not fit in memory",
        options.buffer_count, buffer_bytes));
  }

  // mmap gives page-aligned, zero-filled memory that goes back to the OS on
  // munmap; for alignments above a page we map extra and start inside.
  // MAP_POPULATE commits it now, pinned or not: the pool is memory the
  // config asked for, so a host without it fails here rather than mid-run,
  // and resident memory is the same from the first step on whatever part of
  // each buffer the model uses.
  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  const uint64_t extra = align > page ? align : 0;
  const uint64_t mapping_bytes = RoundUp(total, page) + extra;
  void* mapping = mmap(nullptr, mapping_bytes, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  if (mapping == MAP_FAILED) {
    return Status::FromErrno(
        errno,
        fmt::format("host buffer pool: mmap of {} bytes", mapping_bytes));
  }
  // Pinned pages shared copy-on-write with a forked child (a data-loader
  // worker, say) break DMA; keep them out of children.
  (void)madvise(mapping, mapping_bytes, MADV_DONTFORK);
  auto* base = reinterpret_cast<uint8_t*>(
      RoundUp(reinterpret_cast<uintptr_t>(mapping), align));

  std::unique_ptr<PinnedPool> pool(new PinnedPool(
      options, buffer_bytes, base, total, mapping, mapping_bytes, device));
  ZTIER_RETURN_IF_ERROR(pool->Pin(options));
  Log(LogLevel::kInfo,
      "host buffer pool: {} buffers x {} bytes = {} bytes, pinned: {}",
      options.buffer_count, buffer_bytes, total, pool->pin_method_);
  return pool;
}

PinnedPool::PinnedPool(const PoolOptions& options, uint64_t buffer_bytes,
                       uint8_t* base, uint64_t total_bytes, void* mapping,
                       uint64_t mapping_bytes, DeviceBackend* device)
    : buffer_count_(options.buffer_count),
      buffer_bytes_(buffer_bytes),
      alignment_(options.alignment),
      base_(base),
      total_bytes_(total_bytes),
      mapping_(mapping),
      mapping_bytes_(mapping_bytes),
      device_(device),
      lease_(options.buffer_count, 0),
      run_(options.buffer_count, 0),
      in_use_(options.buffer_count, false) {}

PinnedPool::~PinnedPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (in_use_count_ != 0) {
      Log(LogLevel::kError,
          "host buffer pool destroyed with {} of {} buffers still leased",
          in_use_count_, buffer_count_);
    }
  }
  if (pinned_ == Pinned::kCuda) {
    Status s = device_->HostUnregister(base_);
    if (!s.ok()) {
      Log(LogLevel::kError, "host buffer pool: unpinning failed: {}",
          s.ToString());
    }
  } else if (pinned_ == Pinned::kMlock) {
    (void)UnlockPages(base_, total_bytes_);
  }
  munmap(mapping_, mapping_bytes_);
}

Status PinnedPool::Pin(const PoolOptions& options) {
  PinMode mode = options.pin;
  if (mode == PinMode::kAuto) {
    mode = device_ != nullptr && device_->pins_host_memory() ? PinMode::kCuda
                                                             : PinMode::kMlock;
  }
  if (mode == PinMode::kNone) {
    pin_method_ = "none";
    return Status::Ok();
  }
  Status s;
  if (mode == PinMode::kCuda) {
    if (device_ == nullptr || !device_->pins_host_memory()) {
      return Status::Unavailable(fmt::format(
          "host buffer pool: pin mode 'cuda' needs a CUDA device backend, but "
          "{}",
          device_ == nullptr
              ? std::string("none was given")
              : fmt::format("the backend is '{}'", device_->name())));
    }
    s = device_->HostRegister(base_, total_bytes_);
    if (s.ok()) {
      pinned_ = Pinned::kCuda;
      pin_method_ = "cuda";
      return Status::Ok();
    }
    s = s.WithContext(fmt::format(
        "host buffer pool: pinning {} bytes ({} buffers x {} bytes) with "
        "cudaHostRegister failed; fix: free host memory or lower "
        "tiers.nvme.buffer_count / buffer_size, or set "
        "tiers.host.allow_unpinned: true to continue unpinned",
        total_bytes_, buffer_count_, buffer_bytes_));
  } else {
    s = PinWithMlock();
    if (s.ok()) return s;
  }
  if (!options.allow_unpinned) return s;
  Log(LogLevel::kWarning, "{} -- continuing unpinned (allow_unpinned)",
      s.message());
  pin_method_ = fmt::format("none ({} refused)", PinModeName(mode));
  return Status::Ok();
}

Status PinnedPool::PinWithMlock() {
  if (LockPages(base_, total_bytes_) == 0) {
    pinned_ = Pinned::kMlock;
    pin_method_ = "mlock";
    return Status::Ok();
  }
  const int err = errno;
  rlimit lim{};
  std::string soft = "unknown", hard = "unknown";
  if (getrlimit(RLIMIT_MEMLOCK, &lim) == 0) {
    soft = LimitText(lim.rlim_cur);
    hard = LimitText(lim.rlim_max);
  }
  const int64_t locked = LockedBytes();
  const std::string already =
      locked >= 0
          ? fmt::format(", {} bytes already locked by this process", locked)
          : std::string();
  const Status os = Status::FromErrno(err, "mlock");
  return Status::ResourceExhausted(fmt::format(
      "host buffer pool: cannot pin {} bytes ({} buffers x {} bytes): {}. "
      "RLIMIT_MEMLOCK is soft {}, hard {}{}; {} bytes are needed. Fix: raise "
      "the "
      "limit for the training process (`ulimit -l unlimited` in its shell, a "
      "`* - memlock unlimited` line in /etc/security/limits.conf, "
      "LimitMEMLOCK=infinity for a systemd service, `--ulimit memlock=-1` for "
      "docker), or lower tiers.nvme.buffer_count / buffer_size, or set "
      "`tiers.host.allow_unpinned: true` to run with pageable buffers (slower "
      "copies)",
      total_bytes_, buffer_count_, buffer_bytes_, os.message(), soft, hard,
      already, total_bytes_));
}

Status PinnedPool::CheckCount(uint32_t count) const {
  if (count == 0) {
    return Status::InvalidArgument("host buffer pool: acquire of 0 buffers");
  }
  if (count > buffer_count_) {
    return Status::ResourceExhausted(fmt::format(
        "host buffer pool: asked for {} buffers ({} bytes) but the pool has "
        "buffer_count {} buffers of buffer_size {} bytes ({} bytes in all), so "
        "the request can never be met; raise tiers.nvme.buffer_count or "
        "buffer_size so that {} bytes fit",
        count, uint64_t{count} * buffer_bytes_, buffer_count_, buffer_bytes_,
        total_bytes_, uint64_t{count} * buffer_bytes_));
  }
  return Status::Ok();
}

uint32_t PinnedPool::BuffersFor(uint64_t bytes) const {
  const uint64_t n =
      bytes / buffer_bytes_ + (bytes % buffer_bytes_ != 0 ? 1 : 0);
  return n > UINT32_MAX ? UINT32_MAX : static_cast<uint32_t>(n);
}

uint32_t PinnedPool::FindRun(uint32_t count) const {
  uint32_t run = 0;
  for (uint32_t i = 0; i < buffer_count_; ++i) {
    run = in_use_[i] ? 0 : run + 1;
    if (run == count) return i + 1 - count;
  }
  return buffer_count_;
}

BufferSpan PinnedPool::TakeRun(uint32_t first, uint32_t count) {
  for (uint32_t i = first; i < first + count; ++i) in_use_[i] = true;
  const uint64_t lease = next_lease_++;
  lease_[first] = lease;
  run_[first] = count;
  in_use_count_ += count;
  if (in_use_count_ > high_water_) high_water_ = in_use_count_;
  ++acquires_;
  return BufferSpan{buffer(first), uint64_t{count} * buffer_bytes_, first,
                    count, lease};
}

Result<std::optional<BufferSpan>> PinnedPool::TryAcquire(uint32_t count) {
  ZTIER_RETURN_IF_ERROR(CheckCount(count));
  std::lock_guard<std::mutex> lock(mu_);
  const uint32_t first = FindRun(count);
  if (first == buffer_count_) {
    ++misses_;
    return std::optional<BufferSpan>();
  }
  return std::optional<BufferSpan>(TakeRun(first, count));
}

Result<std::optional<BufferSpan>> PinnedPool::AcquireUntil(
    uint32_t count, std::chrono::steady_clock::time_point deadline) {
  ZTIER_RETURN_IF_ERROR(CheckCount(count));
  std::unique_lock<std::mutex> lock(mu_);
  uint32_t first = buffer_count_;
  const bool found = freed_cv_.wait_until(lock, deadline, [&] {
    first = FindRun(count);
    return first != buffer_count_;
  });
  if (!found) {
    ++misses_;
    return std::optional<BufferSpan>();
  }
  return std::optional<BufferSpan>(TakeRun(first, count));
}

bool PinnedPool::WaitForFree(uint32_t count,
                             std::chrono::steady_clock::time_point deadline) {
  if (count == 0 || count > buffer_count_) return false;
  std::unique_lock<std::mutex> lock(mu_);
  return freed_cv_.wait_until(lock, deadline,
                              [&] { return FindRun(count) != buffer_count_; });
}

Status PinnedPool::Release(const BufferSpan& span) {
  if (span.data == nullptr || span.count == 0) {
    return Status::InvalidArgument(
        "host buffer pool: release of an empty span");
  }
  if (span.first >= buffer_count_ || span.count > buffer_count_ - span.first ||
      span.data != buffer(span.first) ||
      span.bytes != uint64_t{span.count} * buffer_bytes_) {
    return Status::InvalidArgument(fmt::format(
        "host buffer pool: release of a span that is not from this pool "
        "(data {}, buffers {}+{}; pool at {} with {} buffers of {} bytes)",
        static_cast<const void*>(span.data), span.first, span.count,
        static_cast<const void*>(base_), buffer_count_, buffer_bytes_));
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (span.lease == 0 || lease_[span.first] != span.lease ||
        run_[span.first] != span.count) {
      return Status::FailedPrecondition(fmt::format(
          "host buffer pool: buffers {}..{} are not leased as this span (lease "
          "{}): released twice, or a stale copy of a released span",
          span.first, span.first + span.count - 1, span.lease));
    }
    for (uint32_t i = span.first; i < span.first + span.count; ++i)
      in_use_[i] = false;
    lease_[span.first] = 0;
    run_[span.first] = 0;
    in_use_count_ -= span.count;
  }
  freed_cv_.notify_all();
  return Status::Ok();
}

std::vector<iovec> PinnedPool::IoRegions(uint64_t max_bytes) const {
  std::vector<iovec> out;
  if (max_bytes == 0 || max_bytes >= total_bytes_) {
    out.push_back(region());
    return out;
  }
  // Whole buffers per region when a buffer fits, so that a transfer into one
  // buffer never straddles two registered regions.
  const uint64_t step = buffer_bytes_ <= max_bytes
                            ? max_bytes / buffer_bytes_ * buffer_bytes_
                            : max_bytes;
  if (buffer_bytes_ <= max_bytes) {
    for (uint64_t off = 0; off < total_bytes_; off += step) {
      out.push_back(iovec{base_ + off, std::min(step, total_bytes_ - off)});
    }
    return out;
  }
  for (uint32_t b = 0; b < buffer_count_; ++b) {
    for (uint64_t off = 0; off < buffer_bytes_; off += step) {
      out.push_back(
          iovec{buffer(b) + off, std::min(step, buffer_bytes_ - off)});
    }
  }
  return out;
}

PoolStats PinnedPool::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  PoolStats s;
  s.bytes_allocated = total_bytes_;
  s.bytes_pinned = pinned_ == Pinned::kNo ? 0 : total_bytes_;
  s.buffers_in_use = in_use_count_;
  s.buffers_free = buffer_count_ - in_use_count_;
  s.high_water_buffers = high_water_;
  s.acquires = acquires_;
  s.acquire_misses = misses_;
  s.pin_method = pin_method_;
  return s;
}

}  // namespace ztier::tiering
