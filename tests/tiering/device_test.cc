// One suite for every DeviceBackend: the host emulation always, CUDA where a
// device is present (skipped with the reason elsewhere). Host memory for
// copies comes from a PinnedPool pinned through the backend under test.
#include "tiering/device.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <future>
#include <mutex>
#include <string>
#include <thread>
#include <set>
#include <vector>

#include "tests/testutil/testutil.h"
#include "tiering/pinned_pool.h"

namespace ztier::tiering {
namespace {

using testing::FillPattern;
using testing::FirstMismatch;
using ::testing::HasSubstr;

#define ASSERT_OK(expr)                                     \
  do {                                                      \
    const ::ztier::Status _s = (expr);                      \
    ASSERT_TRUE(_s.ok()) << #expr << ": " << _s.ToString(); \
  } while (0)

class DeviceTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (GetParam() == "cuda") {
      std::string why;
      if (!CudaDeviceAvailable(&why)) GTEST_SKIP() << "no CUDA device: " << why;
      auto b = CreateCudaDeviceBackend(0);
      ASSERT_TRUE(b.ok()) << b.status().ToString();
      dev_ = std::move(b).value();
    } else {
      auto b = CreateHostDeviceBackend();
      ASSERT_TRUE(b.ok()) << b.status().ToString();
      dev_ = std::move(b).value();
    }
    EXPECT_EQ(dev_->name(), GetParam());
  }

  void TearDown() override {
    if (!dev_) return;
    EXPECT_TRUE(dev_->DeviceSynchronize().ok());
    for (void* p : allocs_) EXPECT_TRUE(dev_->Free(p, StreamHandle{}).ok());
    for (EventHandle e : events_) EXPECT_TRUE(dev_->DestroyEvent(e).ok());
    for (StreamHandle s : streams_) EXPECT_TRUE(dev_->DestroyStream(s).ok());
    pool_.reset();  // unregisters through dev_, so before it
    dev_.reset();
  }

  StreamHandle NewStream() {
    auto s = dev_->CreateStream();
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    streams_.push_back(s.value());
    return s.value();
  }
  EventHandle NewEvent() {
    auto e = dev_->CreateEvent();
    EXPECT_TRUE(e.ok()) << e.status().ToString();
    events_.push_back(e.value());
    return e.value();
  }
  uint8_t* NewDevice(uint64_t bytes, StreamHandle s = {}) {
    auto p = dev_->Alloc(bytes, s);
    EXPECT_TRUE(p.ok()) << p.status().ToString();
    if (!p.ok()) return nullptr;
    allocs_.push_back(p.value());
    return static_cast<uint8_t*>(p.value());
  }
  // Pinned host memory (through the backend) of `buffers` x 1 MiB.
  BufferSpan Host(uint32_t buffers) {
    if (!pool_) {
      PoolOptions o;
      o.buffer_count = 8;
      o.buffer_bytes = 1u << 20;
      auto p = PinnedPool::Create(o, dev_.get());
      EXPECT_TRUE(p.ok()) << p.status().ToString();
      pool_ = std::move(p).value();
    }
    auto r = pool_->TryAcquire(buffers);
    EXPECT_TRUE(r.ok() && r.value().has_value());
    return *r.value();
  }

  std::unique_ptr<DeviceBackend> dev_;
  std::unique_ptr<PinnedPool> pool_;
  std::vector<StreamHandle> streams_;
  std::vector<EventHandle> events_;
  std::vector<void*> allocs_;
};

TEST_P(DeviceTest, DescribesItself) {
  EXPECT_FALSE(dev_->description().empty());
  EXPECT_EQ(dev_->pins_host_memory(), GetParam() == "cuda");
  uint64_t free_bytes = 0, total = 0;
  ASSERT_OK(dev_->MemInfo(&free_bytes, &total));
  EXPECT_GT(total, 0u);
  EXPECT_LE(free_bytes, total);
}

TEST_P(DeviceTest, PoolPinsThroughTheBackend) {
  BufferSpan h = Host(1);
  EXPECT_EQ(pool_->stats().pin_method, GetParam() == "cuda" ? "cuda" : "mlock");
  EXPECT_EQ(pool_->stats().bytes_pinned, 8u << 20);
  ASSERT_OK(pool_->Release(h));
}

TEST_P(DeviceTest, AllocIsAlignedAndStreamOrdered) {
  StreamHandle s = NewStream();
  auto p = dev_->Alloc(1000, s);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(reinterpret_cast<uintptr_t>(p.value()) % 256, 0u);
  ASSERT_OK(dev_->MemsetAsync(p.value(), 7, 1000, s));
  ASSERT_OK(dev_->Free(p.value(), s));
  ASSERT_OK(dev_->StreamSynchronize(s));
  EXPECT_FALSE(dev_->Alloc(0, s).ok());
  ASSERT_OK(dev_->Free(nullptr, s));
}

TEST_P(DeviceTest, CopiesAreBitExact) {
  StreamHandle s = NewStream();
  // Odd sizes too: nothing may assume whole blocks.
  for (uint64_t bytes : {uint64_t{1}, uint64_t{4095}, uint64_t{1} << 20,
                         (uint64_t{3} << 20) + 13}) {
    SCOPED_TRACE(bytes);
    BufferSpan src = Host(4);
    BufferSpan dst = Host(4);
    FillPattern(src.data, bytes, bytes);
    std::memset(dst.data, 0, bytes + 1);
    uint8_t* d1 = NewDevice(bytes, s);
    uint8_t* d2 = NewDevice(bytes, s);
    ASSERT_OK(dev_->MemcpyH2DAsync(d1, src.data, bytes, s));
    ASSERT_OK(dev_->MemcpyD2DAsync(d2, d1, bytes, s));
    ASSERT_OK(dev_->MemcpyD2HAsync(dst.data, d2, bytes, s));
    ASSERT_OK(dev_->StreamSynchronize(s));
    EXPECT_EQ(FirstMismatch(dst.data, bytes, bytes), -1);
    EXPECT_EQ(dst.data[bytes], 0) << "wrote past the end";
    ASSERT_OK(pool_->Release(src));
    ASSERT_OK(pool_->Release(dst));
  }
}

TEST_P(DeviceTest, MemsetThenCopyBack) {
  StreamHandle s = NewStream();
  constexpr uint64_t kBytes = 100000;
  uint8_t* d = NewDevice(kBytes, s);
  BufferSpan h = Host(1);
  ASSERT_OK(dev_->MemsetAsync(d, 0xAB, kBytes, s));
  ASSERT_OK(dev_->MemsetAsync(d + 10, 0x01, 20, s));
  ASSERT_OK(dev_->MemcpyD2HAsync(h.data, d, kBytes, s));
  ASSERT_OK(dev_->StreamSynchronize(s));
  for (uint64_t i = 0; i < kBytes; ++i) {
    ASSERT_EQ(h.data[i], (i >= 10 && i < 30) ? 0x01 : 0xAB) << i;
  }
  ASSERT_OK(pool_->Release(h));
}

TEST_P(DeviceTest, HostCallbacksRunInStreamOrder) {
  StreamHandle s = NewStream();
  std::mutex mu;
  std::vector<int> order;
  for (int i = 0; i < 200; ++i) {
    ASSERT_OK(dev_->LaunchHostFunc(s, [&, i] {
      std::lock_guard<std::mutex> lock(mu);
      order.push_back(i);
    }));
  }
  ASSERT_OK(dev_->StreamSynchronize(s));
  std::lock_guard<std::mutex> lock(mu);
  ASSERT_EQ(order.size(), 200u);
  for (int i = 0; i < 200; ++i) EXPECT_EQ(order[i], i);
}

// A callback after a copy sees the copy's result: copies and callbacks share
// one order.
TEST_P(DeviceTest, CallbacksSeeEarlierCopies) {
  StreamHandle s = NewStream();
  constexpr uint64_t kBytes = 1u << 20;
  BufferSpan src = Host(1);
  BufferSpan dst = Host(1);
  uint8_t* d = NewDevice(kBytes, s);
  std::atomic<int> rounds_ok{0};
  for (int round = 0; round < 5; ++round) {
    FillPattern(src.data, kBytes, round);
    ASSERT_OK(dev_->MemcpyH2DAsync(d, src.data, kBytes, s));
    ASSERT_OK(dev_->MemcpyD2HAsync(dst.data, d, kBytes, s));
    uint8_t* out = dst.data;
    ASSERT_OK(dev_->LaunchHostFunc(s, [out, round, &rounds_ok] {
      if (FirstMismatch(out, kBytes, round) == -1) ++rounds_ok;
    }));
    // The source must stay untouched until the copy has run.
    ASSERT_OK(dev_->StreamSynchronize(s));
  }
  EXPECT_EQ(rounds_ok.load(), 5);
  ASSERT_OK(pool_->Release(src));
  ASSERT_OK(pool_->Release(dst));
}

TEST_P(DeviceTest, UnrecordedEventIsComplete) {
  EventHandle e = NewEvent();
  auto q = dev_->EventQuery(e);
  ASSERT_TRUE(q.ok()) << q.status().ToString();
  EXPECT_TRUE(q.value());
  ASSERT_OK(dev_->EventSynchronize(e));
  StreamHandle s = NewStream();
  ASSERT_OK(dev_->StreamWaitEvent(s, e));  // nothing to wait for
  ASSERT_OK(dev_->StreamSynchronize(s));
}

// Stream A is held by a gate in a host callback; B waits on an event recorded
// after the gate, so B's work may only run once A is released.
TEST_P(DeviceTest, EventsOrderWorkAcrossStreams) {
  StreamHandle a = NewStream();
  StreamHandle b = NewStream();
  EventHandle e = NewEvent();
  std::promise<void> gate;
  std::shared_future<void> opened = gate.get_future().share();
  std::atomic<bool> a_done{false};
  std::atomic<bool> b_saw_a{false};
  std::atomic<bool> b_ran{false};
  ASSERT_OK(dev_->LaunchHostFunc(a, [opened, &a_done] {
    opened.wait();
    a_done = true;
  }));
  ASSERT_OK(dev_->RecordEvent(e, a));
  ASSERT_OK(dev_->StreamWaitEvent(b, e));
  ASSERT_OK(dev_->LaunchHostFunc(b, [&] {
    b_saw_a = a_done.load();
    b_ran = true;
  }));
  auto q = dev_->EventQuery(e);
  ASSERT_TRUE(q.ok());
  EXPECT_FALSE(q.value()) << "event complete while its stream is held";
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  EXPECT_FALSE(b_ran.load()) << "stream B ran past its wait";
  gate.set_value();
  ASSERT_OK(dev_->EventSynchronize(e));
  EXPECT_TRUE(a_done.load());
  ASSERT_OK(dev_->StreamSynchronize(b));
  EXPECT_TRUE(b_ran.load());
  EXPECT_TRUE(b_saw_a.load());
  q = dev_->EventQuery(e);
  ASSERT_TRUE(q.ok());
  EXPECT_TRUE(q.value());
}

// A wait binds to the record current at the time of the wait call: recording
// the event again elsewhere does not release the waiter early.
TEST_P(DeviceTest, WaitBindsToTheRecordAtCallTime) {
  StreamHandle a = NewStream();
  StreamHandle b = NewStream();
  StreamHandle c = NewStream();
  EventHandle e = NewEvent();
  std::promise<void> gate;
  std::shared_future<void> opened = gate.get_future().share();
  std::atomic<bool> b_ran{false};
  ASSERT_OK(dev_->LaunchHostFunc(a, [opened] { opened.wait(); }));
  ASSERT_OK(dev_->RecordEvent(e, a));
  ASSERT_OK(dev_->StreamWaitEvent(b, e));
  ASSERT_OK(dev_->LaunchHostFunc(b, [&] { b_ran = true; }));
  ASSERT_OK(dev_->RecordEvent(e, c));  // c is idle: this record completes
  ASSERT_OK(dev_->EventSynchronize(e));
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  EXPECT_FALSE(b_ran.load());
  gate.set_value();
  ASSERT_OK(dev_->StreamSynchronize(b));
  EXPECT_TRUE(b_ran.load());
}

// The swap-in pattern: copy on one stream, consume on another after an event.
TEST_P(DeviceTest, CopyStreamFeedsConsumerStream) {
  StreamHandle copy = NewStream();
  StreamHandle use = NewStream();
  constexpr uint64_t kBytes = 2u << 20;
  constexpr int kParts = 6;
  BufferSpan src = Host(2);
  BufferSpan out = Host(2);
  std::vector<uint8_t*> dev(kParts);
  std::vector<EventHandle> ready(kParts);
  for (int i = 0; i < kParts; ++i) {
    dev[i] = NewDevice(kBytes);
    ready[i] = NewEvent();
  }
  for (int i = 0; i < kParts; ++i) {
    FillPattern(src.data, kBytes, 100 + i);
    ASSERT_OK(dev_->MemcpyH2DAsync(dev[i], src.data, kBytes, copy));
    ASSERT_OK(dev_->RecordEvent(ready[i], copy));
    // The staging buffer is reused: wait until the copy has read it.
    ASSERT_OK(dev_->EventSynchronize(ready[i]));
    ASSERT_OK(dev_->StreamWaitEvent(use, ready[i]));
  }
  for (int i = 0; i < kParts; ++i) {
    ASSERT_OK(dev_->MemcpyD2HAsync(out.data, dev[i], kBytes, use));
    ASSERT_OK(dev_->StreamSynchronize(use));
    EXPECT_EQ(FirstMismatch(out.data, kBytes, 100 + i), -1) << "part " << i;
  }
  ASSERT_OK(pool_->Release(src));
  ASSERT_OK(pool_->Release(out));
}

TEST_P(DeviceTest, NullHandlesAreErrors) {
  uint8_t* d = NewDevice(4096);
  uint8_t host[16] = {};
  EXPECT_FALSE(dev_->MemcpyH2DAsync(d, host, 16, StreamHandle{}).ok());
  EXPECT_FALSE(dev_->LaunchHostFunc(StreamHandle{}, [] {}).ok());
  EXPECT_FALSE(dev_->StreamSynchronize(StreamHandle{}).ok());
  EXPECT_FALSE(dev_->RecordEvent(EventHandle{}, NewStream()).ok());
  EXPECT_FALSE(dev_->EventQuery(EventHandle{}).ok());
  EXPECT_FALSE(dev_->LaunchHostFunc(NewStream(), nullptr).ok());
}

TEST_P(DeviceTest, ThrowingCallbackIsReportedAtSync) {
  StreamHandle s = NewStream();
  std::atomic<bool> after{false};
  ASSERT_OK(dev_->LaunchHostFunc(s, [] { throw 42; }));
  ASSERT_OK(dev_->LaunchHostFunc(s, [&] { after = true; }));
  Status st = dev_->StreamSynchronize(s);
  EXPECT_FALSE(st.ok());
  EXPECT_THAT(std::string(st.message()), HasSubstr("threw"));
  EXPECT_TRUE(after.load());
  ASSERT_OK(dev_->StreamSynchronize(s));  // reported once
}

// Several threads, each with its own stream, round-trip data and signal a
// shared stream through events (run under TSan).
TEST_P(DeviceTest, ConcurrentSubmitters) {
  constexpr int kThreads = 4;
  constexpr uint64_t kBytes = 64 * 1024;
  StreamHandle shared = NewStream();
  std::vector<StreamHandle> own(kThreads);
  std::vector<EventHandle> done(kThreads);
  std::vector<uint8_t*> dev(kThreads);
  std::vector<BufferSpan> host(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    own[t] = NewStream();
    done[t] = NewEvent();
    dev[t] = NewDevice(kBytes);
    host[t] = Host(1);
  }
  std::atomic<int> failures{0};
  std::atomic<int> shared_callbacks{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 25; ++i) {
        const uint64_t seed = t * 1000 + i;
        FillPattern(host[t].data, kBytes / 2, seed);
        bool ok =
            dev_->MemcpyH2DAsync(dev[t], host[t].data, kBytes / 2, own[t])
                .ok() &&
            dev_->MemcpyD2HAsync(host[t].data + kBytes / 2, dev[t], kBytes / 2,
                                 own[t])
                .ok() &&
            dev_->RecordEvent(done[t], own[t]).ok() &&
            dev_->StreamWaitEvent(shared, done[t]).ok() &&
            dev_->LaunchHostFunc(shared, [&] { ++shared_callbacks; }).ok() &&
            dev_->EventSynchronize(done[t]).ok();
        if (!ok ||
            FirstMismatch(host[t].data + kBytes / 2, kBytes / 2, seed) != -1) {
          ++failures;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  ASSERT_OK(dev_->StreamSynchronize(shared));
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(shared_callbacks.load(), kThreads * 25);
  for (auto& h : host) ASSERT_OK(pool_->Release(h));
}

INSTANTIATE_TEST_SUITE_P(Backends, DeviceTest,
                         ::testing::Values("host", "cuda"),
                         [](const auto& info) { return info.param; });

// ---- host emulation only: checks a GPU would make by faulting ----

class HostDeviceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    HostDeviceOptions o;
    o.memory_bytes = 1u << 20;
    auto b = CreateHostDeviceBackend(o);
    ASSERT_TRUE(b.ok());
    dev_ = std::move(b).value();
  }
  std::unique_ptr<DeviceBackend> dev_;
};

TEST_F(HostDeviceTest, CopiesOutsideAllocationsAreErrors) {
  auto s = dev_->CreateStream();
  ASSERT_TRUE(s.ok());
  auto p = dev_->Alloc(1000, s.value());
  ASSERT_TRUE(p.ok());
  auto* d = static_cast<uint8_t*>(p.value());
  std::vector<uint8_t> host(4096);
  // The allocation is 1024 bytes (256-byte granules): 1024 fits, 1025 not.
  EXPECT_TRUE(dev_->MemcpyH2DAsync(d, host.data(), 1024, s.value()).ok());
  Status over = dev_->MemcpyH2DAsync(d + 1, host.data(), 1024, s.value());
  EXPECT_EQ(over.code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(over.message()),
              HasSubstr("not inside a live device"));
  // Host memory passed as device memory.
  EXPECT_FALSE(
      dev_->MemcpyD2HAsync(host.data(), host.data() + 8, 8, s.value()).ok());
  EXPECT_FALSE(dev_->MemsetAsync(host.data(), 0, 8, s.value()).ok());
  ASSERT_TRUE(dev_->Free(d, s.value()).ok());
  EXPECT_FALSE(dev_->Free(d, s.value()).ok());  // double free
  EXPECT_FALSE(dev_->MemcpyH2DAsync(d, host.data(), 8, s.value()).ok());
  EXPECT_FALSE(dev_->Free(host.data(), StreamHandle{}).ok());
  ASSERT_TRUE(dev_->DestroyStream(s.value()).ok());
}

TEST_F(HostDeviceTest, CapacityAndStreamOrderedFree) {
  auto s = dev_->CreateStream();
  ASSERT_TRUE(s.ok());
  auto a = dev_->Alloc(768 * 1024, s.value());
  ASSERT_TRUE(a.ok());
  auto b = dev_->Alloc(512 * 1024, s.value());
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), StatusCode::kResourceExhausted);
  // The free happens when the stream gets there: hold the stream first.
  std::promise<void> gate;
  auto opened = gate.get_future().share();
  ASSERT_TRUE(
      dev_->LaunchHostFunc(s.value(), [opened] { opened.wait(); }).ok());
  ASSERT_TRUE(dev_->Free(a.value(), s.value()).ok());
  uint64_t free_bytes = 0, total = 0;
  ASSERT_TRUE(dev_->MemInfo(&free_bytes, &total).ok());
  EXPECT_EQ(total, 1u << 20);
  EXPECT_EQ(free_bytes, 256u * 1024);
  gate.set_value();
  ASSERT_TRUE(dev_->StreamSynchronize(s.value()).ok());
  ASSERT_TRUE(dev_->MemInfo(&free_bytes, &total).ok());
  EXPECT_EQ(free_bytes, 1u << 20);
  ASSERT_TRUE(dev_->DestroyStream(s.value()).ok());
}

// A freed block is kept for the next Alloc of its size (a fresh one would
// fault in page by page), up to cache_bytes, oldest dropped first; with 0
// none is kept. Kept blocks are not live: a Free through them is refused.
TEST(HostDeviceCacheTest, FreedBlocksServeTheNextAllocOfTheirSize) {
  for (uint64_t cache : {uint64_t{0}, uint64_t{8192}}) {
    HostDeviceOptions o;
    o.cache_bytes = cache;
    auto dev = CreateHostDeviceBackend(o).value();
    auto a = dev->Alloc(4096, {});
    ASSERT_TRUE(a.ok());
    ASSERT_TRUE(dev->Free(*a, {}).ok());
    EXPECT_FALSE(dev->Free(*a, {}).ok()) << "a cached block is not live";
    auto other_size = dev->Alloc(8192, {});
    ASSERT_TRUE(other_size.ok());
    EXPECT_NE(*other_size, *a);
    auto again = dev->Alloc(4096, {});
    ASSERT_TRUE(again.ok());
    if (cache != 0) {
      EXPECT_EQ(*again, *a) << "the freed block is reused";
    }
    // Three 4 KiB blocks freed into an 8 KiB cache: the oldest is dropped.
    auto b = dev->Alloc(4096, {});
    auto c = dev->Alloc(4096, {});
    for (void* p : {*again, *b, *c}) ASSERT_TRUE(dev->Free(p, {}).ok());
    // The cache serves the next two: the two newest, the oldest was freed.
    std::set<void*> reused;
    for (int k = 0; k < 2; ++k) reused.insert(dev->Alloc(4096, {}).value());
    if (cache != 0) {
      EXPECT_EQ(reused, (std::set<void*>{*b, *c}));
    }
    ASSERT_TRUE(dev->Free(*other_size, {}).ok());
  }
}

TEST_F(HostDeviceTest, StaleHandlesAndRegistrations) {
  auto s = dev_->CreateStream();
  auto e = dev_->CreateEvent();
  ASSERT_TRUE(s.ok() && e.ok());
  ASSERT_TRUE(dev_->RecordEvent(e.value(), s.value()).ok());
  ASSERT_TRUE(dev_->DestroyStream(s.value()).ok());
  EXPECT_FALSE(dev_->StreamSynchronize(s.value()).ok());
  EXPECT_FALSE(dev_->DestroyStream(s.value()).ok());
  ASSERT_TRUE(dev_->DestroyEvent(e.value()).ok());
  EXPECT_FALSE(dev_->EventQuery(e.value()).ok());
  std::vector<uint8_t> host(8192);
  ASSERT_TRUE(dev_->HostRegister(host.data(), host.size()).ok());
  EXPECT_FALSE(dev_->HostRegister(host.data(), host.size()).ok());
  ASSERT_TRUE(dev_->HostUnregister(host.data()).ok());
  EXPECT_FALSE(dev_->HostUnregister(host.data()).ok());
}

// Destroying the backend with work queued drains it and frees everything
// (ASan would report a leak or a use after free otherwise).
TEST_F(HostDeviceTest, DestroyWithPendingWork) {
  auto s = dev_->CreateStream();
  auto e = dev_->CreateEvent();
  ASSERT_TRUE(s.ok() && e.ok());
  auto p = dev_->Alloc(4096, s.value());
  ASSERT_TRUE(p.ok());
  std::atomic<int> ran{0};
  for (int i = 0; i < 50; ++i) {
    ASSERT_TRUE(dev_->LaunchHostFunc(s.value(), [&] { ++ran; }).ok());
  }
  ASSERT_TRUE(dev_->RecordEvent(e.value(), s.value()).ok());
  dev_.reset();
  EXPECT_EQ(ran.load(), 50);
}

TEST(CudaAvailabilityTest, ReportsAReason) {
  std::string why;
  const bool available = CudaDeviceAvailable(&why);
  if (!available) {
    EXPECT_FALSE(why.empty());
    auto b = CreateCudaDeviceBackend(0);
    ASSERT_FALSE(b.ok());
    EXPECT_EQ(b.status().code(), StatusCode::kUnavailable)
        << b.status().ToString();
    std::printf("CUDA unavailable here: %s\n", why.c_str());
  } else {
    EXPECT_FALSE(CreateCudaDeviceBackend(1 << 20).ok());
  }
}

}  // namespace
}  // namespace ztier::tiering
