// TraceRunner: plays a ztier-trace-v1 file through real ranks (RankRuntime:
// coordinator, swapper, io engine, device, collective), one thread per rank
// over a LocalGroup (or one rank per process, RunTraceRank), and reports
// per-step timings and counters. Used by `ztier replay` and `ztier bench step`.
//
// Thread-safety: RunTrace blocks until every rank is done; the hooks are
// called on the rank threads.
#pragma once

#include <functional>
#include <vector>

#include "coordinator/runtime.h"
#include "coordinator/trace_file.h"

namespace ztier::coordinator {

struct RunHooks {
  // Just before a module's fetch is called (timelines of the fetch stall).
  std::function<void(uint32_t rank, uint64_t step, const TraceEvent& e)> before_fetch;
  // After a module's fetch returned (its params are AVAILABLE): emulate or
  // run its compute here. `step` counts from 0.
  std::function<void(uint32_t rank, uint64_t step, const TraceEvent& e)> after_fetch;
  // When rank 0 finishes a step (progress reports).
  std::function<void(uint64_t step, double seconds)> step_done;
  // Between the end of a step's events and reset_step (optimizer time).
  std::function<void(uint32_t rank, uint64_t step)> before_reset;
};

struct RunOptions {
  RuntimeOptions runtime;  // rank, world_size, local_group are set per rank
  uint32_t world_size = 1;
  DType dtype = DType::kFloat16;
  // Events of rank 0 go to runtime.events; other ranks log none. Every
  // rank reports to runtime.timeline.
  // Repeat the trace's steps this many times (at least 1).
  uint32_t repeat = 1;
};

struct StepTiming {
  double seconds = 0;         // wall time of the step's events (rank 0)
  double stall_nvme_s = 0;    // fetches waiting for reads
  double stall_device_s = 0;  // fetches waiting for copy + gather
  uint64_t fetch_calls = 0;
  uint64_t fetch_calls_with_demand = 0;
  uint64_t bytes_read = 0;     // swapper bytes read in the step (rank 0)
  uint64_t bytes_needed = 0;   // bytes of the partitions the step used (once per pass)
  uint64_t bytes_written = 0;
};

struct RankResult {
  CoordinatorStats stats;
  std::vector<StepTiming> steps;
  std::string description;
};

Result<std::vector<RankResult>> RunTrace(const TraceFile& trace, const RunOptions& options,
                                         const RunHooks& hooks = {});

// One rank of RunTrace on the calling thread. `group`: the LocalGroup of
// ranks as threads; null takes the collective options.runtime gives (gloo,
// for ranks as processes, each calling this for its own rank).
Status RunTraceRank(const TraceFile& trace, const RunOptions& options, const RunHooks& hooks,
                    uint32_t rank, LocalGroup* group, RankResult* out);

}  // namespace ztier::coordinator
