// The optimizer-state swapper against real files on every backend: the
// pipelined step equals the update applied to whole partitions in memory,
// bit for bit, for any sub-group size and buffer count; a failed step (EIO,
// ENOSPC, a short write that ends in ENOSPC, a failing parameter sink)
// commits nothing and can be repeated; a torn or stale slot is reported as
// corruption; no buffer is kept past a step.
#include "swapper/optimizer_swapper.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <condition_variable>
#include <map>
#include <mutex>
#include <thread>
#include <set>
#include <random>
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

// A segment's whole state in memory: the reference the swapper must match.
struct RefState {
  std::vector<float> master, m, v;
  std::vector<uint8_t> param;  // numel x dtype bytes
  uint64_t updates = 0;        // steps that updated it: its bias-correction step
};

uint16_t Encode16(float f, DType t) {
  return t == DType::kF16 ? FloatToHalf(f) : FloatToBf16(f);
}

class OptimizerSwapperTest : public ::testing::TestWithParam<io::BackendKind> {
 protected:
  void SetUp() override {
    auto probe = io::CreateBackend(GetParam(), io::BackendOptions{});
    if (!probe.ok()) GTEST_SKIP() << probe.status().ToString();
  }

  // Segments: odd sizes, every dtype; with a sub-group of 1000 elements some
  // straddle sub-groups and some share one.
  void Build(uint32_t buffer_count, uint64_t sub_group, std::vector<io::Fault> faults = {},
             std::vector<OptimizerSegment> segs = {}) {
    if (segs.empty()) {
      segs = {{10, 1, DType::kF32},    {11, 999, DType::kF32}, {12, 2500, DType::kBF16},
              {13, 3, DType::kF16},    {14, 64, DType::kF32},  {15, 1001, DType::kF32},
              {16, 4097, DType::kBF16}};
    }
    segments_ = segs;
    engine_ = ztier::testing::MakeFaultyAsyncEngine(
        GetParam(), faults, io::EngineOptions{.block_size = 64 * kKiB, .queue_depth = 8}, &fault_);
    ASSERT_TRUE(engine_);
    OptimizerSwapperOptions o;
    o.store.paths = {dir_.File("nvme")};
    o.store.tag = "optimizer";
    o.store.stripe_bytes = 64 * kKiB;
    o.buffer_count = buffer_count;
    o.sub_group_size = sub_group;
    o.threads = 2;
    o.isa = optim::BestIsa();
    if (grads_on_store_) {
      o.grads_on_store = true;
      o.grad_store.paths = {dir_.File("grad")};
      o.grad_store.stripe_bytes = 64 * kKiB;
      o.grad_staging_bytes = grad_staging_bytes_;
    }
    auto sw = OptimizerSwapper::Create(o, segments_, engine_.get());
    ASSERT_TRUE(sw.ok()) << sw.status().ToString();
    sw_ = std::move(sw).value();
    InitReference();
    Status s = sw_->Initialize([this](uint64_t id, void* out) {
      memcpy(out, ref_[id].param.data(), ref_[id].param.size());
      return Status::Ok();
    });
    ASSERT_TRUE(s.ok()) << s.ToString();
  }

  void TearDown() override {
    if (sw_) {
      EXPECT_EQ(sw_->buffers_in_use(), 0u);
    }
    sw_.reset();
    engine_.reset();
  }

  void InitReference() {
    std::mt19937 rng(7);
    std::normal_distribution<float> nd(0.f, 1.f);
    for (const auto& s : segments_) {
      RefState r;
      r.master.resize(s.numel);
      r.m.assign(s.numel, 0.f);
      r.v.assign(s.numel, 0.f);
      r.param.resize(s.numel * optim::DTypeBytes(s.dtype));
      for (uint64_t i = 0; i < s.numel; ++i) {
        float f = nd(rng);
        if (s.dtype == DType::kF32) {
          memcpy(r.param.data() + 4 * i, &f, 4);
        } else {
          uint16_t h = Encode16(f, s.dtype);
          memcpy(r.param.data() + 2 * i, &h, 2);
          f = s.dtype == DType::kF16 ? HalfToFloat(h) : Bf16ToFloat(h);
        }
        r.master[i] = f;
      }
      ref_[s.id] = std::move(r);
    }
  }

  // Gradients for step `step` (deterministic), in each segment's dtype.
  void MakeGrads(uint64_t step) {
    std::mt19937 rng(1000 + step);
    std::normal_distribution<float> nd(0.f, 0.5f);
    for (const auto& s : segments_) {
      auto& g = grads_[s.id];
      g.resize(s.numel * optim::DTypeBytes(s.dtype));
      for (uint64_t i = 0; i < s.numel; ++i) {
        const float f = nd(rng) * (i % 7 == 0 ? 100.f : 1.f);
        if (s.dtype == DType::kF32) {
          memcpy(g.data() + 4 * i, &f, 4);
        } else {
          const uint16_t h = Encode16(f, s.dtype);
          memcpy(g.data() + 2 * i, &h, 2);
        }
      }
    }
  }

  // The reference step: the scalar update on each whole segment, with its
  // group's hyperparameters and its own count of updates (as torch counts
  // steps per parameter).
  void ReferenceStep(const std::vector<optim::AdamHyper>& hypers,
                     const std::set<uint64_t>& skip) {
    for (const auto& s : segments_) {
      if (skip.count(s.id)) continue;
      RefState& r = ref_[s.id];
      const auto c = optim::MakeConstants(hypers.at(s.group), ++r.updates);
      optim::AdamSpan span;
      span.master = r.master.data();
      span.exp_avg = r.m.data();
      span.exp_avg_sq = r.v.data();
      span.grad = grads_[s.id].data();
      span.grad_type = s.dtype;
      span.param_out = r.param.data();
      span.out_type = s.dtype;
      span.n = s.numel;
      optim::AdamUpdate(c, span, optim::Isa::kScalar);
    }
  }

  void ReferenceStep(const optim::AdamHyper& h, const std::set<uint64_t>& skip) {
    ReferenceStep(std::vector<optim::AdamHyper>{h}, skip);
  }

  // Runs the swapper's step; collects what the sink got.
  Status SwapperStep(const optim::AdamHyper& h, const std::set<uint64_t>& skip = {},
                     OptimizerSwapper::ParamSink sink = nullptr) {
    return SwapperStep(std::vector<optim::AdamHyper>{h}, skip, std::move(sink));
  }
  Status SwapperStep(const std::vector<optim::AdamHyper>& hypers,
                     const std::set<uint64_t>& skip = {},
                     OptimizerSwapper::ParamSink sink = nullptr) {
    sunk_.clear();
    if (!sink) sink = CollectingSink();
    Status s = sw_->Step(
        hypers,
        [&](uint64_t id) -> const void* {
          return skip.count(id) ? nullptr : grads_[id].data();
        },
        sink);
    // Every buffer is back once a step returns, failed steps included.
    EXPECT_EQ(sw_->buffers_in_use(), 0u) << s.ToString();
    return s;
  }

  // A sink that keeps what it gets in sunk_ (each parameter once).
  OptimizerSwapper::ParamSink CollectingSink() {
    return [this](std::span<const uint64_t> ids, std::span<const void* const> data) {
      for (size_t k = 0; k < ids.size(); ++k) {
        const auto& seg = Seg(ids[k]);
        const auto* p = static_cast<const uint8_t*>(data[k]);
        EXPECT_EQ(sunk_.count(ids[k]), 0u) << "parameter " << ids[k] << " sunk twice";
        sunk_[ids[k]].assign(p, p + seg.numel * optim::DTypeBytes(seg.dtype));
      }
      return Status::Ok();
    };
  }

  // With grads_on_store: hands grads_ to the swapper's gradient store
  // (segment k of the store is segments()[k]). `accumulate`: adds to what
  // the store holds.
  Status PutGrads(bool accumulate = false) {
    GradStore* store = sw_->grad_store();
    if (store == nullptr) return Status::Internal("no gradient store");
    for (uint32_t k = 0; k < sw_->segments().size(); ++k) {
      ZTIER_RETURN_IF_ERROR(
          store->Put(k, grads_.at(sw_->segments()[k].id).data(), accumulate, nullptr));
    }
    return Status::Ok();
  }

  // A step whose gradients are in the store: the source only says which
  // segments have one. Its pointers are decoys (bytes that decode to huge
  // values and NaNs): a step that read them would not match the reference.
  Status StoreStep(const optim::AdamHyper& h, const std::set<uint64_t>& skip,
                   OptimizerSwapper::StepPlan plan = {}) {
    sunk_.clear();
    std::map<uint64_t, std::vector<uint8_t>> decoys;
    for (const auto& seg : segments_) {
      decoys[seg.id].assign(seg.numel * optim::DTypeBytes(seg.dtype), 0x7f);
    }
    Status s = sw_->Step(
        std::span<const optim::AdamHyper>(&h, 1),
        [&](uint64_t id) -> Result<const void*> {
          return skip.count(id) ? nullptr : static_cast<const void*>(decoys.at(id).data());
        },
        CollectingSink(), plan);
    EXPECT_EQ(sw_->buffers_in_use(), 0u) << s.ToString();
    return s;
  }

  // What the sink got equals the reference parameters of every segment not
  // in `skip`, and nothing for those in it.
  void ExpectSunkMatches(const std::set<uint64_t>& skip) {
    for (const auto& seg : segments_) {
      if (skip.count(seg.id)) {
        EXPECT_EQ(sunk_.count(seg.id), 0u) << "parameter " << seg.id << " had no gradient";
        continue;
      }
      ASSERT_EQ(sunk_.count(seg.id), 1u) << "parameter " << seg.id;
      EXPECT_TRUE(sunk_[seg.id] == ref_[seg.id].param) << "parameter " << seg.id;
    }
  }

  const OptimizerSegment& Seg(uint64_t id) const {
    for (const auto& s : segments_) {
      if (s.id == id) return s;
    }
    ADD_FAILURE() << "no segment " << id;
    return segments_[0];
  }

  // The swapper's committed state equals the reference, bit for bit.
  // Step 2 from the gradients in the store, after a failed attempt: it
  // succeeds and equals the reference bit for bit (parameters and state).
  void ExpectStoreStepTwoMatches(const optim::AdamHyper& h) {
    ReferenceStep(h, {});
    Status again = StoreStep(h, {});
    ASSERT_TRUE(again.ok()) << again.ToString();
    EXPECT_EQ(sw_->step(), 2u);
    ExpectSunkMatches({});
    ExpectStateMatches();
  }

  void ExpectStateMatches() {
    for (const auto& s : segments_) {
      const RefState& r = ref_[s.id];
      std::vector<float> got(s.numel);
      for (auto [arr, want] : {std::pair{StateArray::kMaster, &r.master},
                               std::pair{StateArray::kExpAvg, &r.m},
                               std::pair{StateArray::kExpAvgSq, &r.v}}) {
        Status st = sw_->ReadState(s.id, arr, got.data());
        ASSERT_TRUE(st.ok()) << st.ToString();
        ASSERT_EQ(memcmp(got.data(), want->data(), s.numel * 4), 0)
            << "segment " << s.id << " array " << static_cast<int>(arr);
      }
    }
  }

  ScratchDir dir_;
  bool grads_on_store_ = false;  // Build(): OptimizerSwapperOptions::grads_on_store
  uint64_t grad_staging_bytes_ = 256ull << 20;
  std::vector<OptimizerSegment> segments_;
  std::unique_ptr<io::AsyncEngine> engine_;
  io::FaultInjectingBackend* fault_ = nullptr;
  std::unique_ptr<OptimizerSwapper> sw_;
  std::map<uint64_t, RefState> ref_;
  std::map<uint64_t, std::vector<uint8_t>> grads_;
  std::map<uint64_t, std::vector<uint8_t>> sunk_;
};

optim::AdamHyper Hyper(bool adamw = true) {
  optim::AdamHyper h;
  h.lr = 1e-2;
  h.weight_decay = 0.1;
  h.adamw = adamw;
  return h;
}

TEST_P(OptimizerSwapperTest, PipelinedStepEqualsWholePartitionUpdate) {
  for (uint32_t buffers : {1u, 2u, 4u}) {
    for (uint64_t sub_group : {1000ull, 4096ull, 1000000ull}) {
      SCOPED_TRACE(::testing::Message() << "buffers " << buffers << " sub_group " << sub_group);
      TearDown();
      ref_.clear();
      Build(buffers, sub_group);
      for (uint64_t step = 1; step <= 3; ++step) {
        MakeGrads(step);
        ReferenceStep(Hyper(step != 2), {});
        Status s = SwapperStep(Hyper(step != 2));
        ASSERT_TRUE(s.ok()) << s.ToString();
        EXPECT_EQ(sw_->step(), step);
        ASSERT_EQ(sunk_.size(), segments_.size());
        for (const auto& seg : segments_) {
          const auto& got = sunk_[seg.id];
          const auto& want = ref_[seg.id].param;
          ASSERT_EQ(got.size(), want.size());
          size_t first = 0;
          while (first < got.size() && got[first] == want[first]) ++first;
          ASSERT_EQ(first, got.size()) << "parameter " << seg.id << " differs at byte " << first;
        }
        const auto st = sw_->last_step_stats();
        EXPECT_LE(st.peak_buffers, buffers);
        EXPECT_EQ(st.sub_groups, sw_->sub_group_count());
        EXPECT_GT(st.bytes_read, 0u);
        EXPECT_EQ(st.bytes_read, st.bytes_written);
      }
      ExpectStateMatches();
    }
  }
}

TEST_P(OptimizerSwapperTest, SegmentWithoutGradientIsLeftAlone) {
  Build(2, 1000);
  MakeGrads(1);
  ReferenceStep(Hyper(), {12, 14});
  ASSERT_TRUE(SwapperStep(Hyper(), {12, 14}).ok());
  EXPECT_EQ(sunk_.count(12), 0u);
  EXPECT_EQ(sunk_.count(14), 0u);
  EXPECT_EQ(sunk_.size(), segments_.size() - 2);
  ExpectStateMatches();
}

// A segment first updated at step 2 gets step 1's bias correction (torch
// counts steps per parameter), and each parameter group its own
// hyperparameters.
TEST_P(OptimizerSwapperTest, BiasCorrectionCountsEachSegmentsUpdatesAndGroupsHaveTheirOwnHyper) {
  Build(2, 1000, {},
        {{10, 1, DType::kF32, 0}, {11, 999, DType::kF32, 1}, {12, 2500, DType::kBF16, 0},
         {13, 3, DType::kF16, 1}, {14, 64, DType::kF32, 2}, {15, 1001, DType::kF32, 0}});
  ASSERT_EQ(sw_->group_count(), 3u);
  std::vector<optim::AdamHyper> hypers(3, Hyper());
  hypers[1].lr = 3e-2;
  hypers[1].weight_decay = 0;
  hypers[2].lr = 5e-4;
  hypers[2].beta1 = 0.8;
  const std::set<uint64_t> late = {12, 14};
  for (uint64_t step = 1; step <= 3; ++step) {
    MakeGrads(step);
    const std::set<uint64_t> skip = step == 1 ? late : std::set<uint64_t>{};
    ReferenceStep(hypers, skip);
    Status s = SwapperStep(hypers, skip);
    ASSERT_TRUE(s.ok()) << s.ToString();
    ExpectStateMatches();
  }
  EXPECT_EQ(ref_[12].updates, 2u);
  EXPECT_EQ(ref_[10].updates, 3u);
  // One set per group, each valid.
  EXPECT_EQ(SwapperStep(Hyper()).code(), StatusCode::kInvalidArgument);
  hypers[2].eps = 0;
  Status bad = SwapperStep(hypers);
  EXPECT_EQ(bad.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.message().find("parameter group 2"), std::string::npos) << bad.ToString();
}

// A step begun before the gradients exist: sub-groups last to first, each
// gradient handed over by another thread (the source blocks until then),
// the commit deferred: Discard keeps the previous state, Commit gives the
// step the plain one gives.
TEST_P(OptimizerSwapperTest, ReverseBlockingGradientsAndDeferredCommit) {
  Build(2, 1000);
  MakeGrads(1);
  const OptimizerSwapper::StepPlan plan{.reverse = true, .defer_commit = true};
  std::vector<uint64_t> asked;
  std::mutex mu;
  std::condition_variable cv;
  std::set<uint64_t> released;
  auto source = [&](uint64_t id) -> Result<const void*> {
    std::unique_lock<std::mutex> lock(mu);
    asked.push_back(id);
    cv.wait(lock, [&] { return released.count(id) != 0; });
    return grads_.at(id).data();
  };
  auto sink = [this](std::span<const uint64_t> ids, std::span<const void* const> data) {
    for (size_t k = 0; k < ids.size(); ++k) {
      const auto& seg = Seg(ids[k]);
      const auto* p = static_cast<const uint8_t*>(data[k]);
      sunk_[ids[k]].assign(p, p + seg.numel * optim::DTypeBytes(seg.dtype));
    }
    return Status::Ok();
  };
  for (int attempt = 0; attempt < 2; ++attempt) {
    released.clear();
    asked.clear();
    sunk_.clear();
    std::thread feeder([&] {
      // Last segment first, as backward produces them.
      for (auto it = segments_.rbegin(); it != segments_.rend(); ++it) {
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
        std::lock_guard<std::mutex> lock(mu);
        released.insert(it->id);
        cv.notify_all();
      }
    });
    const optim::AdamHyper h = Hyper();
    Status st = sw_->Step(std::span<const optim::AdamHyper>(&h, 1), source, sink, plan);
    feeder.join();
    ASSERT_TRUE(st.ok()) << st.ToString();
    EXPECT_EQ(asked.front(), segments_.back().id);  // the last sub-group went first
    EXPECT_EQ(sunk_.size(), segments_.size());
    EXPECT_TRUE(sw_->commit_pending());
    EXPECT_EQ(sw_->step(), 0u);
    std::vector<float> out(segments_[0].numel);
    EXPECT_EQ(sw_->ReadState(segments_[0].id, StateArray::kMaster, out.data()).code(),
              StatusCode::kFailedPrecondition);
    EXPECT_EQ(SwapperStep(Hyper()).code(), StatusCode::kFailedPrecondition);
    if (attempt == 0) {
      ASSERT_TRUE(sw_->Discard().ok());
      ExpectStateMatches();  // still step 0's
    } else {
      ASSERT_TRUE(sw_->Commit().ok());
      ReferenceStep(Hyper(), {});
      ExpectStateMatches();
      EXPECT_EQ(sw_->step(), 1u);
    }
  }
  EXPECT_EQ(sw_->Commit().code(), StatusCode::kFailedPrecondition);
  // A source that fails (a cancelled step) fails the step; nothing pends.
  MakeGrads(2);
  const optim::AdamHyper h = Hyper();
  Status st = sw_->Step(
      std::span<const optim::AdamHyper>(&h, 1),
      [](uint64_t) -> Result<const void*> { return Status::Cancelled("stop"); }, sink, plan);
  EXPECT_EQ(st.code(), StatusCode::kCancelled) << st.ToString();
  EXPECT_FALSE(sw_->commit_pending());
  ExpectStateMatches();
}

// Reads are counted from 0: Initialize reads nothing and each step reads
// every sub-group once (one request per slot: slots are < block_size).
TEST_P(OptimizerSwapperTest, ReadErrorFailsTheStepAndKeepsThePreviousState) {
  Build(3, 1000);
  const uint32_t groups = sw_->sub_group_count();
  ASSERT_GE(groups, 4u);
  fault_->AddFault({io::FaultKind::kEio, groups + 2, 1, io::Op::kRead});
  MakeGrads(1);
  ReferenceStep(Hyper(), {});
  ASSERT_TRUE(SwapperStep(Hyper()).ok());
  MakeGrads(2);
  Status s = SwapperStep(Hyper());
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kIoError) << s.ToString();
  EXPECT_NE(s.message().find("optimizer step 2 failed and was not applied"), std::string::npos)
      << s.ToString();
  EXPECT_NE(s.message().find("the state of step 1 is intact"), std::string::npos);
  EXPECT_NE(s.message().find("sub-group 2"), std::string::npos) << s.ToString();
  EXPECT_EQ(sw_->step(), 1u);
  ExpectStateMatches();  // step 1, bit for bit
  // The same step again, now that the drive is fine, gives step 2.
  ReferenceStep(Hyper(), {});
  Status again = SwapperStep(Hyper());
  ASSERT_TRUE(again.ok()) << again.ToString();
  EXPECT_EQ(sw_->step(), 2u);
  for (const auto& seg : segments_) EXPECT_EQ(sunk_[seg.id], ref_[seg.id].param);
  ExpectStateMatches();
}

TEST_P(OptimizerSwapperTest, WriteErrorsFailTheStepAndKeepThePreviousState) {
  struct Case {
    const char* name;
    std::vector<io::FaultKind> kinds;  // consecutive writes hit
    StatusCode code;
    // Sub-groups whose write may carry the error. After a short write the
    // fault counter's next write is either the short write's continuation
    // (sub-group 2) or sub-group 3's own write, whichever the backend's
    // completion order submits first; both fail the step the same way.
    std::vector<const char*> blamed;
  };
  for (const Case& c :
       {Case{"ENOSPC", {io::FaultKind::kEnospc}, StatusCode::kResourceExhausted, {"2"}},
        Case{"EIO", {io::FaultKind::kEio}, StatusCode::kIoError, {"2"}},
        Case{"short then ENOSPC",
             {io::FaultKind::kShort, io::FaultKind::kEnospc},
             StatusCode::kResourceExhausted,
             {"2", "3"}}}) {
    SCOPED_TRACE(c.name);
    TearDown();
    ref_.clear();
    Build(3, 1000);
    const uint32_t groups = sw_->sub_group_count();
    // Writes: Initialize writes `groups`, step 1 `groups`; hit step 2's 3rd.
    for (size_t k = 0; k < c.kinds.size(); ++k) {
      fault_->AddFault({c.kinds[k], 2 * groups + 2 + k, 1, io::Op::kWrite});
    }
    MakeGrads(1);
    ReferenceStep(Hyper(), {});
    ASSERT_TRUE(SwapperStep(Hyper()).ok());
    MakeGrads(2);
    Status s = SwapperStep(Hyper());
    ASSERT_FALSE(s.ok());
    EXPECT_EQ(s.code(), c.code) << s.ToString();
    bool blamed = false;
    for (const char* g : c.blamed) {
      const std::string what = std::string("write optimizer state of sub-group ") + g + " at";
      blamed = blamed || s.message().find(what) != std::string::npos;
    }
    EXPECT_TRUE(blamed) << s.ToString();
    EXPECT_EQ(sw_->step(), 1u);
    ExpectStateMatches();
    ReferenceStep(Hyper(), {});
    ASSERT_TRUE(SwapperStep(Hyper()).ok());
    ExpectStateMatches();
  }
}

TEST_P(OptimizerSwapperTest, ShortWritesAloneAreContinued) {
  Build(2, 1000);
  const uint32_t groups = sw_->sub_group_count();
  fault_->AddFault({io::FaultKind::kShort, 2 * groups, 3, io::Op::kWrite});
  for (uint64_t step = 1; step <= 3; ++step) {
    MakeGrads(step);
    ReferenceStep(Hyper(), {});
    Status s = SwapperStep(Hyper());
    ASSERT_TRUE(s.ok()) << s.ToString();
  }
  EXPECT_GE(fault_->faults_injected(), 3u);
  ExpectStateMatches();
}

TEST_P(OptimizerSwapperTest, FailingParameterSinkFailsTheStep) {
  Build(2, 1000);
  MakeGrads(1);
  ReferenceStep(Hyper(), {});
  ASSERT_TRUE(SwapperStep(Hyper()).ok());
  MakeGrads(2);
  Status s = SwapperStep(Hyper(), {}, [](std::span<const uint64_t> ids,
                                         std::span<const void* const>) {
    for (uint64_t id : ids) {
      if (id == 15) return Status::IoError("parameter store is gone");
    }
    return Status::Ok();
  });
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("write updated parameter"), std::string::npos) << s.ToString();
  EXPECT_NE(s.message().find("15"), std::string::npos) << s.ToString();
  EXPECT_EQ(sw_->step(), 1u);
  ExpectStateMatches();
}

// Flips one byte of the committed slot of sub-group 1 in the file itself.
void CorruptFile(const std::string& path, uint64_t file_offset) {
  int fd = open(path.c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  uint8_t b = 0;
  ASSERT_EQ(pread(fd, &b, 1, file_offset), 1);
  b ^= 0x5a;
  ASSERT_EQ(pwrite(fd, &b, 1, file_offset), 1);
  close(fd);
}

TEST_P(OptimizerSwapperTest, TornSlotIsReportedAsCorruption) {
  Build(2, 1000);
  MakeGrads(1);
  ASSERT_TRUE(SwapperStep(Hyper()).ok());
  // Step 1 lives in slot 1 of each sub-group; with one path, logical offset
  // o is file offset 4096 + o. Slots are laid out g0s0 g0s1 g1s0 g1s1 ...
  const uint64_t slot = sw_->slot_bytes();  // all full sub-groups: same size
  const uint64_t sub_group1_slot1 = 3 * slot;
  CorruptFile(sw_->store().file_paths()[0], kStoreHeaderBytes + sub_group1_slot1 + 4096 + 100);
  MakeGrads(2);
  Status s = SwapperStep(Hyper());
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kCorruption) << s.ToString();
  EXPECT_NE(s.message().find("sub-group 1"), std::string::npos) << s.ToString();
  EXPECT_NE(s.message().find("fails its CRC32C"), std::string::npos) << s.ToString();
  EXPECT_EQ(sw_->step(), 1u);
}

TEST_P(OptimizerSwapperTest, StaleSlotIsReportedAsCorruption) {
  Build(2, 1000);
  MakeGrads(1);
  ASSERT_TRUE(SwapperStep(Hyper()).ok());
  MakeGrads(2);
  ASSERT_TRUE(SwapperStep(Hyper()).ok());
  // Step 2 is in slot 0 of sub-group 0; put step 1's slot (slot 1) there,
  // as a lost write would leave it.
  const std::string path = sw_->store().file_paths()[0];
  const uint64_t slot = sw_->slot_bytes();
  std::vector<uint8_t> old(slot);
  int fd = open(path.c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(pread(fd, old.data(), slot, kStoreHeaderBytes + slot), static_cast<ssize_t>(slot));
  ASSERT_EQ(pwrite(fd, old.data(), slot, kStoreHeaderBytes), static_cast<ssize_t>(slot));
  close(fd);
  std::vector<float> out(segments_[0].numel);
  Status s = sw_->ReadState(segments_[0].id, StateArray::kMaster, out.data());
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kCorruption) << s.ToString();
  EXPECT_NE(s.message().find("the header holds step 1"), std::string::npos) << s.ToString();
}

TEST_P(OptimizerSwapperTest, BadOptionsAreRefusedWithTheirName) {
  auto backend = io::CreateBackend(GetParam(), io::BackendOptions{});
  ASSERT_TRUE(backend.ok());
  auto engine = io::Engine::Create(std::move(backend).value(), io::EngineOptions{});
  ASSERT_TRUE(engine.ok());
  auto async = io::AsyncEngine::Create(std::move(engine).value());
  ASSERT_TRUE(async.ok());
  OptimizerSwapperOptions o;
  o.store.paths = {dir_.File("bad")};
  o.buffer_count = 0;
  auto r = OptimizerSwapper::Create(o, {{1, 10, DType::kF32}}, async->get());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("optimizer.buffer_count"), std::string::npos);
  o.buffer_count = 2;
  r = OptimizerSwapper::Create(o, {{1, 10, DType::kF32}, {1, 5, DType::kF32}}, async->get());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("parameter 1 given twice"), std::string::npos);
  r = OptimizerSwapper::Create(o, {{1, 10, DType::kF32}}, async->get());
  ASSERT_TRUE(r.ok());
  optim::AdamHyper h;
  Status s = (*r)->Step(h, [](uint64_t) -> const void* { return nullptr; }, nullptr);
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition);
}

// ---------------------------------------------------------------------------
// Gradients on NVMe (grads_on_store): the swapper's gradient store holds the
// partitions and each sub-group's are read with its state. The reference
// (the whole-partition scalar update, which the host-memory path matches bit
// for bit above) must be matched bit for bit too.

// Segments straddling sub-groups, sub-groups smaller than a segment (and
// than one 4 KiB block of gradients), one sub-group for all; f32, bf16 and
// f16 segments side by side (gradient ranges start mid-extent); 1 and 4
// buffers; forward and reverse; a step with segments lacking a gradient
// (whose store content, stale, must be ignored); a step whose gradients were
// accumulated in the store over two micro-batches.
TEST_P(OptimizerSwapperTest, GradientsFromTheStoreEqualGradientsFromHostMemory) {
  grads_on_store_ = true;
  for (uint32_t buffers : {1u, 4u}) {
    for (uint64_t sub_group : {100ull, 333ull, 1000ull, 4096ull, 1000000ull}) {
      for (bool reverse : {false, true}) {
        SCOPED_TRACE(::testing::Message() << "buffers " << buffers << " sub_group " << sub_group
                                          << (reverse ? " reverse" : " forward"));
        TearDown();
        ref_.clear();
        Build(buffers, sub_group);
        ASSERT_NE(sw_->grad_store(), nullptr);
        ASSERT_EQ(sw_->grad_store()->segment_count(), segments_.size());
        const OptimizerSwapper::StepPlan plan{.reverse = reverse};
        // Step 1: every segment.
        MakeGrads(1);
        ASSERT_TRUE(PutGrads().ok());
        ReferenceStep(Hyper(), {});
        Status s = StoreStep(Hyper(), {}, plan);
        ASSERT_TRUE(s.ok()) << s.ToString();
        ExpectSunkMatches({});
        // Step 2: 12 and 14 have no gradient (their store partitions keep
        // step 1's, which must not be applied).
        const std::set<uint64_t> skip = {12, 14};
        MakeGrads(2);
        ASSERT_TRUE(PutGrads().ok());
        ReferenceStep(Hyper(false), skip);
        s = StoreStep(Hyper(false), skip, plan);
        ASSERT_TRUE(s.ok()) << s.ToString();
        ExpectSunkMatches(skip);
        // Step 3: two micro-batches accumulated in the store.
        MakeGrads(3);
        ASSERT_TRUE(PutGrads().ok());
        auto first = grads_;
        MakeGrads(4);
        ASSERT_TRUE(PutGrads(/*accumulate=*/true).ok());
        for (const auto& seg : segments_) {
          optim::AccumulateGrad(first[seg.id].data(), grads_[seg.id].data(), seg.numel,
                                seg.dtype);
        }
        grads_ = first;
        ReferenceStep(Hyper(), {});
        s = StoreStep(Hyper(), {}, plan);
        ASSERT_TRUE(s.ok()) << s.ToString();
        ExpectSunkMatches({});
        EXPECT_EQ(sw_->step(), 3u);
        ExpectStateMatches();
        if (HasFatalFailure()) return;
      }
    }
  }
}

// A small staging bound (smaller than most partitions): Puts go one at a
// time and the step still gets every gradient.
TEST_P(OptimizerSwapperTest, GradientStoreWithSmallStaging) {
  grads_on_store_ = true;
  grad_staging_bytes_ = 4096;
  Build(2, 1000);
  for (uint64_t step = 1; step <= 2; ++step) {
    MakeGrads(step);
    ASSERT_TRUE(PutGrads().ok());
    ReferenceStep(Hyper(), {});
    Status s = StoreStep(Hyper(), {});
    ASSERT_TRUE(s.ok()) << s.ToString();
    ExpectSunkMatches({});
  }
  ExpectStateMatches();
}

// Reads are counted from 0: Initialize reads nothing, Puts without
// accumulate read nothing, and each step reads, per sub-group in order, its
// slot then its gradients (one request each: slots and gradient ranges lie
// inside one 64 KiB stripe). Hit step 2's gradient read of sub-group 1.
TEST_P(OptimizerSwapperTest, GradientStoreReadErrorFailsTheStepAndKeepsThePreviousState) {
  grads_on_store_ = true;
  Build(3, 1000);
  const uint32_t groups = sw_->sub_group_count();
  ASSERT_GE(groups, 4u);
  MakeGrads(1);
  ASSERT_TRUE(PutGrads().ok());
  ReferenceStep(Hyper(), {});
  ASSERT_TRUE(StoreStep(Hyper(), {}).ok());
  ASSERT_EQ(fault_->ops_seen(io::Op::kRead), 2u * groups) << "the read count assumed here is off";
  fault_->AddFault({io::FaultKind::kEio, 2 * groups + 3, 1, io::Op::kRead});
  MakeGrads(2);
  ASSERT_TRUE(PutGrads().ok());
  Status s = StoreStep(Hyper(), {});
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kIoError) << s.ToString();
  EXPECT_NE(s.message().find("read the gradients of sub-group 1"), std::string::npos)
      << s.ToString();
  EXPECT_NE(s.message().find("the state of step 1 is intact"), std::string::npos)
      << s.ToString();
  EXPECT_EQ(fault_->faults_injected(), 1u);
  EXPECT_EQ(sw_->step(), 1u);
  EXPECT_FALSE(sw_->commit_pending());
  ExpectStateMatches();  // step 1, bit for bit
  // The same step again (the gradients are still in the store) gives step 2.
  ExpectStoreStepTwoMatches(Hyper());
}

// Writes: Initialize writes one slot per sub-group, each Put one request
// (partitions < 64 KiB in one stripe), each step one slot per sub-group.
// Hit the 3rd Put of step 2: the step refuses to run on gradients that did
// not all reach the drive, changes nothing, and keeps refusing until the
// store is cleared and the gradients handed in again.
TEST_P(OptimizerSwapperTest, FailedGradientWriteFailsTheStepWithoutChangingState) {
  for (io::FaultKind kind : {io::FaultKind::kEio, io::FaultKind::kEnospc}) {
    SCOPED_TRACE(kind == io::FaultKind::kEio ? "EIO" : "ENOSPC");
    TearDown();
    ref_.clear();
    grads_on_store_ = true;
    Build(2, 1000);
    const uint32_t groups = sw_->sub_group_count();
    const uint64_t segs = segments_.size();
    MakeGrads(1);
    ASSERT_TRUE(PutGrads().ok());
    ReferenceStep(Hyper(), {});
    ASSERT_TRUE(StoreStep(Hyper(), {}).ok());
    ASSERT_EQ(fault_->ops_seen(io::Op::kWrite), 2 * groups + segs)
        << "the write count assumed here is off";
    fault_->AddFault({kind, 2 * groups + segs + 2, 1, io::Op::kWrite});
    MakeGrads(2);
    // The failing write is in the background: Put itself may succeed, or a
    // later Put may already see it.
    (void)PutGrads();
    Status s = StoreStep(Hyper(), {});
    ASSERT_FALSE(s.ok());
    EXPECT_EQ(s.code(),
              kind == io::FaultKind::kEio ? StatusCode::kIoError : StatusCode::kResourceExhausted)
        << s.ToString();
    EXPECT_NE(s.message().find("did not reach NVMe"), std::string::npos) << s.ToString();
    EXPECT_NE(s.message().find("write gradient partition 2"), std::string::npos)
        << s.ToString();
    EXPECT_TRUE(sunk_.empty());
    EXPECT_EQ(sw_->step(), 1u);
    ExpectStateMatches();
    // Latched: the step keeps failing until the store is cleared.
    EXPECT_FALSE(StoreStep(Hyper(), {}).ok());
    EXPECT_EQ(sw_->step(), 1u);
    sw_->grad_store()->Clear();
    ASSERT_TRUE(PutGrads().ok());
    ExpectStoreStepTwoMatches(Hyper());
  }
}

INSTANTIATE_TEST_SUITE_P(Backends, OptimizerSwapperTest,
                         ::testing::Values(io::BackendKind::kIoUring, io::BackendKind::kLibaio,
                                           io::BackendKind::kPsync),
                         [](const auto& info) { return std::string(io::BackendKindName(info.param)); });

}  // namespace
}  // namespace ztier::swapper
