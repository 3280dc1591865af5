// The coordinator's rules and pipeline, over real NVMe files and the
// host-emulation device: property tests over generated traces and random
// limits (world sizes 1, 2, 4, 8), and the scenarios users hit.
#include "coordinator/coordinator.h"

#include <algorithm>
#include <random>
#include <thread>

#include <gtest/gtest.h>

#include "tests/coordinator/rank_harness.h"

namespace ztier::coordinator {
namespace {

using testing::MakeRank;
using testing::ModuleDataIntact;
using testing::Rank;
using testing::RankConfig;
using testing::RegisterTrace;
using ztier::testing::ScratchDir;

// A chain of modules, each with its own params; `shared` makes the last
// module reuse the first module's first param (tied embeddings).
TraceFile Chain(int modules, int params_per_module, uint64_t numel, bool shared = false) {
  TraceFile t;
  uint64_t pid = 0;
  for (int m = 0; m < modules; ++m) {
    TraceModule mod;
    mod.id = m;
    mod.name = "m" + std::to_string(m);
    for (int k = 0; k < params_per_module; ++k) {
      t.params.push_back({pid, numel + pid * 7, false, ParamTier::kNvme});
      mod.params.push_back(pid++);
    }
    t.modules.push_back(mod);
  }
  if (shared) t.modules.back().params.push_back(0);
  return t;
}

// forward m0..mn-1, then backward in reverse.
std::vector<TraceEvent> FwdBwd(int modules) {
  std::vector<TraceEvent> ev;
  for (int m = 0; m < modules; ++m) {
    ev.push_back({TraceOp::kFetch, uint64_t(m), true, false});
    ev.push_back({TraceOp::kRelease, uint64_t(m), true, false});
  }
  for (int m = modules - 1; m >= 0; --m) {
    ev.push_back({TraceOp::kFetch, uint64_t(m), false, false});
    ev.push_back({TraceOp::kRelease, uint64_t(m), false, true});
  }
  return ev;
}

uint64_t ModuleNumel(const TraceFile& t, uint64_t module) {
  uint64_t n = 0;
  for (const auto& m : t.modules) {
    if (m.id != module) continue;
    std::vector<uint64_t> ps = m.params;
    std::sort(ps.begin(), ps.end());
    ps.erase(std::unique(ps.begin(), ps.end()), ps.end());
    for (uint64_t pid : ps) n += t.params[pid].numel;
  }
  return n;
}

// Runs one step's events, checking after every fetch that the module's
// params are bit-exact, and after the step that nothing is left in flight.
void RunStep(Rank& r, const TraceFile& t, const std::vector<TraceEvent>& events) {
  Coordinator& c = *r.coordinator;
  for (const TraceEvent& e : events) {
    if (e.op == TraceOp::kFetch) {
      Status s = c.Fetch(e.module, e.forward);
      ASSERT_TRUE(s.ok()) << s.ToString();
      ASSERT_TRUE(ModuleDataIntact(c, t, e.module));
    } else {
      Status s = c.Release(e.module, e.backward);
      ASSERT_TRUE(s.ok()) << s.ToString();
    }
  }
  Status s = c.ResetStep();
  ASSERT_TRUE(s.ok()) << s.ToString();
  // After reset_step nothing is in flight and no swap buffer is held.
  EXPECT_EQ(r.pool->stats().buffers_in_use, 0u);
  for (const auto& p : t.params) {
    EXPECT_NE(c.param_status(p.id), ParamStatus::kInflight) << "param " << p.id;
  }
}

class CoordinatorTest : public ::testing::Test {
 protected:
  ScratchDir dir_;
};

TEST_F(CoordinatorTest, FirstStepRecordsLaterStepsPrefetchEverything) {
  TraceFile t = Chain(6, 2, 20000);
  RankConfig cfg;
  cfg.options.param_persistence_threshold = 0;
  auto r = MakeRank(dir_.path(), 0, 1, nullptr, cfg);
  RegisterTrace(*r->coordinator, t);
  RunStep(*r, t, FwdBwd(6));
  EXPECT_EQ(r->coordinator->trace_mode(), TraceMode::kComplete);
  auto after_first = r->coordinator->stats();
  EXPECT_EQ(after_first.fetch_calls_with_demand, 12u);  // recording: all on demand
  for (int step = 0; step < 3; ++step) RunStep(*r, t, FwdBwd(6));
  auto s = r->coordinator->stats();
  // Only the first fetch of each later step is a demand fetch.
  EXPECT_EQ(s.fetch_calls_with_demand - after_first.fetch_calls_with_demand, 3u);
  EXPECT_GT(s.prefetch_gathers, 0u);
  EXPECT_GT(s.nvme_reads, 0u);
  EXPECT_LE(s.peak_swap_buffers, cfg.buffer_count);
  bool completed = false;
  for (const auto& e : r->events.events()) completed |= e.kind == EventKind::kTraceComplete;
  EXPECT_TRUE(completed);
}

TEST_F(CoordinatorTest, LiveNumelStaysWithinBudgetPlusTheModulesOwn) {
  TraceFile t = Chain(10, 3, 5000);
  RankConfig cfg;
  cfg.options.max_live_parameters = 40000;
  cfg.options.prefetch_bucket_size = 25000;
  cfg.options.max_reuse_distance = 0;
  cfg.options.param_persistence_threshold = 0;
  auto r = MakeRank(dir_.path(), 0, 1, nullptr, cfg);
  RegisterTrace(*r->coordinator, t);
  for (int step = 0; step < 3; ++step) {
    for (const TraceEvent& e : FwdBwd(10)) {
      if (e.op == TraceOp::kFetch) {
        ASSERT_TRUE(r->coordinator->Fetch(e.module).ok());
        ASSERT_TRUE(ModuleDataIntact(*r->coordinator, t, e.module));
        EXPECT_LE(r->coordinator->stats().live_numel,
                  cfg.options.max_live_parameters + ModuleNumel(t, e.module));
      } else {
        ASSERT_TRUE(r->coordinator->Release(e.module, e.backward).ok());
      }
    }
    ASSERT_TRUE(r->coordinator->ResetStep().ok());
  }
}

TEST_F(CoordinatorTest, ATiedParamUsedByTwoActiveModulesIsNotFreedEarly) {
  TraceFile t = Chain(3, 1, 10000, /*shared=*/true);  // m2 also uses param 0
  RankConfig cfg;
  cfg.options.param_persistence_threshold = 0;
  auto r = MakeRank(dir_.path(), 0, 1, nullptr, cfg);
  RegisterTrace(*r->coordinator, t);
  Coordinator& c = *r->coordinator;
  ASSERT_TRUE(c.Fetch(0).ok());
  ASSERT_TRUE(c.Fetch(2).ok());  // nested: both active, both use param 0
  ASSERT_TRUE(c.Release(2).ok());
  EXPECT_EQ(c.param_status(0), ParamStatus::kAvailable);
  EXPECT_TRUE(ModuleDataIntact(c, t, 0));
  ASSERT_TRUE(c.Release(0).ok());
  EXPECT_EQ(c.param_status(0), ParamStatus::kNotAvailable);  // record mode: freed
  EXPECT_EQ(c.ParamData(0).status().code(), StatusCode::kFailedPrecondition);
}

TEST_F(CoordinatorTest, SinglePolicyModuleOrderChangeInvalidatesAndReRecords) {
  TraceFile t = Chain(5, 2, 8000);
  RankConfig cfg;
  cfg.options.param_persistence_threshold = 0;
  cfg.options.trace_policy = TracePolicy::kSingle;
  auto r = MakeRank(dir_.path(), 0, 1, nullptr, cfg);
  RegisterTrace(*r->coordinator, t);
  RunStep(*r, t, FwdBwd(5));
  // An MoE-like branch: module 2 skipped, module 4 run twice.
  std::vector<TraceEvent> branch;
  for (int m : {0, 1, 3, 4, 4}) {
    branch.push_back({TraceOp::kFetch, uint64_t(m), true, false});
    branch.push_back({TraceOp::kRelease, uint64_t(m), true, false});
  }
  RunStep(*r, t, branch);
  EXPECT_EQ(r->coordinator->stats().trace_invalidations, 1u);
  EXPECT_EQ(r->coordinator->trace_mode(), TraceMode::kRecord);
  RunStep(*r, t, branch);  // records the new order
  EXPECT_EQ(r->coordinator->trace_mode(), TraceMode::kComplete);
  RunStep(*r, t, branch);
  EXPECT_EQ(r->coordinator->stats().trace_invalidations, 1u);
}

TEST_F(CoordinatorTest, CheckpointingReRunsAModuleInBackward) {
  TraceFile t = Chain(4, 2, 6000);
  RankConfig cfg;
  cfg.options.param_persistence_threshold = 0;
  auto r = MakeRank(dir_.path(), 0, 1, nullptr, cfg);
  RegisterTrace(*r->coordinator, t);
  std::vector<TraceEvent> ev;
  for (int m = 0; m < 4; ++m) {
    ev.push_back({TraceOp::kFetch, uint64_t(m), true, false});
    ev.push_back({TraceOp::kRelease, uint64_t(m), true, false});
  }
  for (int m = 3; m >= 0; --m) {  // recompute forward, then backward
    ev.push_back({TraceOp::kFetch, uint64_t(m), true, false});
    ev.push_back({TraceOp::kRelease, uint64_t(m), true, false});
    ev.push_back({TraceOp::kFetch, uint64_t(m), false, false});
    ev.push_back({TraceOp::kRelease, uint64_t(m), false, true});
  }
  for (int step = 0; step < 3; ++step) RunStep(*r, t, ev);
  EXPECT_EQ(r->coordinator->stats().trace_invalidations, 0u);
}

TEST_F(CoordinatorTest, PrefetchBucketZeroAndOneSwapBuffer) {
  TraceFile t = Chain(6, 2, 30000);
  RankConfig cfg;
  cfg.buffer_count = 1;
  cfg.options.prefetch_bucket_size = 0;
  cfg.options.param_persistence_threshold = 0;
  auto r = MakeRank(dir_.path(), 0, 1, nullptr, cfg);
  RegisterTrace(*r->coordinator, t);
  for (int step = 0; step < 3; ++step) RunStep(*r, t, FwdBwd(6));
  auto s = r->coordinator->stats();
  EXPECT_EQ(s.prefetch_gathers, 0u);
  EXPECT_EQ(s.peak_swap_buffers, 1u);
}

TEST_F(CoordinatorTest, PersistentParamsStayAndGiveTheirBufferBack) {
  TraceFile t = Chain(4, 2, 3000);
  RankConfig cfg;
  cfg.options.param_persistence_threshold = 3010;  // params 0 and 1
  auto r = MakeRank(dir_.path(), 0, 1, nullptr, cfg);
  RegisterTrace(*r->coordinator, t);
  RunStep(*r, t, FwdBwd(4));
  EXPECT_EQ(r->coordinator->param_status(0), ParamStatus::kAvailable);
  EXPECT_EQ(r->coordinator->param_status(1), ParamStatus::kAvailable);
  EXPECT_EQ(r->coordinator->param_status(2), ParamStatus::kNotAvailable);
  EXPECT_EQ(r->pool->stats().buffers_in_use, 0u);
}

TEST_F(CoordinatorTest, HostAndDeviceTierParams) {
  TraceFile t = Chain(3, 3, 4000);
  t.params[1].tier = ParamTier::kHost;
  t.params[4].tier = ParamTier::kDevice;
  RankConfig cfg;
  cfg.options.param_persistence_threshold = 0;
  auto r = MakeRank(dir_.path(), 0, 1, nullptr, cfg);
  RegisterTrace(*r->coordinator, t);
  for (int step = 0; step < 2; ++step) RunStep(*r, t, FwdBwd(3));
}

TEST_F(CoordinatorTest, ReadErrorFailsTheFetchNamingTheParamAndRecovers) {
  TraceFile t = Chain(3, 1, 50000);
  RankConfig cfg;
  cfg.options.param_persistence_threshold = 0;
  auto r = MakeRank(dir_.path(), 0, 1, nullptr, cfg);
  RegisterTrace(*r->coordinator, t);
  r->fault->AddFault({io::FaultKind::kEio, r->fault->ops_seen(io::Op::kRead), 1, io::Op::kRead});
  Status s = r->coordinator->Fetch(0);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("partition 0"), std::string_view::npos) << s.ToString();
  EXPECT_EQ(r->coordinator->param_status(0), ParamStatus::kNotAvailable);
  ASSERT_TRUE(r->coordinator->Fetch(0).ok());  // the fault was one-shot
  EXPECT_TRUE(ModuleDataIntact(*r->coordinator, t, 0));
}

TEST_F(CoordinatorTest, MisuseGivesErrors) {
  TraceFile t = Chain(2, 1, 1000);
  auto r = MakeRank(dir_.path(), 0, 1, nullptr, RankConfig{});
  EXPECT_EQ(r->coordinator->Fetch(0).code(), StatusCode::kFailedPrecondition);
  RegisterTrace(*r->coordinator, t);
  EXPECT_EQ(r->coordinator->Fetch(7).code(), StatusCode::kNotFound);
  EXPECT_EQ(r->coordinator->Release(1).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(r->coordinator->ParamData(1).status().code(), StatusCode::kFailedPrecondition);
}

// On a GPU: the same pipeline with the CUDA device backend (real H2D copies
// into device memory, cudaHostRegister-pinned swap buffers), world size 1.
TEST_F(CoordinatorTest, CudaDeviceEndToEnd) {
  std::string why;
  if (!tiering::CudaDeviceAvailable(&why)) GTEST_SKIP() << "no CUDA device: " << why;
  TraceFile t = Chain(8, 3, 300000);
  t.params[2].tier = ParamTier::kHost;
  t.params[5].tier = ParamTier::kDevice;
  RankConfig cfg;
  cfg.cuda = true;
  cfg.buffer_bytes = 1 << 20;
  cfg.options.param_persistence_threshold = 0;
  cfg.options.prefetch_bucket_size = 1'000'000;
  auto r = MakeRank(dir_.path(), 0, 1, nullptr, cfg);
  EXPECT_EQ(r->device->name(), "cuda");
  RegisterTrace(*r->coordinator, t);
  for (int step = 0; step < 3; ++step) {
    for (const TraceEvent& e : FwdBwd(8)) {
      if (e.op == TraceOp::kFetch) {
        ASSERT_TRUE(r->coordinator->Fetch(e.module, e.forward).ok());
        ASSERT_TRUE(ModuleDataIntact(*r->coordinator, t, e.module, r->device.get()));
      } else {
        ASSERT_TRUE(r->coordinator->Release(e.module, e.backward).ok());
      }
    }
    ASSERT_TRUE(r->coordinator->ResetStep().ok());
  }
  auto s = r->coordinator->stats();
  EXPECT_GT(s.prefetch_gathers, 0u);
  EXPECT_EQ(r->pool->stats().buffers_in_use, 0u);
  EXPECT_EQ(r->pool->stats().pin_method, "cuda");
}

// ---------------------------------------------------------------- properties

struct PropertyCase {
  uint32_t world;
  uint64_t seed;
  // Swap buffer size: 64 KiB gives partitions of 1-2 buffers; 16 KiB gives
  // partitions of up to 5 buffers in pools barely larger, where a read needs
  // a run of adjacent free buffers.
  uint64_t buffer_bytes = 64 * 1024;
};

class CoordinatorPropertyTest : public ::testing::TestWithParam<PropertyCase> {};

// A random model: modules with 1-4 params of random size, some params shared
// by two modules, random limits. Every rank runs the same trace on its own
// thread; after every fetch the data must be bit-exact on every rank.
TEST_P(CoordinatorPropertyTest, RandomTracesAndLimits) {
  const PropertyCase pc = GetParam();
  std::mt19937_64 rng(pc.seed);
  TraceFile t;
  const int modules = 4 + rng() % 12;
  uint64_t pid = 0;
  for (int m = 0; m < modules; ++m) {
    TraceModule mod;
    mod.id = m;
    mod.name = "m" + std::to_string(m);
    int n = 1 + rng() % 4;
    for (int k = 0; k < n; ++k) {
      t.params.push_back({pid, 1 + rng() % 40000, false, ParamTier::kNvme});
      mod.params.push_back(pid++);
    }
    if (m > 2 && rng() % 4 == 0) mod.params.push_back(rng() % pid);  // shared
    t.modules.push_back(mod);
  }
  uint64_t total = 0, largest = 0;
  for (const auto& p : t.params) {
    total += p.numel;
    largest = std::max(largest, p.numel);
  }
  RankConfig cfg;
  cfg.options.max_live_parameters = largest * 4 + rng() % (total + 1);
  cfg.options.prefetch_bucket_size = rng() % (total + 1);
  cfg.options.max_reuse_distance = rng() % 2 ? 0 : rng() % (total + 1);
  cfg.options.param_persistence_threshold = rng() % 3 == 0 ? 2000 : 0;
  cfg.options.max_ongoing_fetch_events = 1 + rng() % 3;
  // Enough buffers for the largest partition (2 bytes per element).
  cfg.buffer_bytes = pc.buffer_bytes;
  const uint64_t part_bytes = (largest + pc.world - 1) / pc.world * 2;
  cfg.buffer_count = static_cast<uint32_t>((part_bytes + cfg.buffer_bytes - 1) / cfg.buffer_bytes)
                     + rng() % 4;
  const uint32_t steps = 3;
  std::vector<TraceEvent> events = FwdBwd(modules);

  ScratchDir dir;
  testing::Ranks ranks(dir.path(), pc.world, cfg);
  const std::vector<std::string> failures =
      ranks.OnEveryRank([&](uint32_t, Rank& rank) -> std::string {
        Coordinator& c = *rank.coordinator;
        if (Status s = testing::SetUpTrace(c, t); !s.ok()) return s.ToString();
        for (uint32_t step = 0; step < steps; ++step) {
          for (const TraceEvent& e : events) {
            Status s = e.op == TraceOp::kFetch ? c.Fetch(e.module, e.forward)
                                               : c.Release(e.module, e.backward);
            if (!s.ok()) return s.ToString();
            if (e.op != TraceOp::kFetch) continue;
            auto intact = ModuleDataIntact(c, t, e.module);
            if (!intact) return intact.message();
            if (cfg.options.max_reuse_distance == 0 &&
                c.stats().live_numel >
                    cfg.options.max_live_parameters + ModuleNumel(t, e.module)) {
              return "live numel over budget";
            }
          }
          if (Status s = c.ResetStep(); !s.ok()) return s.ToString();
          if (rank.pool->stats().buffers_in_use != 0) return "buffer held";
        }
        return "";
      });
  for (uint32_t r = 0; r < pc.world; ++r) EXPECT_EQ(failures[r], "") << "rank " << r;
}

// A gather whose collective fails (here: the ranks disagree on the size,
// as after registering different models) fails the fetch on every rank; the
// event it waits on completes either way, so the fetch must not hand out a
// parameter that was never gathered.
TEST_F(CoordinatorTest, FailedGatherFailsTheFetchOnEveryRank) {
  std::shared_ptr<LocalGroup> group = LocalGroup::Create(2);
  RankConfig cfg;
  cfg.options.param_persistence_threshold = 0;
  std::vector<std::unique_ptr<Rank>> ranks(2);
  for (uint32_t r = 0; r < 2; ++r) ranks[r] = MakeRank(dir_.path(), r, 2, group.get(), cfg);
  std::vector<std::string> errors(2);
  std::vector<std::thread> threads;
  for (uint32_t r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      Coordinator& c = *ranks[r]->coordinator;
      const uint64_t numel = r == 0 ? 4096 : 2048;  // the disagreement
      if (!c.RegisterParam(1, numel, DType::kFloat16, ParamTier::kNvme).ok() ||
          !c.RegisterModule(7, "m", {1}).ok() || !c.Finalize().ok()) {
        errors[r] = "set-up failed";
        return;
      }
      auto bytes = testing::ParamBytes(1, numel);
      if (!c.SetParamData(1, bytes.data()).ok()) {
        errors[r] = "set-up failed";
        return;
      }
      Status s = c.Fetch(7, true);
      errors[r] = s.ok() ? "the fetch succeeded" : s.ToString();
      if (s.ok()) (void)c.Release(7, false);
    });
  }
  for (auto& th : threads) th.join();
  for (uint32_t r = 0; r < 2; ++r) {
    EXPECT_NE(errors[r].find("disagree"), std::string::npos) << "rank " << r << ": " << errors[r];
  }
}

TEST_F(CoordinatorTest, NvmeReadsStartInTraceOrder) {
  // Forward only, each param used once per step: read k must be param k.
  TraceFile t = Chain(12, 2, 9000);
  RankConfig cfg;
  cfg.buffer_count = 3;
  cfg.buffer_bytes = 32 * 1024;
  cfg.pack_threshold_bytes = 0;
  cfg.options.param_persistence_threshold = 0;
  cfg.options.prefetch_bucket_size = 20000;
  auto r = MakeRank(dir_.path(), 0, 1, nullptr, cfg);
  RegisterTrace(*r->coordinator, t);
  std::vector<TraceEvent> fwd;
  for (int m = 0; m < 12; ++m) {
    fwd.push_back({TraceOp::kFetch, uint64_t(m), true, false});
    fwd.push_back({TraceOp::kRelease, uint64_t(m), true, false});
  }
  for (int step = 0; step < 3; ++step) RunStep(*r, t, fwd);
  for (uint64_t step : {1u, 2u}) {
    std::vector<uint64_t> reads;
    for (const auto& e : r->events.events()) {
      if (e.step == step && e.kind == EventKind::kNvmeRead) reads.push_back(e.params[0]);
    }
    ASSERT_EQ(reads.size(), t.params.size()) << "step " << step;
    for (size_t k = 0; k < reads.size(); ++k) EXPECT_EQ(reads[k], k) << "step " << step;
  }
  EXPECT_EQ(r->coordinator->stats().nvme_read_reclaims, 0u);
  EXPECT_LE(r->coordinator->stats().peak_swap_buffers, 3u);
}

std::vector<PropertyCase> PropertyCases() {
  std::vector<PropertyCase> v;
  for (uint32_t world : {1u, 2u, 4u, 8u}) {
    for (uint64_t seed = 1; seed <= (world == 1 ? 12u : 4u); ++seed) v.push_back({world, seed});
  }
  return v;
}

std::vector<PropertyCase> TightPropertyCases() {
  std::vector<PropertyCase> v;
  for (uint32_t world : {1u, 2u}) {
    for (uint64_t seed = 1; seed <= 8; ++seed) v.push_back({world, 1000 + seed, 16 * 1024});
  }
  return v;
}

std::string PropertyName(const ::testing::TestParamInfo<PropertyCase>& info) {
  return "world" + std::to_string(info.param.world) + "_seed" + std::to_string(info.param.seed);
}

INSTANTIATE_TEST_SUITE_P(Worlds, CoordinatorPropertyTest, ::testing::ValuesIn(PropertyCases()),
                         PropertyName);
INSTANTIATE_TEST_SUITE_P(TightBuffers, CoordinatorPropertyTest,
                         ::testing::ValuesIn(TightPropertyCases()), PropertyName);

}  // namespace
}  // namespace ztier::coordinator
