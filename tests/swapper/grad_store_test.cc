// The gradient store against real files on every backend: Put/Read round
// trips for every dtype and odd sizes; accumulation equals AccumulateGrad;
// the squared norm Put reports is that of what is stored; a staging bound
// smaller than one partition still works; many writes in flight; a failed
// write is latched (the next Put, Read and Flush return it) until Clear();
// a failed read-back while accumulating changes nothing. Runs under ASan in
// CI's sanitizer job too (staging buffers freed on every path).
#include "swapper/grad_store.h"

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "base/float16.h"
#include "io/fault_backend.h"
#include "optim/grad_math.h"
#include "tests/testutil/faulty_engine.h"
#include "tests/testutil/testutil.h"

namespace ztier::swapper {
namespace {

using optim::DType;
using ztier::testing::ScratchDir;

constexpr uint64_t kKiB = 1024;

// n random elements of type t (normal values over a wide range of scales),
// as raw bytes.
std::vector<uint8_t> RandomGrad(uint64_t seed, DType t, uint64_t n) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<uint8_t> out(n * optim::DTypeBytes(t));
  for (uint64_t i = 0; i < n; ++i) {
    const float f = std::ldexp(nd(rng), static_cast<int>(rng() % 16) - 8);
    if (t == DType::kF32) {
      memcpy(out.data() + 4 * i, &f, 4);
    } else {
      const uint16_t h = t == DType::kF16 ? FloatToHalf(f) : FloatToBf16(f);
      memcpy(out.data() + 2 * i, &h, 2);
    }
  }
  return out;
}

// Index of the first differing byte, or -1.
int64_t FirstDiff(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
  if (a.size() != b.size()) return 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] != b[i]) return static_cast<int64_t>(i);
  }
  return -1;
}

class GradStoreTest : public ::testing::TestWithParam<io::BackendKind> {
 protected:
  void SetUp() override {
    auto probe = io::CreateBackend(GetParam(), io::BackendOptions{});
    if (!probe.ok()) GTEST_SKIP() << probe.status().ToString();
  }

  void Build(std::vector<GradSegment> segments, uint64_t staging_bytes = 64 << 20,
             std::vector<io::Fault> faults = {}) {
    store_.reset();
    engine_.reset();
    segments_ = std::move(segments);
    engine_ = ztier::testing::MakeFaultyAsyncEngine(
        GetParam(), faults, io::EngineOptions{.block_size = 64 * kKiB, .queue_depth = 8}, &fault_);
    ASSERT_TRUE(engine_);
    StoreOptions so;
    so.paths = {dir_.File("nvme")};
    so.stripe_bytes = 64 * kKiB;
    auto gs = GradStore::Create(so, segments_, engine_.get(), staging_bytes);
    ASSERT_TRUE(gs.ok()) << gs.status().ToString();
    store_ = std::move(gs).value();
  }

  void TearDown() override {
    store_.reset();  // before the engine it borrows
    engine_.reset();
  }

  std::vector<uint8_t> Grad(uint32_t k, uint64_t seed) const {
    return RandomGrad(seed, segments_[k].dtype, segments_[k].numel);
  }

  // Reads segment k back; the bytes after the partition in `out` must stay.
  std::vector<uint8_t> ReadBack(uint32_t k) {
    const uint64_t bytes = segments_[k].numel * optim::DTypeBytes(segments_[k].dtype);
    std::vector<uint8_t> out(bytes + 64, 0xa5);
    Status s = store_->Read(k, out.data());
    EXPECT_TRUE(s.ok()) << s.ToString();
    for (uint64_t i = bytes; i < out.size(); ++i) {
      EXPECT_EQ(out[i], 0xa5) << "Read wrote past the partition of segment " << k;
      if (out[i] != 0xa5) break;
    }
    out.resize(bytes);
    return out;
  }

  ScratchDir dir_;
  std::vector<GradSegment> segments_;
  std::unique_ptr<io::AsyncEngine> engine_;
  io::FaultInjectingBackend* fault_ = nullptr;
  std::unique_ptr<GradStore> store_;
};

// Odd sizes, every dtype: under and over one 4096-byte block, exactly
// two blocks, and one (280000 bytes) split into several 64 KiB requests.
std::vector<GradSegment> OddSegments() {
  return {{1, DType::kF32},     {1023, DType::kF32}, {2049, DType::kF16}, {5, DType::kBF16},
          {4096, DType::kBF16}, {3, DType::kF16},    {70001, DType::kF32}, {33333, DType::kBF16}};
}

TEST_P(GradStoreTest, PutReadRoundTripsEveryDtypeAndOddSize) {
  Build(OddSegments());
  ASSERT_EQ(store_->segment_count(), segments_.size());
  // Extents: aligned, in segment order, not overlapping.
  for (uint32_t k = 0; k < segments_.size(); ++k) {
    EXPECT_EQ(store_->ByteOffset(k, 0) % store_->alignment(), 0u) << k;
    if (k > 0) {
      EXPECT_GE(store_->ByteOffset(k, 0),
                store_->ByteOffset(k - 1, segments_[k - 1].numel)) << k;
    }
    EXPECT_EQ(store_->ByteOffset(k, 3) - store_->ByteOffset(k, 0),
              3u * optim::DTypeBytes(segments_[k].dtype));
  }
  std::vector<std::vector<uint8_t>> want(segments_.size());
  for (uint32_t k = 0; k < segments_.size(); ++k) {
    want[k] = Grad(k, 100 + k);
    double norm = -1;
    std::vector<uint8_t> data = want[k];
    ASSERT_TRUE(store_->Put(k, data.data(), false, &norm).ok());
    // Put returns once `data` may be reused: scribbling on it now must not
    // change what is stored.
    std::fill(data.begin(), data.end(), 0xee);
    EXPECT_EQ(norm, optim::SumSquares(want[k].data(), segments_[k].numel, segments_[k].dtype))
        << k;
  }
  // Read waits for the segment's own write; no Flush needed.
  for (uint32_t k = 0; k < segments_.size(); ++k) {
    EXPECT_EQ(FirstDiff(ReadBack(k), want[k]), -1) << "segment " << k;
  }
  ASSERT_TRUE(store_->Flush().ok());
  // Overwriting (accumulate = false) replaces, and a null sq_norm is fine.
  for (uint32_t k = 0; k < segments_.size(); k += 2) {
    want[k] = Grad(k, 200 + k);
    ASSERT_TRUE(store_->Put(k, want[k].data(), false, nullptr).ok());
  }
  ASSERT_TRUE(store_->Flush().ok());
  for (uint32_t k = 0; k < segments_.size(); ++k) {
    EXPECT_EQ(FirstDiff(ReadBack(k), want[k]), -1) << "segment " << k;
  }
}

TEST_P(GradStoreTest, AccumulateEqualsAccumulateGrad) {
  Build(OddSegments());
  for (uint32_t k = 0; k < segments_.size(); ++k) {
    const GradSegment& seg = segments_[k];
    SCOPED_TRACE(::testing::Message() << "segment " << k);
    std::vector<uint8_t> want = Grad(k, 300 + k);
    ASSERT_TRUE(store_->Put(k, want.data(), false, nullptr).ok());
    // Three more micro-batches, each accumulated right away (the previous
    // write may still be in flight: the read-back must wait for it).
    for (uint64_t mb = 1; mb <= 3; ++mb) {
      const std::vector<uint8_t> g = Grad(k, 300 + k + 1000 * mb);
      optim::AccumulateGrad(want.data(), g.data(), seg.numel, seg.dtype);
      double norm = -1;
      ASSERT_TRUE(store_->Put(k, g.data(), true, &norm).ok());
      EXPECT_EQ(norm, optim::SumSquares(want.data(), seg.numel, seg.dtype)) << "batch " << mb;
    }
    EXPECT_EQ(FirstDiff(ReadBack(k), want), -1);
  }
  ASSERT_TRUE(store_->Flush().ok());
}

// The norm is that of what is stored, inf / NaN included (what loss scaling
// looks at to skip a step).
TEST_P(GradStoreTest, NormOfStoredSumIsNotFiniteWhenTheSumOverflows) {
  Build({{9, DType::kF16}});
  std::vector<uint16_t> a(9, 0x3c00), b(9, 0x3c00);  // 1.0
  a[8] = 0x7bff;                                      // 65504: + 65504 overflows
  b[8] = 0x7bff;
  double norm = 0;
  ASSERT_TRUE(store_->Put(0, a.data(), false, &norm).ok());
  EXPECT_EQ(norm, 8.0 + 65504.0 * 65504.0);
  ASSERT_TRUE(store_->Put(0, b.data(), true, &norm).ok());
  EXPECT_TRUE(std::isinf(norm)) << norm;
  std::vector<uint16_t> got(9);
  ASSERT_TRUE(store_->Read(0, got.data()).ok());
  EXPECT_EQ(got[0], 0x4000);  // 2.0
  EXPECT_EQ(got[8], 0x7c00);  // inf
}

// A staging bound smaller than one partition: each Put runs alone (waits
// for the previous write) and everything still arrives. 0 works too.
TEST_P(GradStoreTest, StagingSmallerThanOnePartitionStillWorks) {
  for (uint64_t staging : {0ull, 1ull, 4096ull, 20000ull}) {
    SCOPED_TRACE(::testing::Message() << "staging " << staging);
    Build({{5000, DType::kF32}, {9000, DType::kBF16}, {1, DType::kF16}, {12345, DType::kF32}},
          staging);
    std::vector<std::vector<uint8_t>> want(segments_.size());
    for (int round = 0; round < 3; ++round) {
      for (uint32_t k = 0; k < segments_.size(); ++k) {
        const std::vector<uint8_t> g = Grad(k, 400 + 10 * round + k);
        if (round == 0) {
          want[k] = g;
        } else {
          optim::AccumulateGrad(want[k].data(), g.data(), segments_[k].numel, segments_[k].dtype);
        }
        ASSERT_TRUE(store_->Put(k, g.data(), round > 0, nullptr).ok());
      }
    }
    ASSERT_TRUE(store_->Flush().ok());
    for (uint32_t k = 0; k < segments_.size(); ++k) {
      EXPECT_EQ(FirstDiff(ReadBack(k), want[k]), -1) << "segment " << k;
    }
  }
}

// Many writes in flight at once (a staging bound that holds them all), the
// same segment overwritten while its write is in flight (the last wins),
// then one Flush.
TEST_P(GradStoreTest, ManyPutsInFlightThenFlush) {
  std::vector<GradSegment> segs;
  for (uint32_t k = 0; k < 96; ++k) {
    segs.push_back({1 + 37ull * k, static_cast<DType>(k % 3)});
  }
  Build(segs, 1ull << 30);
  std::vector<std::vector<uint8_t>> want(segments_.size());
  for (int round = 0; round < 2; ++round) {
    for (uint32_t k = 0; k < segments_.size(); ++k) {
      want[k] = Grad(k, 500 + 1000 * round + k);
      ASSERT_TRUE(store_->Put(k, want[k].data(), false, nullptr).ok());
    }
  }
  ASSERT_TRUE(store_->Flush().ok());
  for (uint32_t k = 0; k < segments_.size(); ++k) {
    EXPECT_EQ(FirstDiff(ReadBack(k), want[k]), -1) << "segment " << k;
  }
  EXPECT_GE(fault_->ops_seen(io::Op::kWrite), 2 * segments_.size());
}

// Destroying the store with writes in flight waits for them and frees their
// staging buffers (ASan's leak check), and so does one with a latched error.
TEST_P(GradStoreTest, DestroyedWithWritesInFlight) {
  Build(OddSegments(), 64 << 20, {{io::FaultKind::kEio, 3, 1, io::Op::kWrite}});
  for (uint32_t k = 0; k < segments_.size(); ++k) {
    const std::vector<uint8_t> g = Grad(k, 600 + k);
    Status s = store_->Put(k, g.data(), false, nullptr);
    // The failed write may already be latched for a later Put.
    if (!s.ok()) {
      EXPECT_EQ(s.code(), StatusCode::kIoError) << s.ToString();
    }
  }
  store_.reset();
  EXPECT_EQ(fault_->faults_injected(), 1u);
}

TEST_P(GradStoreTest, SegmentOutOfRangeIsRefused) {
  Build({{10, DType::kF32}});
  std::vector<float> g(10, 1.0f);
  EXPECT_EQ(store_->Put(1, g.data(), false, nullptr).code(), StatusCode::kInternal);
  EXPECT_EQ(store_->Read(1, g.data()).code(), StatusCode::kInternal);
  EXPECT_TRUE(store_->Flush().ok());
}

// A failed write (EIO, ENOSPC) is latched: the next Put (of any segment),
// Read and Flush return it, naming "write gradient partition <k>", until
// Clear(); then new Puts work.
TEST_P(GradStoreTest, FailedWriteIsLatchedUntilClear) {
  struct Case {
    io::FaultKind kind;
    StatusCode code;
  };
  for (const Case& c : {Case{io::FaultKind::kEio, StatusCode::kIoError},
                        Case{io::FaultKind::kEnospc, StatusCode::kResourceExhausted}}) {
    SCOPED_TRACE(c.kind == io::FaultKind::kEio ? "EIO" : "ENOSPC");
    // Partitions under one 64 KiB request: write k is op k. Hit segment 1's.
    Build({{100, DType::kF32}, {3000, DType::kBF16}, {7, DType::kF16}}, 64 << 20,
          {{c.kind, 1, 1, io::Op::kWrite}});
    const std::vector<uint8_t> g0 = Grad(0, 1), g1 = Grad(1, 2), g2 = Grad(2, 3);
    ASSERT_TRUE(store_->Put(0, g0.data(), false, nullptr).ok());
    // Its own write fails in the background: this Put itself succeeds.
    ASSERT_TRUE(store_->Put(1, g1.data(), false, nullptr).ok());
    auto expect_latched = [&](const Status& s, const char* what) {
      EXPECT_EQ(s.code(), c.code) << what << ": " << s.ToString();
      EXPECT_NE(s.message().find("write gradient partition 1"), std::string::npos)
          << what << ": " << s.ToString();
    };
    std::vector<uint8_t> out(g1.size());
    // Read of segment 1 waits for its write: the error, whatever the timing.
    expect_latched(store_->Read(1, out.data()), "Read(1)");
    // Latched for every segment and every call from now on.
    expect_latched(store_->Read(0, out.data()), "Read(0)");
    expect_latched(store_->Put(2, g2.data(), false, nullptr), "Put(2)");
    expect_latched(store_->Put(0, g0.data(), true, nullptr), "Put(0, accumulate)");
    expect_latched(store_->Flush(), "Flush");
    expect_latched(store_->Flush(), "Flush again");
    EXPECT_EQ(fault_->faults_injected(), 1u);
    // Clear forgets the error: Puts, Reads and Flush work again.
    store_->Clear();
    const std::vector<uint8_t> h1 = Grad(1, 4), h2 = Grad(2, 5);
    double norm = -1;
    ASSERT_TRUE(store_->Put(1, h1.data(), false, &norm).ok());
    EXPECT_EQ(norm, optim::SumSquares(h1.data(), segments_[1].numel, segments_[1].dtype));
    ASSERT_TRUE(store_->Put(2, h2.data(), false, nullptr).ok());
    ASSERT_TRUE(store_->Flush().ok());
    EXPECT_EQ(FirstDiff(ReadBack(1), h1), -1);
    EXPECT_EQ(FirstDiff(ReadBack(2), h2), -1);
  }
}

// A failed write of an accumulated partition is latched like any other.
TEST_P(GradStoreTest, FailedAccumulatedWriteIsLatched) {
  Build({{1000, DType::kF32}}, 64 << 20, {{io::FaultKind::kEio, 1, 1, io::Op::kWrite}});
  const std::vector<uint8_t> a = Grad(0, 1), b = Grad(0, 2);
  ASSERT_TRUE(store_->Put(0, a.data(), false, nullptr).ok());
  ASSERT_TRUE(store_->Put(0, b.data(), true, nullptr).ok());
  Status s = store_->Flush();
  EXPECT_EQ(s.code(), StatusCode::kIoError) << s.ToString();
  EXPECT_NE(s.message().find("write gradient partition 0"), std::string::npos) << s.ToString();
  store_->Clear();
  EXPECT_TRUE(store_->Flush().ok());
}

// The read-back of an accumulating Put fails: that Put fails naming the
// read, nothing is latched, and the stored partition is unchanged.
TEST_P(GradStoreTest, FailedReadBackFailsOnlyThatPut) {
  Build({{1000, DType::kBF16}, {10, DType::kF32}}, 64 << 20,
        {{io::FaultKind::kEio, 0, 1, io::Op::kRead}});
  const std::vector<uint8_t> a = Grad(0, 1), b = Grad(0, 2);
  ASSERT_TRUE(store_->Put(0, a.data(), false, nullptr).ok());
  double norm = -1;
  Status s = store_->Put(0, b.data(), true, &norm);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kIoError) << s.ToString();
  EXPECT_NE(s.message().find("read gradient partition 0"), std::string::npos) << s.ToString();
  EXPECT_TRUE(store_->Flush().ok());
  EXPECT_EQ(FirstDiff(ReadBack(0), a), -1);
  // And the next accumulation works.
  std::vector<uint8_t> want = a;
  optim::AccumulateGrad(want.data(), b.data(), 1000, DType::kBF16);
  ASSERT_TRUE(store_->Put(0, b.data(), true, &norm).ok());
  EXPECT_EQ(norm, optim::SumSquares(want.data(), 1000, DType::kBF16));
  EXPECT_EQ(FirstDiff(ReadBack(0), want), -1);
}

// A segment of 0 elements (Create accepts it) stores nothing: its Put and
// Read succeed without a transfer (the engine refuses 0-byte ones) and the
// store is not poisoned for the other segments.
TEST_P(GradStoreTest, EmptySegmentIsANoOp) {
  Build({{0, DType::kF32}, {10, DType::kF32}, {0, DType::kBF16}});
  const std::vector<uint8_t> g = Grad(1, 7);
  double norm = -1;
  Status s = store_->Put(0, g.data(), false, &norm);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(norm, 0.0);
  ASSERT_TRUE(store_->Put(2, g.data(), true, nullptr).ok());
  ASSERT_TRUE(store_->Put(1, g.data(), false, nullptr).ok());
  ASSERT_TRUE(store_->Flush().ok());
  uint8_t untouched = 0x5a;
  ASSERT_TRUE(store_->Read(0, &untouched).ok());
  EXPECT_EQ(untouched, 0x5a);
  EXPECT_EQ(FirstDiff(ReadBack(1), g), -1);
}

INSTANTIATE_TEST_SUITE_P(Backends, GradStoreTest,
                         ::testing::Values(io::BackendKind::kIoUring, io::BackendKind::kLibaio,
                                           io::BackendKind::kPsync),
                         [](const auto& info) { return std::string(io::BackendKindName(info.param)); });

}  // namespace
}  // namespace ztier::swapper
