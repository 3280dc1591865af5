#include "tiering/pinned_pool.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <linux/capability.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "io/backend.h"
#include "io/engine.h"
#include "io/file.h"
#include "tests/testutil/testutil.h"
#include "tiering/device.h"

namespace ztier::tiering {
namespace {

using ::testing::HasSubstr;
using Clock = std::chrono::steady_clock;

std::unique_ptr<PinnedPool> MakePool(uint32_t count, uint64_t bytes,
                                     PinMode pin = PinMode::kMlock,
                                     uint32_t alignment = 4096) {
  PoolOptions o;
  o.buffer_count = count;
  o.buffer_bytes = bytes;
  o.alignment = alignment;
  o.pin = pin;
  auto pool = PinnedPool::Create(o);
  EXPECT_TRUE(pool.ok()) << pool.status().ToString();
  return pool.ok() ? std::move(pool).value() : nullptr;
}

BufferSpan Take(PinnedPool& pool, uint32_t count) {
  auto r = pool.TryAcquire(count);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_TRUE(r.ok() && r.value().has_value()) << "no run of " << count;
  return r.ok() && r.value() ? *r.value() : BufferSpan{};
}

// VmLck of this process, bytes.
int64_t LockedBytes() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmLck:", 0) == 0) return std::stoll(line.substr(6)) * 1024;
  }
  return -1;
}

TEST(PinnedPoolTest, RoundsUpAndAccounts) {
  auto pool = MakePool(4, 10000);
  ASSERT_TRUE(pool);
  EXPECT_EQ(pool->buffer_bytes(), 12288u);  // 10000 rounded up to 4096
  EXPECT_EQ(pool->buffer_count(), 4u);
  const PoolStats s = pool->stats();
  EXPECT_EQ(s.bytes_allocated, 4u * 12288u);
  EXPECT_EQ(s.bytes_pinned, 4u * 12288u);
  EXPECT_EQ(s.pin_method, "mlock");
  EXPECT_EQ(s.buffers_free, 4u);
  EXPECT_EQ(s.buffers_in_use, 0u);
  EXPECT_EQ(s.high_water_buffers, 0u);
  const iovec r = pool->region();
  EXPECT_EQ(r.iov_base, pool->buffer(0));
  EXPECT_EQ(r.iov_len, 4u * 12288u);
  for (uint32_t i = 0; i < 4; ++i) {
    EXPECT_EQ(reinterpret_cast<uintptr_t>(pool->buffer(i)) % 4096, 0u);
    if (i > 0) {
      EXPECT_EQ(pool->buffer(i) - pool->buffer(i - 1), 12288);
    }
  }
  // All of it is usable memory.
  std::memset(pool->buffer(0), 0x5A, r.iov_len);
  EXPECT_EQ(pool->BuffersFor(0), 0u);
  EXPECT_EQ(pool->BuffersFor(1), 1u);
  EXPECT_EQ(pool->BuffersFor(12288), 1u);
  EXPECT_EQ(pool->BuffersFor(12289), 2u);
  EXPECT_EQ(pool->SpanBytes(3), 3u * 12288u);
}

TEST(PinnedPoolTest, HighWaterAndFreeCounts) {
  auto pool = MakePool(5, 4096);
  ASSERT_TRUE(pool);
  BufferSpan a = Take(*pool, 1);
  BufferSpan b = Take(*pool, 2);
  EXPECT_EQ(pool->stats().buffers_in_use, 3u);
  EXPECT_EQ(pool->stats().buffers_free, 2u);
  EXPECT_EQ(pool->stats().high_water_buffers, 3u);
  ASSERT_TRUE(pool->Release(b).ok());
  EXPECT_EQ(pool->stats().buffers_in_use, 1u);
  EXPECT_EQ(pool->stats().high_water_buffers, 3u);  // stays at the peak
  BufferSpan c = Take(*pool, 4);
  EXPECT_EQ(pool->stats().high_water_buffers, 5u);
  EXPECT_EQ(pool->stats().buffers_free, 0u);
  ASSERT_TRUE(pool->Release(a).ok());
  ASSERT_TRUE(pool->Release(c).ok());
  const PoolStats s = pool->stats();
  EXPECT_EQ(s.buffers_free, 5u);
  EXPECT_EQ(s.buffers_in_use, 0u);
  EXPECT_EQ(s.acquires, 3u);
}

TEST(PinnedPoolTest, MultiBufferSpansAreContiguous) {
  auto pool = MakePool(4, 4096);
  ASSERT_TRUE(pool);
  BufferSpan a = Take(*pool, 1);
  BufferSpan b = Take(*pool, 1);
  BufferSpan c = Take(*pool, 1);
  EXPECT_EQ(a.first, 0u);
  EXPECT_EQ(b.first, 1u);
  EXPECT_EQ(c.first, 2u);
  ASSERT_TRUE(pool->Release(b).ok());
  // Buffers 1 and 3 are free, but not adjacent: no span of 2.
  auto miss = pool->TryAcquire(2);
  ASSERT_TRUE(miss.ok());
  EXPECT_FALSE(miss.value().has_value());
  EXPECT_EQ(pool->stats().acquire_misses, 1u);
  ASSERT_TRUE(pool->Release(a).ok());
  BufferSpan two = Take(*pool, 2);
  EXPECT_EQ(two.first, 0u);
  EXPECT_EQ(two.count, 2u);
  EXPECT_EQ(two.data, pool->buffer(0));
  EXPECT_EQ(two.bytes, 2u * 4096u);
  // The whole span is writable and does not overlap the neighbour.
  std::memset(c.data, 0xCC, c.bytes);
  std::memset(two.data, 0x11, two.bytes);
  EXPECT_EQ(c.data[0], 0xCC);
  ASSERT_TRUE(pool->Release(two).ok());
  ASSERT_TRUE(pool->Release(c).ok());
  BufferSpan all = Take(*pool, 4);
  EXPECT_EQ(all.bytes, pool->region().iov_len);
  ASSERT_TRUE(pool->Release(all).ok());
}

TEST(PinnedPoolTest, ExhaustionReturnsNothingWithoutBlocking) {
  auto pool = MakePool(2, 4096);
  ASSERT_TRUE(pool);
  BufferSpan a = Take(*pool, 2);
  const auto t0 = Clock::now();
  auto r = pool->TryAcquire(1);
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(r.value().has_value());
  // A deadline in the past: a single look, no wait.
  auto u = pool->AcquireUntil(1, Clock::now());
  ASSERT_TRUE(u.ok());
  EXPECT_FALSE(u.value().has_value());
  EXPECT_FALSE(
      pool->WaitForFree(1, Clock::now() + std::chrono::milliseconds(20)));
  EXPECT_LT(Clock::now() - t0, std::chrono::seconds(2));
  ASSERT_TRUE(pool->Release(a).ok());
  EXPECT_TRUE(pool->WaitForFree(2, Clock::now()));
}

TEST(PinnedPoolTest, ImpossibleRequestIsAnErrorNamingTheShape) {
  auto pool = MakePool(4, 10000);
  ASSERT_TRUE(pool);
  auto r = pool->TryAcquire(5);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kResourceExhausted);
  const std::string msg(r.status().message());
  EXPECT_THAT(msg, HasSubstr("buffer_count 4"));
  EXPECT_THAT(msg, HasSubstr("buffer_size 12288 bytes"));
  EXPECT_THAT(msg, HasSubstr("61440 bytes"));  // 5 x 12288: the size needed
  EXPECT_FALSE(
      pool->AcquireUntil(5, Clock::now() + std::chrono::hours(1)).ok());
  // Never waits for buffers that do not exist.
  const auto t0 = Clock::now();
  EXPECT_FALSE(pool->WaitForFree(5, Clock::now() + std::chrono::hours(1)));
  EXPECT_LT(Clock::now() - t0, std::chrono::seconds(1));
  auto zero = pool->TryAcquire(0);
  EXPECT_FALSE(zero.ok());
  EXPECT_EQ(zero.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(pool->stats().buffers_in_use, 0u);
}

TEST(PinnedPoolTest, BadReleasesAreErrorsAndChangeNothing) {
  auto pool = MakePool(4, 4096);
  auto other = MakePool(4, 4096);
  ASSERT_TRUE(pool && other);
  BufferSpan a = Take(*pool, 2);
  BufferSpan foreign = Take(*other, 1);

  EXPECT_EQ(pool->Release(BufferSpan{}).code(), StatusCode::kInvalidArgument);
  Status s = pool->Release(foreign);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("not from this pool"));

  BufferSpan tampered = a;
  tampered.count = 1;
  tampered.bytes = 4096;
  EXPECT_EQ(pool->Release(tampered).code(), StatusCode::kFailedPrecondition);
  BufferSpan moved = a;
  moved.first = 1;
  moved.data = pool->buffer(1);
  EXPECT_EQ(pool->Release(moved).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(pool->stats().buffers_in_use, 2u);

  ASSERT_TRUE(pool->Release(a).ok());
  s = pool->Release(a);  // double release
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()), HasSubstr("released twice"));

  // A stale copy must not release the buffers' new holder.
  BufferSpan again = Take(*pool, 2);
  EXPECT_EQ(again.first, a.first);
  EXPECT_EQ(pool->Release(a).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(pool->stats().buffers_in_use, 2u);
  ASSERT_TRUE(pool->Release(again).ok());
  ASSERT_TRUE(other->Release(foreign).ok());
  EXPECT_EQ(pool->stats().buffers_free, 4u);
}

TEST(PinnedPoolTest, WaitersWakeOnRelease) {
  auto pool = MakePool(3, 4096);
  ASSERT_TRUE(pool);
  BufferSpan a = Take(*pool, 2);
  BufferSpan b = Take(*pool, 1);
  std::thread releaser([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    EXPECT_TRUE(pool->Release(a).ok());
  });
  auto got = pool->AcquireUntil(2, Clock::now() + std::chrono::seconds(30));
  releaser.join();
  ASSERT_TRUE(got.ok());
  ASSERT_TRUE(got.value().has_value());
  EXPECT_EQ(got.value()->first, 0u);
  std::thread releaser2([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    EXPECT_TRUE(pool->Release(b).ok());
  });
  EXPECT_TRUE(pool->WaitForFree(1, Clock::now() + std::chrono::seconds(30)));
  releaser2.join();
  const auto t0 = Clock::now();
  EXPECT_FALSE(pool->WaitForFree(2, t0 + std::chrono::milliseconds(50)));
  EXPECT_GE(Clock::now() - t0, std::chrono::milliseconds(50));
  ASSERT_TRUE(pool->Release(*got.value()).ok());
}

// Never more pinned (or allocated) than buffer_count x rounded buffer_size,
// by our accounting and by the kernel's.
TEST(PinnedPoolTest, PinsExactlyWhatIsConfigured) {
  struct Shape {
    uint32_t count;
    uint64_t bytes;
    uint32_t alignment;
  };
  for (const Shape& sh :
       {Shape{1, 1, 4096}, Shape{3, 4097, 4096}, Shape{7, 65536, 512},
        Shape{2, 100, 1u << 21}, Shape{16, 100000, 4096}}) {
    const uint64_t rounded =
        (sh.bytes + sh.alignment - 1) / sh.alignment * sh.alignment;
    const uint64_t configured = sh.count * rounded;
    const int64_t locked_before = LockedBytes();
    auto pool = MakePool(sh.count, sh.bytes, PinMode::kMlock, sh.alignment);
    ASSERT_TRUE(pool);
    const PoolStats s = pool->stats();
    EXPECT_EQ(pool->buffer_bytes(), rounded);
    EXPECT_EQ(s.bytes_allocated, configured);
    EXPECT_EQ(s.bytes_pinned, configured);
    ASSERT_LE(s.bytes_pinned, uint64_t{sh.count} * rounded);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(pool->buffer(0)) % sh.alignment, 0u);
    if (locked_before >= 0) {
      const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
      // The kernel locks whole pages: at most one partial page more.
      const int64_t delta = LockedBytes() - locked_before;
      EXPECT_GE(delta, static_cast<int64_t>(configured / page * page));
      ASSERT_LE(delta,
                static_cast<int64_t>((configured + page - 1) / page * page));
    }
    pool.reset();
    if (locked_before >= 0) {
      EXPECT_EQ(LockedBytes(), locked_before);
    }
  }
}

TEST(PinnedPoolTest, PinModes) {
  auto none = MakePool(2, 4096, PinMode::kNone);
  ASSERT_TRUE(none);
  EXPECT_EQ(none->stats().bytes_pinned, 0u);
  EXPECT_EQ(none->stats().pin_method, "none");

  auto host = CreateHostDeviceBackend();
  ASSERT_TRUE(host.ok());
  PoolOptions o;
  o.buffer_count = 2;
  o.buffer_bytes = 4096;
  o.pin = PinMode::kAuto;  // the host emulation does not pin: mlock
  auto autop = PinnedPool::Create(o, host.value().get());
  ASSERT_TRUE(autop.ok()) << autop.status().ToString();
  EXPECT_EQ(autop.value()->stats().pin_method, "mlock");

  o.pin = PinMode::kCuda;  // explicit, unavailable: an error, not a fallback
  o.allow_unpinned = true;
  auto cuda = PinnedPool::Create(o, host.value().get());
  ASSERT_FALSE(cuda.ok());
  EXPECT_EQ(cuda.status().code(), StatusCode::kUnavailable);
  EXPECT_THAT(std::string(cuda.status().message()), HasSubstr("'host'"));
  auto cuda_null = PinnedPool::Create(o, nullptr);
  EXPECT_FALSE(cuda_null.ok());

  EXPECT_EQ(ParsePinMode("mlock").value(), PinMode::kMlock);
  EXPECT_EQ(ParsePinMode("none").value(), PinMode::kNone);
  EXPECT_FALSE(ParsePinMode("yes").ok());
}

TEST(PinnedPoolTest, InvalidOptions) {
  PoolOptions o;
  o.buffer_count = 0;
  o.buffer_bytes = 4096;
  EXPECT_EQ(PinnedPool::Create(o).status().code(),
            StatusCode::kInvalidArgument);
  o.buffer_count = 1;
  o.buffer_bytes = 0;
  EXPECT_EQ(PinnedPool::Create(o).status().code(),
            StatusCode::kInvalidArgument);
  o.buffer_bytes = 4096;
  o.alignment = 3000;
  EXPECT_EQ(PinnedPool::Create(o).status().code(),
            StatusCode::kInvalidArgument);
  o.alignment = 4096;
  o.buffer_count = UINT32_MAX;
  o.buffer_bytes = uint64_t{1} << 40;
  EXPECT_EQ(PinnedPool::Create(o).status().code(),
            StatusCode::kInvalidArgument);
}

TEST(PinnedPoolTest, IoRegionsCoverThePoolOnBufferBoundaries) {
  auto pool = MakePool(5, 12288, PinMode::kNone);
  ASSERT_TRUE(pool);
  auto check_cover = [&](const std::vector<iovec>& regions) {
    uint8_t* next = pool->buffer(0);
    uint64_t total = 0;
    for (const iovec& r : regions) {
      EXPECT_EQ(r.iov_base, next);
      next += r.iov_len;
      total += r.iov_len;
    }
    EXPECT_EQ(total, pool->region().iov_len);
  };
  auto one = pool->IoRegions();
  ASSERT_EQ(one.size(), 1u);
  check_cover(one);
  auto two_per = pool->IoRegions(30000);  // 2 buffers (24576 bytes) per region
  ASSERT_EQ(two_per.size(), 3u);
  EXPECT_EQ(two_per[0].iov_len, 24576u);
  EXPECT_EQ(two_per[2].iov_len, 12288u);
  check_cover(two_per);
  auto cut = pool->IoRegions(5000);  // buffers larger than the limit
  ASSERT_EQ(cut.size(), 15u);
  for (const iovec& r : cut) EXPECT_LE(r.iov_len, 5000u);
  check_cover(cut);
}

// The pool's region is registered with io_uring once (fixed buffers), and
// transfers into and out of its buffers then go through the registered path.
TEST(PinnedPoolTest, RegistersWithIoUringOnce) {
  auto backend = io::CreateIoUringBackend(io::BackendOptions{});
  if (!backend.ok()) GTEST_SKIP() << backend.status().ToString();
  constexpr uint64_t kBytes = 256 * 1024;
  auto pool = MakePool(4, kBytes);
  ASSERT_TRUE(pool);
  const std::vector<iovec> regions = pool->IoRegions();
  ASSERT_EQ(regions.size(), 1u);
  auto engine =
      io::Engine::Create(std::move(backend).value(), io::EngineOptions{});
  ASSERT_TRUE(engine.ok()) << engine.status().ToString();
  Status reg = engine.value()->RegisterBuffers(regions);
  ASSERT_TRUE(reg.ok()) << reg.ToString();

  testing::ScratchDir dir;
  io::OpenOptions open;
  open.direct = false;  // the scratch dir may be on tmpfs
  auto file = io::StripedFile::Open({dir.File("pool.bin")}, kBytes, open);
  ASSERT_TRUE(file.ok()) << file.status().ToString();
  BufferSpan out = Take(*pool, 2);
  BufferSpan in = Take(*pool, 2);
  testing::FillPattern(out.data, out.bytes, 77);
  Status w = engine.value()->Write(*file.value(), 0, out.bytes, out.data);
  ASSERT_TRUE(w.ok()) << w.ToString();
  Status r = engine.value()->Read(*file.value(), 0, in.bytes, in.data);
  ASSERT_TRUE(r.ok()) << r.ToString();
  EXPECT_EQ(testing::FirstMismatch(in.data, in.bytes, 77), -1);
  ASSERT_TRUE(pool->Release(out).ok());
  ASSERT_TRUE(pool->Release(in).ok());
  engine.value().reset();  // unregisters before the pool goes
}

// Threads hammer the pool; each writes its id over its span and checks it
// before giving the span back, so two leases of one buffer would show.
TEST(PinnedPoolTest, ConcurrentAcquireRelease) {
  constexpr uint32_t kBuffers = 8;
  constexpr uint64_t kBytes = 4096;
  auto pool = MakePool(kBuffers, kBytes);
  ASSERT_TRUE(pool);
  constexpr int kThreads = 6;
  constexpr int kIters = 1500;
  std::atomic<int> errors{0};
  std::atomic<uint64_t> got{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      for (int i = 0; i < kIters; ++i) {
        const uint32_t count = 1 + rng() % 3;
        std::optional<BufferSpan> span;
        if (i % 2 == 0) {
          auto r = pool->TryAcquire(count);
          if (!r.ok()) ++errors;
          if (r.ok()) span = r.value();
        } else {
          auto r = pool->AcquireUntil(
              count, Clock::now() + std::chrono::milliseconds(5));
          if (!r.ok()) ++errors;
          if (r.ok()) span = r.value();
        }
        if (!span) continue;
        ++got;
        if (span->count != count || span->bytes != count * kBytes) ++errors;
        const uint8_t tag = static_cast<uint8_t>(t + 1);
        std::memset(span->data, tag, span->bytes);
        const PoolStats s = pool->stats();
        if (s.buffers_in_use > kBuffers ||
            s.buffers_in_use + s.buffers_free != kBuffers) {
          ++errors;
        }
        std::this_thread::yield();
        for (uint64_t b = 0; b < span->bytes; b += 512) {
          if (span->data[b] != tag) {
            ++errors;
            break;
          }
        }
        if (!pool->Release(*span).ok()) ++errors;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(errors.load(), 0);
  EXPECT_GT(got.load(), 0u);
  const PoolStats s = pool->stats();
  EXPECT_EQ(s.buffers_free, kBuffers);
  EXPECT_EQ(s.buffers_in_use, 0u);
  EXPECT_LE(s.high_water_buffers, kBuffers);
  EXPECT_GE(s.high_water_buffers, 3u);
  EXPECT_EQ(s.acquires, got.load());
}

// --- memlock refusal ---------------------------------------------------------
// root (CAP_IPC_LOCK) may lock past RLIMIT_MEMLOCK, so the test drops that
// capability from the effective set of one thread (capabilities are per
// thread for the raw syscall), lowers the soft limit, and restores both.

bool SetIpcLockEffective(bool on, bool* had) {
  __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3] = {};
  if (syscall(SYS_capget, &header, data) != 0) return false;
  const uint32_t bit = 1u << CAP_IPC_LOCK;  // CAP_IPC_LOCK (14) is in word 0
  if (had) *had = (data[0].effective & bit) != 0;
  if (on) {
    if ((data[0].permitted & bit) == 0) return false;
    data[0].effective |= bit;
  } else {
    data[0].effective &= ~bit;
  }
  return syscall(SYS_capset, &header, data) == 0;
}

TEST(PinnedPoolTest, MemlockRefusalSaysWhyAndHowToFix) {
  constexpr uint64_t kSoftLimit = 64 * 1024;  // bytes
  constexpr uint64_t kPoolBytes = 1u << 20;   // 16 x 64 KiB, far above it
  rlimit saved{};
  ASSERT_EQ(getrlimit(RLIMIT_MEMLOCK, &saved), 0);
  Status refused;
  Status unpinned_status;
  PoolStats unpinned_stats;
  std::string setup_error;
  std::thread worker([&] {
    bool had_cap = false;
    if (!SetIpcLockEffective(false, &had_cap)) {
      setup_error = "capset failed";
      return;
    }
    rlimit low = saved;
    low.rlim_cur = kSoftLimit;
    if (saved.rlim_max != RLIM_INFINITY && saved.rlim_max < kSoftLimit) {
      low.rlim_cur = saved.rlim_max;
    }
    if (setrlimit(RLIMIT_MEMLOCK, &low) != 0) {
      setup_error = "setrlimit failed";
    } else {
      PoolOptions o;
      o.buffer_count = 16;
      o.buffer_bytes = 64 * 1024;
      o.pin = PinMode::kMlock;
      auto pool = PinnedPool::Create(o);
      refused = pool.ok() ? Status::Ok() : pool.status();
      o.allow_unpinned = true;
      auto unpinned = PinnedPool::Create(o);
      unpinned_status = unpinned.ok() ? Status::Ok() : unpinned.status();
      if (unpinned.ok()) unpinned_stats = unpinned.value()->stats();
      (void)setrlimit(RLIMIT_MEMLOCK, &saved);
    }
    if (had_cap) (void)SetIpcLockEffective(true, nullptr);
  });
  worker.join();
  rlimit now{};
  ASSERT_EQ(getrlimit(RLIMIT_MEMLOCK, &now), 0);
  EXPECT_EQ(now.rlim_cur, saved.rlim_cur);
  if (!setup_error.empty()) GTEST_SKIP() << setup_error;

  ASSERT_FALSE(refused.ok()) << "mlock of 1 MiB under a 64 KiB limit succeeded";
  EXPECT_EQ(refused.code(), StatusCode::kResourceExhausted);
  const std::string msg(refused.message());
  EXPECT_THAT(msg, HasSubstr("RLIMIT_MEMLOCK is soft 65536 bytes"));
  EXPECT_THAT(msg, HasSubstr("hard "));
  EXPECT_THAT(msg, HasSubstr(std::to_string(kPoolBytes) + " bytes are needed"));
  EXPECT_THAT(msg, HasSubstr("ulimit -l unlimited"));
  EXPECT_THAT(msg, HasSubstr("limits.conf"));
  EXPECT_THAT(msg, HasSubstr("tiers.host.allow_unpinned: true"));
  EXPECT_THAT(msg, HasSubstr("mlock:"));

  ASSERT_TRUE(unpinned_status.ok()) << unpinned_status.ToString();
  EXPECT_EQ(unpinned_stats.bytes_pinned, 0u);
  EXPECT_EQ(unpinned_stats.bytes_allocated, kPoolBytes);
  EXPECT_EQ(unpinned_stats.pin_method, "none (mlock refused)");
}

}  // namespace
}  // namespace ztier::tiering
