#include "coordinator/trace_runner.h"

#include <chrono>
#include <thread>

#include <fmt/format.h>

namespace ztier::coordinator {
namespace {

using Clock = std::chrono::steady_clock;

// The tier a trace param takes under the config: everything on the host when
// the config says params live there.
ParamTier TierFor(const TraceParam& p, const tiering::Config& c) {
  if (c.tiers.params == tiering::ParamTier::kHost && p.tier == ParamTier::kNvme) {
    return ParamTier::kHost;
  }
  return p.tier;
}

}  // namespace

Status RunTraceRank(const TraceFile& t, const RunOptions& o, const RunHooks& hooks,
                    uint32_t rank, LocalGroup* group, RankResult* out) {
  RuntimeOptions ro = o.runtime;
  ro.rank = rank;
  ro.world_size = o.world_size;
  ro.local_group = group;
  if (rank != 0) ro.events = nullptr;
  ZTIER_ASSIGN_OR_RETURN(auto rt, RankRuntime::Create(ro));
  out->description = rt->Describe();
  Coordinator& c = rt->coordinator();
  for (const TraceParam& p : t.params) {
    ZTIER_RETURN_IF_ERROR(
        c.RegisterParam(p.id, p.numel, o.dtype, TierFor(p, ro.config), p.persist, p.name));
  }
  for (const TraceModule& m : t.modules) {
    ZTIER_RETURN_IF_ERROR(c.RegisterModule(m.id, m.name, m.params));
  }
  ZTIER_RETURN_IF_ERROR(c.Finalize());
  // Initial data: a cheap per-param byte pattern (replay does not check it).
  std::vector<uint8_t> data;
  for (const TraceParam& p : t.params) {
    data.assign(p.numel * DTypeBytes(o.dtype), static_cast<uint8_t>(p.id * 31 + 7));
    ZTIER_RETURN_IF_ERROR(c.SetParamData(p.id, data.data()));
  }
  uint64_t step = 0;
  for (uint32_t r = 0; r < std::max<uint32_t>(1, o.repeat); ++r) {
    for (const auto& events : t.steps) {
      const CoordinatorStats before = c.stats();
      const swapper::SwapperStats sw_before =
          rt->swapper() ? rt->swapper()->stats() : swapper::SwapperStats{};
      const auto t0 = Clock::now();
      std::vector<uint64_t> hinted;  // a run of hint events: one Hint call
      for (size_t k = 0; k < events.size(); ++k) {
        const TraceEvent& e = events[k];
        if (e.op == TraceOp::kHint) {
          hinted.push_back(e.module);
          if (k + 1 < events.size() && events[k + 1].op == TraceOp::kHint) continue;
          Status s = c.Hint(hinted);
          hinted.clear();
          if (!s.ok()) return s.WithContext(fmt::format("rank {} step {}", rank, step));
        } else if (e.op == TraceOp::kFetch) {
          if (hooks.before_fetch) hooks.before_fetch(rank, step, e);
          Status s = c.Fetch(e.module, e.forward);
          if (!s.ok()) return s.WithContext(fmt::format("rank {} step {}", rank, step));
          if (hooks.after_fetch) hooks.after_fetch(rank, step, e);
        } else {
          Status s = c.Release(e.module, e.backward);
          if (!s.ok()) return s.WithContext(fmt::format("rank {} step {}", rank, step));
        }
      }
      const auto t1 = Clock::now();
      if (hooks.before_reset) hooks.before_reset(rank, step);
      ZTIER_RETURN_IF_ERROR(c.ResetStep());
      const CoordinatorStats after = c.stats();
      StepTiming st;
      st.seconds = std::chrono::duration<double>(t1 - t0).count();
      st.stall_nvme_s = after.stall_nvme_s - before.stall_nvme_s;
      st.stall_device_s = after.stall_device_s - before.stall_device_s;
      st.fetch_calls = after.fetch_calls - before.fetch_calls;
      st.fetch_calls_with_demand = after.fetch_calls_with_demand - before.fetch_calls_with_demand;
      st.bytes_needed = after.nvme_bytes_needed - before.nvme_bytes_needed;
      if (rt->swapper()) {
        const auto sw = rt->swapper()->stats();
        st.bytes_read = sw.bytes_read - sw_before.bytes_read;
        st.bytes_written = sw.bytes_written - sw_before.bytes_written;
      }
      out->steps.push_back(st);
      if (rank == 0 && hooks.step_done) hooks.step_done(step, st.seconds);
      ++step;
    }
  }
  out->stats = c.stats();
  return Status::Ok();
}

Result<std::vector<RankResult>> RunTrace(const TraceFile& trace, const RunOptions& options,
                                         const RunHooks& hooks) {
  const uint32_t world = std::max<uint32_t>(1, options.world_size);
  std::shared_ptr<LocalGroup> group = world > 1 ? LocalGroup::Create(world) : nullptr;
  std::vector<RankResult> results(world);
  std::vector<Status> status(world);
  std::vector<std::thread> threads;
  for (uint32_t r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      status[r] = RunTraceRank(trace, options, hooks, r, group.get(), &results[r]);
      // A failed rank issues no more collectives: release the others.
      if (!status[r].ok() && group) group->Abort(r);
    });
  }
  for (auto& th : threads) th.join();
  for (uint32_t r = 0; r < world; ++r) {
    if (!status[r].ok()) return status[r];
  }
  return results;
}

}  // namespace ztier::coordinator
