// Collective backends: "self"; "local" (ranks as threads, each over its own
// host-emulation device) for world sizes 1, 2, 3, 4 and 8; the float16 and
// bfloat16 arithmetic of ReduceScatterMean against an independent reference;
// disagreements between ranks, which must be reported and must neither hang
// nor touch memory; and "nccl" on one GPU, skipped with the reason where
// there is none.
//
// In the emulation device memory is host memory, so the local tests write
// inputs and read results directly; a stream synchronisation (through an
// event, as a trainer would) orders those accesses with the stream's work.
#include "coordinator/collective.h"

#include <gtest/gtest.h>

#include <bit>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "tests/testutil/testutil.h"
#include "tiering/device.h"

namespace ztier::coordinator {
namespace {

using testing::FillPattern;
using testing::FirstMismatch;
using tiering::DeviceBackend;
using tiering::EventHandle;
using tiering::StreamHandle;

#define ASSERT_OK(expr)                                       \
  do {                                                        \
    const ::ztier::Status _s = (expr);                        \
    ASSERT_TRUE(_s.ok()) << #expr << ": " << _s.ToString();   \
  } while (0)
#define EXPECT_OK(expr)                                       \
  do {                                                        \
    const ::ztier::Status _s = (expr);                        \
    EXPECT_TRUE(_s.ok()) << #expr << ": " << _s.ToString();   \
  } while (0)

// Runs fn(rank) on one thread per rank and joins them. A hung collective
// would hang the whole binary: past `limit` this reports it and aborts, since
// a blocked thread cannot be reclaimed.
void RunRanks(uint32_t world, const std::function<void(uint32_t)>& fn,
              std::chrono::seconds limit = std::chrono::seconds(120)) {
  std::mutex mu;
  std::condition_variable cv;
  uint32_t finished = 0;
  std::vector<std::thread> threads;
  for (uint32_t r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      fn(r);
      std::lock_guard<std::mutex> lock(mu);
      ++finished;
      cv.notify_all();
    });
  }
  {
    std::unique_lock<std::mutex> lock(mu);
    if (!cv.wait_for(lock, limit, [&] { return finished == world; })) {
      std::fprintf(stderr,
                   "FATAL: %u of %u ranks finished within %lld s: a collective "
                   "hangs\n",
                   finished, world, static_cast<long long>(limit.count()));
      std::fflush(stderr);
      std::abort();
    }
  }
  for (auto& t : threads) t.join();
}

// A gate a stream can be held at (through a host callback) until opened.
class Gate {
 public:
  void Open() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    cv_.notify_all();
  }
  void Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return open_; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
};

// One rank: its own host-emulation device, a stream and an event, its device
// allocations and its Collective, released in the right order.
class RankEnv {
 public:
  RankEnv(LocalGroup* group, uint32_t rank) {
    auto dev = tiering::CreateHostDeviceBackend();
    EXPECT_TRUE(dev.ok()) << dev.status().ToString();
    dev_ = std::move(dev).value();
    stream_ = NewStream();
    auto event = dev_->CreateEvent();
    EXPECT_TRUE(event.ok()) << event.status().ToString();
    event_ = event.value();
    if (group != nullptr) {
      auto coll = group->Join(rank, dev_.get());
      EXPECT_TRUE(coll.ok()) << coll.status().ToString();
      if (coll.ok()) coll_ = std::move(coll).value();
    }
  }
  ~RankEnv() {
    EXPECT_OK(dev_->DeviceSynchronize());
    coll_.reset();
    for (void* p : allocs_) EXPECT_OK(dev_->Free(p, StreamHandle{}));
    EXPECT_OK(dev_->DestroyEvent(event_));
    for (StreamHandle s : streams_) EXPECT_OK(dev_->DestroyStream(s));
  }

  DeviceBackend* dev() { return dev_.get(); }
  Collective& coll() { return *coll_; }
  void set_coll(std::unique_ptr<Collective> c) { coll_ = std::move(c); }
  void DropCollective() { coll_.reset(); }
  StreamHandle stream() const { return stream_; }

  StreamHandle NewStream() {
    auto s = dev_->CreateStream();
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    streams_.push_back(s.value());
    return s.value();
  }
  // Device memory (host memory here), zero-filled.
  uint8_t* Alloc(uint64_t bytes) {
    auto p = dev_->Alloc(bytes, StreamHandle{});
    EXPECT_TRUE(p.ok()) << p.status().ToString();
    if (!p.ok()) return nullptr;
    allocs_.push_back(p.value());
    std::memset(p.value(), 0, bytes);
    return static_cast<uint8_t*>(p.value());
  }
  float* AllocFloats(uint64_t n) { return reinterpret_cast<float*>(Alloc(n * 4)); }
  uint16_t* AllocU16(uint64_t n) { return reinterpret_cast<uint16_t*>(Alloc(n * 2)); }

  // Waits for everything enqueued on `s` so far, through an event.
  Status Wait(StreamHandle s) {
    ZTIER_RETURN_IF_ERROR(dev_->RecordEvent(event_, s));
    return dev_->EventSynchronize(event_);
  }
  Status Wait() { return Wait(stream_); }

 private:
  std::unique_ptr<DeviceBackend> dev_;
  std::unique_ptr<Collective> coll_;
  StreamHandle stream_;
  EventHandle event_;
  std::vector<StreamHandle> streams_;
  std::vector<void*> allocs_;
};

// A local group of `world` ranks, each with its RankEnv.
class Group {
 public:
  explicit Group(uint32_t world) : group_(LocalGroup::Create(world)) {
    for (uint32_t r = 0; r < world; ++r) {
      ranks_.push_back(std::make_unique<RankEnv>(group_.get(), r));
    }
  }
  uint32_t world() const { return group_->world_size(); }
  RankEnv& rank(uint32_t r) { return *ranks_[r]; }
  void Run(const std::function<void(RankEnv&, uint32_t)>& fn,
           std::chrono::seconds limit = std::chrono::seconds(120)) {
    RunRanks(world(), [&](uint32_t r) { fn(*ranks_[r], r); }, limit);
  }

 private:
  std::shared_ptr<LocalGroup> group_;
  std::vector<std::unique_ptr<RankEnv>> ranks_;
};

uint64_t Seed(uint32_t rank, uint32_t index = 0) { return 1000 + 97 * index + rank; }

// ---- self ----

TEST(SelfCollective, CopiesOrDoesNothing) {
  RankEnv env(nullptr, 0);
  env.set_coll(CreateSelfCollective(env.dev()));
  Collective& c = env.coll();
  EXPECT_EQ(c.name(), "self");
  EXPECT_EQ(c.rank(), 0u);
  EXPECT_EQ(c.world_size(), 1u);

  constexpr uint64_t kBytes = 1000;
  uint8_t* part = env.Alloc(kBytes);
  uint8_t* full = env.Alloc(kBytes);
  FillPattern(part, kBytes, Seed(0));
  ASSERT_OK(c.AllGather(part, full, kBytes, env.stream()));
  ASSERT_OK(env.Wait());
  EXPECT_EQ(FirstMismatch(full, kBytes, Seed(0)), -1);
  // In place: nothing to move, nothing changes.
  ASSERT_OK(c.AllGather(full, full, kBytes, env.stream()));
  ASSERT_OK(env.Wait());
  EXPECT_EQ(FirstMismatch(full, kBytes, Seed(0)), -1);

  float* grads = env.AllocFloats(100);
  float* mine = env.AllocFloats(100);
  for (int i = 0; i < 100; ++i) grads[i] = 0.1f * static_cast<float>(i) - 3.0f;
  ASSERT_OK(c.ReduceScatterMean(grads, mine, 100, DType::kFloat32, env.stream()));
  ASSERT_OK(env.Wait());
  EXPECT_EQ(std::memcmp(grads, mine, 400), 0);
  EXPECT_EQ(c.ReduceScatterMean(grads, mine, 100, DType::kUInt8, env.stream()).code(),
            StatusCode::kInvalidArgument);
  // Part straddling the full buffer's start: not in place, and overlapping.
  EXPECT_EQ(c.AllGather(part + 10, part, 100, env.stream()).code(),
            StatusCode::kInvalidArgument);

  auto host = c.AllGatherHost(42);
  ASSERT_TRUE(host.ok()) << host.status().ToString();
  EXPECT_EQ(*host, std::vector<uint64_t>{42});
}

// ---- local: joining ----

TEST(LocalGroup, JoinChecksItsArguments) {
  EXPECT_EQ(LocalGroup::Create(0), nullptr);
  auto group = LocalGroup::Create(2);
  ASSERT_NE(group, nullptr);
  EXPECT_EQ(group->world_size(), 2u);
  RankEnv env(nullptr, 0);
  EXPECT_EQ(group->Join(2, env.dev()).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(group->Join(0, nullptr).status().code(), StatusCode::kInvalidArgument);
  auto first = group->Join(0, env.dev());
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  EXPECT_EQ((*first)->name(), "local");
  EXPECT_EQ((*first)->rank(), 0u);
  EXPECT_EQ((*first)->world_size(), 2u);
  EXPECT_EQ(group->Join(0, env.dev()).status().code(), StatusCode::kFailedPrecondition);
  first.value().reset();
  // Once that Collective is gone, the rank may join again.
  EXPECT_TRUE(group->Join(0, env.dev()).ok());
}

// ---- local: per world size ----

class LocalCollectiveTest : public ::testing::TestWithParam<uint32_t> {};

INSTANTIATE_TEST_SUITE_P(World, LocalCollectiveTest, ::testing::Values(1u, 2u, 3u, 4u, 8u),
                         [](const auto& info) {
                           return "world" + std::to_string(info.param);
                         });

TEST_P(LocalCollectiveTest, AllGatherIsBitExact) {
  Group g(GetParam());
  const uint32_t world = g.world();
  g.Run([&](RankEnv& env, uint32_t r) {
    for (uint64_t bytes : {uint64_t{1}, uint64_t{1000}, uint64_t{65536 + 3}}) {
      uint8_t* part = env.Alloc(bytes);
      uint8_t* full = env.Alloc(bytes * world);
      FillPattern(part, bytes, Seed(r));
      ASSERT_OK(env.coll().AllGather(part, full, bytes, env.stream()));
      ASSERT_OK(env.Wait());
      for (uint32_t j = 0; j < world; ++j) {
        EXPECT_EQ(FirstMismatch(full + j * bytes, bytes, Seed(j)), -1)
            << "rank " << r << ": slot " << j << " of " << bytes << " bytes";
      }
      EXPECT_EQ(FirstMismatch(part, bytes, Seed(r)), -1) << "input changed";
    }
  });
}

TEST_P(LocalCollectiveTest, AllGatherInPlace) {
  Group g(GetParam());
  const uint32_t world = g.world();
  constexpr uint64_t kBytes = 4096 + 5;
  g.Run([&](RankEnv& env, uint32_t r) {
    uint8_t* full = env.Alloc(kBytes * world);
    uint8_t* part = full + r * kBytes;
    FillPattern(part, kBytes, Seed(r));
    ASSERT_OK(env.coll().AllGather(part, full, kBytes, env.stream()));
    ASSERT_OK(env.Wait());
    for (uint32_t j = 0; j < world; ++j) {
      EXPECT_EQ(FirstMismatch(full + j * kBytes, kBytes, Seed(j)), -1)
          << "rank " << r << ": slot " << j;
    }
  });
}

// Rank r's full buffer holds i + 2r at element i; the mean over ranks is
// i + (world - 1), exact in float32 (small integers, and the sum is an exact
// multiple of the world size).
TEST_P(LocalCollectiveTest, ReduceScatterMeanFloat32IsExact) {
  Group g(GetParam());
  const uint32_t world = g.world();
  constexpr uint64_t kElems = 1500;  // per rank; not a multiple of the chunk
  for (bool in_place : {false, true}) {
    g.Run([&](RankEnv& env, uint32_t r) {
      float* full = env.AllocFloats(kElems * world);
      for (uint64_t i = 0; i < kElems * world; ++i) {
        full[i] = static_cast<float>(i) + 2.0f * static_cast<float>(r);
      }
      float* part = in_place ? full + r * kElems : env.AllocFloats(kElems);
      ASSERT_OK(
          env.coll().ReduceScatterMean(full, part, kElems, DType::kFloat32, env.stream()));
      ASSERT_OK(env.Wait());
      for (uint64_t k = 0; k < kElems; ++k) {
        const float want = static_cast<float>(r * kElems + k + world - 1);
        ASSERT_EQ(part[k], want) << "rank " << r << " element " << k
                                 << (in_place ? " (in place)" : "");
      }
    });
  }
}

TEST_P(LocalCollectiveTest, AllGatherHostInRankOrder) {
  Group g(GetParam());
  const uint32_t world = g.world();
  constexpr uint64_t kBytes = 256;
  g.Run([&](RankEnv& env, uint32_t r) {
    // A stream collective before and after: the host one takes its turn in
    // the same numbering without waiting for the stream.
    uint8_t* part = env.Alloc(kBytes);
    uint8_t* full = env.Alloc(kBytes * world);
    FillPattern(part, kBytes, Seed(r));
    ASSERT_OK(env.coll().AllGather(part, full, kBytes, env.stream()));
    for (int round = 0; round < 3; ++round) {
      auto values = env.coll().AllGatherHost(1000 + 7 * r + round);
      ASSERT_TRUE(values.ok()) << values.status().ToString();
      ASSERT_EQ(values->size(), world);
      for (uint32_t j = 0; j < world; ++j) EXPECT_EQ((*values)[j], 1000 + 7 * j + round);
    }
    uint8_t* full2 = env.Alloc(kBytes * world);
    ASSERT_OK(env.coll().AllGather(part, full2, kBytes, env.stream()));
    ASSERT_OK(env.Wait());
    for (uint32_t j = 0; j < world; ++j) {
      EXPECT_EQ(FirstMismatch(full + j * kBytes, kBytes, Seed(j)), -1);
      EXPECT_EQ(FirstMismatch(full2 + j * kBytes, kBytes, Seed(j)), -1);
    }
  });
}

// Many collectives wait on each rank's stream, held at a gate, before the
// first runs; each must meet its own counterpart on the other ranks.
TEST_P(LocalCollectiveTest, CollectivesQueuedBeforeTheFirstRuns) {
  Group g(GetParam());
  const uint32_t world = g.world();
  constexpr uint32_t kCollectives = 12;
  g.Run([&](RankEnv& env, uint32_t r) {
    Gate gate;
    ASSERT_OK(env.dev()->LaunchHostFunc(env.stream(), [&gate] { gate.Wait(); }));
    std::vector<uint8_t*> fulls;
    std::vector<float*> means;
    for (uint32_t k = 0; k < kCollectives; ++k) {
      if (k % 3 == 2) {
        const uint64_t elems = 10 * (k + 1);
        float* full = env.AllocFloats(elems * world);
        for (uint64_t i = 0; i < elems * world; ++i) {
          full[i] = static_cast<float>(k + i) + 2.0f * static_cast<float>(r);
        }
        float* part = env.AllocFloats(elems);
        ASSERT_OK(
            env.coll().ReduceScatterMean(full, part, elems, DType::kFloat32, env.stream()));
        means.push_back(part);
        fulls.push_back(nullptr);
      } else {
        const uint64_t bytes = 100 * (k + 1) + 1;
        uint8_t* part = env.Alloc(bytes);
        uint8_t* full = env.Alloc(bytes * world);
        FillPattern(part, bytes, Seed(r, k));
        ASSERT_OK(env.coll().AllGather(part, full, bytes, env.stream()));
        fulls.push_back(full);
        means.push_back(nullptr);
      }
    }
    // Nothing has run yet: the stream is held before the first collective.
    for (uint8_t* full : fulls) {
      if (full != nullptr) {
        EXPECT_EQ(full[0], 0);
      }
    }
    gate.Open();
    ASSERT_OK(env.Wait());
    for (uint32_t k = 0; k < kCollectives; ++k) {
      if (means[k] != nullptr) {
        const uint64_t elems = 10 * (k + 1);
        for (uint64_t i = 0; i < elems; ++i) {
          ASSERT_EQ(means[k][i], static_cast<float>(k + r * elems + i + world - 1))
              << "collective " << k << " rank " << r << " element " << i;
        }
      } else {
        const uint64_t bytes = 100 * (k + 1) + 1;
        for (uint32_t j = 0; j < world; ++j) {
          EXPECT_EQ(FirstMismatch(fulls[k] + j * bytes, bytes, Seed(j, k)), -1)
              << "collective " << k << " rank " << r << " slot " << j;
        }
      }
    }
  });
}

// Collectives spread over two streams per rank, each rank putting them on
// its streams differently: numbering, not stream order, pairs them up.
TEST_P(LocalCollectiveTest, CollectivesOnSeveralStreams) {
  Group g(GetParam());
  const uint32_t world = g.world();
  constexpr uint32_t kCollectives = 10;
  constexpr uint64_t kBytes = 333;
  g.Run([&](RankEnv& env, uint32_t r) {
    const StreamHandle streams[2] = {env.stream(), env.NewStream()};
    std::vector<uint8_t*> fulls;
    for (uint32_t k = 0; k < kCollectives; ++k) {
      uint8_t* part = env.Alloc(kBytes);
      uint8_t* full = env.Alloc(kBytes * world);
      FillPattern(part, kBytes, Seed(r, k));
      ASSERT_OK(env.coll().AllGather(part, full, kBytes, streams[(k / (r + 1)) % 2]));
      fulls.push_back(full);
    }
    ASSERT_OK(env.Wait(streams[0]));
    ASSERT_OK(env.Wait(streams[1]));
    for (uint32_t k = 0; k < kCollectives; ++k) {
      for (uint32_t j = 0; j < world; ++j) {
        EXPECT_EQ(FirstMismatch(fulls[k] + j * kBytes, kBytes, Seed(j, k)), -1)
            << "collective " << k << " rank " << r << " slot " << j;
      }
    }
  });
}

// A call rejected at issue takes no number: the ranks stay in step.
TEST_P(LocalCollectiveTest, RejectedCallsLeaveNoGap) {
  Group g(GetParam());
  const uint32_t world = g.world();
  constexpr uint64_t kBytes = 64;
  g.Run([&](RankEnv& env, uint32_t r) {
    uint8_t* part = env.Alloc(kBytes);
    uint8_t* full = env.Alloc(kBytes * world);
    FillPattern(part, kBytes, Seed(r));
    if (r == 0) {
      Collective& c = env.coll();
      EXPECT_EQ(c.AllGather(nullptr, full, kBytes, env.stream()).code(),
                StatusCode::kInvalidArgument);
      EXPECT_EQ(c.ReduceScatterMean(full, part, 4, DType::kUInt8, env.stream()).code(),
                StatusCode::kInvalidArgument);
      EXPECT_EQ(c.AllGather(part, full, kBytes, StreamHandle{}).code(),
                StatusCode::kInvalidArgument);
      if (world > 1) {
        // Overlapping, but not rank 0's slot.
        EXPECT_EQ(c.AllGather(full + 1, full, kBytes, env.stream()).code(),
                  StatusCode::kInvalidArgument);
      }
    }
    ASSERT_OK(env.coll().AllGather(part, full, kBytes, env.stream()));
    ASSERT_OK(env.Wait());
    for (uint32_t j = 0; j < world; ++j) {
      EXPECT_EQ(FirstMismatch(full + j * kBytes, kBytes, Seed(j)), -1);
    }
  });
}

// ---- float16 / bfloat16 arithmetic ----

// The value of a float16 / bfloat16 pattern, straight from the format's
// definition. The infinity pattern reads as the next power of two (65536 and
// 2^128), which is where rounding overflows to it.
double HalfValue(uint16_t bits) {
  const double sign = (bits & 0x8000) ? -1.0 : 1.0;
  const int e = (bits >> 10) & 0x1F;
  const int m = bits & 0x3FF;
  if (e == 0) return sign * std::ldexp(m, -24);
  return sign * std::ldexp(1024 + m, e - 25);
}
double BFloat16Value(uint16_t bits) {
  const double sign = (bits & 0x8000) ? -1.0 : 1.0;
  const int e = (bits >> 7) & 0xFF;
  const int m = bits & 0x7F;
  if (e == 0) return sign * std::ldexp(m, -133);
  return sign * std::ldexp(128 + m, e - 134);
}

struct Format {
  DType dtype;
  double (*value)(uint16_t);
  uint16_t inf;  // the +infinity pattern; positive patterns below it are finite
};
constexpr Format kHalf{DType::kFloat16, HalfValue, 0x7C00};
constexpr Format kBFloat16{DType::kBFloat16, BFloat16Value, 0x7F80};

bool IsNaN(const Format& f, uint16_t bits) { return (bits & 0x7FFF) > f.inf; }
bool IsFinite(const Format& f, uint16_t bits) { return (bits & 0x7FFF) < f.inf; }

// The pattern nearest to `x`, ties to the even pattern, found by bisection
// over the positive patterns, which grow with their value.
uint16_t Nearest(const Format& f, float x) {
  const uint16_t sign = std::signbit(x) ? 0x8000 : 0;
  const double a = std::fabs(static_cast<double>(x));
  if (a >= f.value(f.inf)) return sign | f.inf;
  uint32_t lo = 0;     // value(lo) <= a
  uint32_t hi = f.inf;  // value(hi) > a
  while (hi - lo > 1) {
    const uint32_t mid = (lo + hi) / 2;
    if (f.value(static_cast<uint16_t>(mid)) <= a) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  const double below = a - f.value(static_cast<uint16_t>(lo));
  const double above = f.value(static_cast<uint16_t>(hi)) - a;
  const bool take_lo = below < above || (below == above && (lo & 1) == 0);
  return static_cast<uint16_t>(sign | (take_lo ? lo : hi));
}

// What ReduceScatterMean must produce from inputs[r] over ranks r: the float32
// sum in rank order divided by the world size, rounded to the format.
uint16_t ReferenceMean(const Format& f, const std::vector<uint16_t>& inputs) {
  float acc = static_cast<float>(f.value(inputs[0]));  // exact: a subset of float
  for (size_t r = 1; r < inputs.size(); ++r) acc += static_cast<float>(f.value(inputs[r]));
  return Nearest(f, acc / static_cast<float>(inputs.size()));
}

// Runs ReduceScatterMean over `world` local ranks where rank r's full buffer
// is inputs[r] (world x n elements); returns each rank's n outputs.
std::vector<std::vector<uint16_t>> RunMean(const Format& f, uint32_t world,
                                           const std::vector<std::vector<uint16_t>>& inputs) {
  const uint64_t n = inputs[0].size() / world;
  std::vector<std::vector<uint16_t>> out(world);
  Group g(world);
  g.Run([&](RankEnv& env, uint32_t r) {
    uint16_t* full = env.AllocU16(n * world);
    uint16_t* part = env.AllocU16(n);
    std::memcpy(full, inputs[r].data(), n * world * 2);
    ASSERT_OK(env.coll().ReduceScatterMean(full, part, n, f.dtype, env.stream()));
    ASSERT_OK(env.Wait());
    out[r].assign(part, part + n);
  });
  return out;
}

// World 1: every pattern comes back unchanged (NaN as some NaN).
void ExpectIdentity(const Format& f) {
  std::vector<uint16_t> all(65536);
  for (uint32_t i = 0; i < 65536; ++i) all[i] = static_cast<uint16_t>(i);
  auto out = RunMean(f, 1, {all});
  ASSERT_EQ(out[0].size(), all.size());
  for (uint32_t i = 0; i < 65536; ++i) {
    const auto in = static_cast<uint16_t>(i);
    if (IsNaN(f, in)) {
      EXPECT_TRUE(IsNaN(f, out[0][i])) << std::hex << "0x" << i << " -> 0x" << out[0][i];
    } else {
      ASSERT_EQ(out[0][i], in) << std::hex << "0x" << i;
    }
  }
}

TEST(ReduceScatterMeanFormats, Float16RoundTripsEveryPattern) { ExpectIdentity(kHalf); }
TEST(ReduceScatterMeanFormats, BFloat16RoundTripsEveryPattern) {
  ExpectIdentity(kBFloat16);
}

struct Case {
  uint16_t a, b, want;
  const char* what;
};

// Two ranks, rank 0 holding `a` and rank 1 `b` in every element of the
// element's slice; both ranks' outputs must be `want` (or a NaN).
void ExpectMeans(const Format& f, const std::vector<Case>& cases) {
  const uint64_t n = cases.size();
  std::vector<std::vector<uint16_t>> inputs(2, std::vector<uint16_t>(2 * n));
  for (uint64_t i = 0; i < n; ++i) {
    for (uint64_t slice = 0; slice < 2; ++slice) {
      inputs[0][slice * n + i] = cases[i].a;
      inputs[1][slice * n + i] = cases[i].b;
    }
  }
  auto out = RunMean(f, 2, inputs);
  for (uint32_t r = 0; r < 2; ++r) {
    for (uint64_t i = 0; i < n; ++i) {
      const Case& c = cases[i];
      if (IsNaN(f, c.want)) {
        EXPECT_TRUE(IsNaN(f, out[r][i])) << c.what << ": got 0x" << std::hex << out[r][i];
      } else {
        EXPECT_EQ(out[r][i], c.want)
            << c.what << ": got 0x" << std::hex << out[r][i] << ", want 0x" << c.want;
      }
      // The reference (finite inputs only) agrees with the hand-worked value.
      if (IsFinite(f, c.a) && IsFinite(f, c.b)) {
        EXPECT_EQ(ReferenceMean(f, {c.a, c.b}), c.want) << c.what << " (reference)";
      }
    }
  }
}

TEST(ReduceScatterMeanFormats, Float16KnownValues) {
  ExpectMeans(kHalf, {
      {0x3C00, 0x3C02, 0x3C01, "exact: 1 and 1+2^-9"},
      {0x3C00, 0x3C01, 0x3C00, "tie 1+2^-11 to even below"},
      {0x3C01, 0x3C02, 0x3C02, "tie 1+3*2^-11 to even above"},
      {0x3C01, 0x3401, 0x3901, "0.625 + 1.25 ulp rounds down"},
      {0x3C01, 0x3403, 0x3902, "0.625 + 1.75 ulp rounds up"},
      {0x0001, 0x0000, 0x0000, "half the smallest subnormal: tie to 0"},
      {0x0001, 0x0002, 0x0002, "1.5 x 2^-24: tie to even 2"},
      {0x0003, 0x0000, 0x0002, "1.5 x 2^-24 from one side"},
      {0x0001, 0x0001, 0x0001, "smallest subnormal"},
      {0x03FF, 0x03FF, 0x03FF, "largest subnormal"},
      {0x03FF, 0x0401, 0x0400, "subnormal and normal meet at 2^-14"},
      {0x8001, 0x8002, 0x8002, "negative subnormal tie"},
      {0x7BFF, 0x7BFF, 0x7BFF, "65504: the float32 sum does not overflow"},
      {0xFBFF, 0xFBFF, 0xFBFF, "-65504"},
      {0x7C00, 0x3C00, 0x7C00, "inf stays inf"},
      {0xFC00, 0x3C00, 0xFC00, "-inf stays -inf"},
      {0x7C00, 0xFC00, 0x7E00, "inf - inf is NaN"},
      {0x7E00, 0x3C00, 0x7E00, "NaN in, NaN out"},
      {0x7C01, 0x0000, 0x7E00, "signalling NaN stays NaN"},
      {0x8000, 0x8000, 0x8000, "-0 stays -0"},
      {0xC000, 0x4000, 0x0000, "-2 and 2: +0"},
  });
}

TEST(ReduceScatterMeanFormats, BFloat16KnownValues) {
  ExpectMeans(kBFloat16, {
      {0x3F80, 0x3F82, 0x3F81, "exact: 1 and 1+2^-6"},
      {0x3F80, 0x3F81, 0x3F80, "tie 1+2^-8 to even below"},
      {0x3F81, 0x3F82, 0x3F82, "tie to even above"},
      {0x0001, 0x0000, 0x0000, "half the smallest subnormal: tie to 0"},
      {0x0001, 0x0002, 0x0002, "subnormal tie to even"},
      {0x007F, 0x0081, 0x0080, "subnormal and normal meet"},
      {0x7E80, 0x7E81, 0x7E80, "2^126: tie to even below"},
      {0x7F7F, 0x0000, 0x7EFF, "half the largest finite"},
      {0x7F80, 0x3F80, 0x7F80, "inf stays inf"},
      {0xFF80, 0x3F80, 0xFF80, "-inf stays -inf"},
      {0x7F80, 0xFF80, 0x7FC0, "inf - inf is NaN"},
      {0x7FC0, 0x3F80, 0x7FC0, "NaN in, NaN out"},
      {0x7F81, 0x0000, 0x7FC0, "signalling NaN stays NaN"},
      {0x8000, 0x8000, 0x8000, "-0 stays -0"},
      {0xC000, 0x4000, 0x0000, "-2 and 2: +0"},
  });
}

// Random finite inputs over 2 and 4 ranks against the reference. Half of
// them are near neighbours, which makes exact ties and near-ties common.
void ExpectMatchesReference(const Format& f, uint32_t world) {
  constexpr uint64_t kElems = 20000;  // per rank
  std::mt19937 rng(1234 + world);
  auto finite = [&] {
    for (;;) {
      const auto bits = static_cast<uint16_t>(rng());
      if (IsFinite(f, bits)) return bits;
    }
  };
  std::vector<std::vector<uint16_t>> inputs(world, std::vector<uint16_t>(kElems * world));
  for (uint64_t i = 0; i < kElems * world; ++i) {
    const uint16_t base = finite();
    for (uint32_t r = 0; r < world; ++r) {
      uint16_t v = base;
      if (i % 2 == 0) {
        const auto near = static_cast<uint16_t>(base ^ (rng() & 7));
        if (IsFinite(f, near)) v = near;
      } else {
        v = finite();
      }
      inputs[r][i] = v;
    }
  }
  auto out = RunMean(f, world, inputs);
  for (uint32_t r = 0; r < world; ++r) {
    for (uint64_t k = 0; k < kElems; ++k) {
      std::vector<uint16_t> in(world);
      for (uint32_t j = 0; j < world; ++j) in[j] = inputs[j][r * kElems + k];
      const uint16_t want = ReferenceMean(f, in);
      ASSERT_EQ(out[r][k], want) << "rank " << r << " element " << k << std::hex
                                 << ": inputs 0x" << in[0] << ", 0x" << in[1] << "...";
    }
  }
}

TEST(ReduceScatterMeanFormats, Float16MatchesReference) {
  ExpectMatchesReference(kHalf, 2);
  ExpectMatchesReference(kHalf, 4);
}
TEST(ReduceScatterMeanFormats, BFloat16MatchesReference) {
  ExpectMatchesReference(kBFloat16, 2);
  ExpectMatchesReference(kBFloat16, 4);
}

// ---- disagreements and departures ----

constexpr auto kFailLimit = std::chrono::seconds(60);

// After a failed collective, every later call on every rank fails, and
// nothing blocks.
void ExpectGroupFailed(RankEnv& env, const std::string& needle) {
  auto host = env.coll().AllGatherHost(1);
  EXPECT_FALSE(host.ok());
  EXPECT_NE(host.status().message().find(needle), std::string::npos)
      << host.status().ToString();
  uint8_t* part = env.Alloc(16);
  uint8_t* full = env.Alloc(16 * env.coll().world_size());
  Status s = env.coll().AllGather(part, full, 16, env.stream());
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find(needle), std::string::npos) << s.ToString();
}

TEST(LocalCollectiveFailure, PartBytesMismatchIsReportedNotCopied) {
  Group g(2);
  g.Run(
      [&](RankEnv& env, uint32_t r) {
        const uint64_t bytes = r == 0 ? 64 : 128;
        uint8_t* part = env.Alloc(bytes);
        uint8_t* full = env.Alloc(bytes * 2);
        FillPattern(part, bytes, Seed(r));
        std::memset(full, 0xEE, bytes * 2);
        // Enqueued fine: the disagreement shows when the ranks meet.
        ASSERT_OK(env.coll().AllGather(part, full, bytes, env.stream()));
        ASSERT_OK(env.Wait());
        for (uint64_t i = 0; i < bytes * 2; ++i) {
          ASSERT_EQ(full[i], 0xEE) << "rank " << r << " byte " << i << " was written";
        }
        ExpectGroupFailed(env, "part_bytes");
      },
      kFailLimit);
}

TEST(LocalCollectiveFailure, DTypeMismatchIsReported) {
  Group g(2);
  g.Run(
      [&](RankEnv& env, uint32_t r) {
        const DType dtype = r == 0 ? DType::kFloat32 : DType::kFloat16;
        uint8_t* full = env.Alloc(2 * 16 * 4);
        uint8_t* part = env.Alloc(16 * 4);
        std::memset(part, 0xEE, 16 * 4);
        ASSERT_OK(env.coll().ReduceScatterMean(full, part, 16, dtype, env.stream()));
        ASSERT_OK(env.Wait());
        for (int i = 0; i < 16 * 4; ++i) ASSERT_EQ(part[i], 0xEE);
        ExpectGroupFailed(env, "dtype");
      },
      kFailLimit);
}

TEST(LocalCollectiveFailure, DifferentOperationsAreReported) {
  Group g(2);
  g.Run(
      [&](RankEnv& env, uint32_t r) {
        if (r == 0) {
          uint8_t* part = env.Alloc(32);
          uint8_t* full = env.Alloc(64);
          ASSERT_OK(env.coll().AllGather(part, full, 32, env.stream()));
          ASSERT_OK(env.Wait());
        } else {
          // Blocks until rank 0's stream gets there, then fails.
          auto values = env.coll().AllGatherHost(7);
          EXPECT_FALSE(values.ok());
          EXPECT_NE(values.status().message().find("AllGatherHost"), std::string::npos)
              << values.status().ToString();
        }
        ExpectGroupFailed(env, "disagree");
      },
      kFailLimit);
}

// Rank 1 issues one collective fewer than rank 0 and goes away: rank 0's
// second collective can never complete, and must fail instead of hanging.
TEST(LocalCollectiveFailure, RankLeavingReleasesWaiters) {
  Group g(2);
  g.Run(
      [&](RankEnv& env, uint32_t r) {
        uint8_t* part = env.Alloc(32);
        uint8_t* full = env.Alloc(64);
        ASSERT_OK(env.coll().AllGather(part, full, 32, env.stream()));
        if (r == 0) {
          uint8_t* full2 = env.Alloc(64);
          ASSERT_OK(env.coll().AllGather(part, full2, 32, env.stream()));
          ASSERT_OK(env.Wait());
          auto values = env.coll().AllGatherHost(0);
          EXPECT_FALSE(values.ok());
          EXPECT_NE(values.status().message().find("left the group"), std::string::npos)
              << values.status().ToString();
        } else {
          ASSERT_OK(env.Wait());
          env.DropCollective();
        }
      },
      kFailLimit);
}

// ---- nccl ----

// The argument checks answer without a GPU; built without NCCL everything is
// Unavailable.
TEST(NcclCollective, RejectsWhatItCannotUse) {
  RankEnv env(nullptr, 0);
  std::vector<uint8_t> id(128, 0);
  auto bad_device = CreateNcclCollective(id.data(), id.size(), 0, 1, env.dev());
  EXPECT_FALSE(bad_device.ok());
  auto bad_id = CreateNcclCollective(id.data(), 5, 0, 1, env.dev());
  EXPECT_FALSE(bad_id.ok());
  auto bad_rank = CreateNcclCollective(id.data(), id.size(), 1, 1, env.dev());
  EXPECT_FALSE(bad_rank.ok());
  EXPECT_FALSE(WrapNcclCommunicator(nullptr, env.dev()).ok());
  std::string why;
  if (!NcclAvailable(&why)) {
    EXPECT_FALSE(why.empty());
  }
}

// One rank on GPU 0: the gathers and the mean of one rank are the inputs.
TEST(NcclCollective, OneRankRoundTrip) {
  std::string why;
  if (!NcclAvailable(&why)) GTEST_SKIP() << "NCCL cannot run here: " << why;
  auto dev_or = tiering::CreateCudaDeviceBackend(0);
  ASSERT_TRUE(dev_or.ok()) << dev_or.status().ToString();
  std::unique_ptr<DeviceBackend> dev = std::move(dev_or).value();
  auto id = NcclUniqueId();
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  ASSERT_EQ(id->size(), 128u);
  auto coll_or = CreateNcclCollective(id->data(), id->size(), 0, 1, dev.get());
  ASSERT_TRUE(coll_or.ok()) << coll_or.status().ToString();
  std::unique_ptr<Collective> coll = std::move(coll_or).value();
  EXPECT_EQ(coll->name(), "nccl");
  EXPECT_EQ(coll->rank(), 0u);
  EXPECT_EQ(coll->world_size(), 1u);

  auto stream_or = dev->CreateStream();
  ASSERT_TRUE(stream_or.ok()) << stream_or.status().ToString();
  const StreamHandle stream = stream_or.value();
  constexpr uint64_t kBytes = 4096 + 4;  // a whole number of float32 and float16
  std::vector<void*> allocs;
  auto alloc = [&](uint64_t bytes) -> void* {
    auto p = dev->Alloc(bytes, StreamHandle{});
    EXPECT_TRUE(p.ok()) << p.status().ToString();
    if (!p.ok()) return nullptr;
    allocs.push_back(p.value());
    return p.value();
  };
  void* part = alloc(kBytes);
  void* full = alloc(kBytes);
  ASSERT_NE(part, nullptr);
  ASSERT_NE(full, nullptr);

  // AllGather.
  std::vector<uint8_t> in(kBytes), out(kBytes, 0);
  FillPattern(in.data(), kBytes, Seed(0));
  ASSERT_OK(dev->MemcpyH2DAsync(part, in.data(), kBytes, stream));
  ASSERT_OK(dev->MemsetAsync(full, 0, kBytes, stream));
  ASSERT_OK(coll->AllGather(part, full, kBytes, stream));
  ASSERT_OK(dev->MemcpyD2HAsync(out.data(), full, kBytes, stream));
  ASSERT_OK(dev->StreamSynchronize(stream));
  EXPECT_EQ(FirstMismatch(out.data(), kBytes, Seed(0)), -1);
  // In place.
  ASSERT_OK(coll->AllGather(full, full, kBytes, stream));
  std::fill(out.begin(), out.end(), 0);
  ASSERT_OK(dev->MemcpyD2HAsync(out.data(), full, kBytes, stream));
  ASSERT_OK(dev->StreamSynchronize(stream));
  EXPECT_EQ(FirstMismatch(out.data(), kBytes, Seed(0)), -1);

  // ReduceScatterMean over one rank: the values themselves.
  std::vector<float> values(kBytes / 4);
  for (size_t i = 0; i < values.size(); ++i) values[i] = 0.25f * static_cast<float>(i) - 7.0f;
  std::vector<float> mean(values.size(), 0.0f);
  ASSERT_OK(dev->MemcpyH2DAsync(full, values.data(), kBytes, stream));
  ASSERT_OK(coll->ReduceScatterMean(full, part, values.size(), DType::kFloat32, stream));
  ASSERT_OK(dev->MemcpyD2HAsync(mean.data(), part, kBytes, stream));
  ASSERT_OK(dev->StreamSynchronize(stream));
  EXPECT_EQ(std::memcmp(mean.data(), values.data(), kBytes), 0);

  for (const Format& f : {kHalf, kBFloat16}) {
    std::vector<uint16_t> h(kBytes / 2), got(kBytes / 2, 0);
    std::mt19937 rng(7);
    for (auto& v : h) {
      do {
        v = static_cast<uint16_t>(rng());
      } while (IsNaN(f, v));
    }
    ASSERT_OK(dev->MemcpyH2DAsync(full, h.data(), kBytes, stream));
    ASSERT_OK(coll->ReduceScatterMean(full, part, h.size(), f.dtype, stream));
    ASSERT_OK(dev->MemcpyD2HAsync(got.data(), part, kBytes, stream));
    ASSERT_OK(dev->StreamSynchronize(stream));
    EXPECT_EQ(got, h) << DTypeName(f.dtype);
  }

  auto host = coll->AllGatherHost(0x1234567890ULL);
  ASSERT_TRUE(host.ok()) << host.status().ToString();
  EXPECT_EQ(*host, std::vector<uint64_t>{0x1234567890ULL});

  ASSERT_OK(dev->StreamSynchronize(stream));
  coll.reset();
  for (void* p : allocs) EXPECT_OK(dev->Free(p, StreamHandle{}));
  EXPECT_OK(dev->DestroyStream(stream));
}

// A rank that fails before joining (its runtime could not be built) is
// aborted by the runner: the others' collectives fail instead of waiting.
TEST(LocalGroupAbort, ARankThatNeverJoinedReleasesTheOthers) {
  auto group = LocalGroup::Create(2);
  ASSERT_NE(group, nullptr);
  auto dev = tiering::CreateHostDeviceBackend();
  ASSERT_TRUE(dev.ok());
  auto rank0 = group->Join(0, dev->get());
  ASSERT_TRUE(rank0.ok());
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  Status result;
  std::thread waiter([&] {
    auto r = (*rank0)->AllGatherHost(7);
    std::lock_guard<std::mutex> lock(mu);
    result = r.ok() ? Status::Ok() : r.status();
    done = true;
    cv.notify_all();
  });
  group->Abort(1);
  std::unique_lock<std::mutex> lock(mu);
  const bool finished = cv.wait_for(lock, std::chrono::seconds(30), [&] { return done; });
  lock.unlock();
  if (!finished) {
    fprintf(stderr, "AllGatherHost still waiting 30 s after Abort: a hang\n");
    std::abort();
  }
  waiter.join();
  EXPECT_FALSE(result.ok());
  EXPECT_NE(result.message().find("rank 1"), std::string_view::npos) << result.ToString();
}

}  // namespace
}  // namespace ztier::coordinator
