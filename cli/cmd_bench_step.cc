// `ztier bench step`: training steps of a model shape through the real
// coordinator, swapper and io engine, with the model's compute emulated, and
// the time each step takes against the bound it cannot beat:
//
//   bound = max(compute time, bytes moved / device bandwidth)
//
// where the device bandwidth is measured by `bench io` (sequential read, the
// config's block size and queue depth) on the same path just before the
// steps. The first step records the module trace (no prefetch); the steps
// after it are measured, and the report gives medians over them.
//
// Compute emulation (per module fetch, after its parameters are on the
// device): none (I/O bound), a fixed time, the module's FLOPs at a given
// TFLOP/s (backward counts twice), or "balanced": the step's I/O time
// (bytes read / device bandwidth, from a calibration run) spread over the
// module fetches by the bytes each one swaps in, so compute equals I/O.
//
// Ranks (--world-size > 1): threads of this process over the local
// collective (--ranks threads), or child processes forked from this one,
// connected with the gloo collective through a fresh store directory
// (--ranks processes); each child runs one rank exactly as a thread would and
// sends its figures back in a file. Either way every rank's collective time
// (the coordinator's all-gather spans) is measured per step.
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "cli/bench_util.h"
#include "cli/commands.h"
#include "cli/output.h"
#include "cli/step_util.h"
#include "cli/timeline.h"
#include "coordinator/collective.h"
#include "coordinator/trace_runner.h"
#include "tiering/plan.h"
#include "tiering/units.h"

namespace ztier::cli {
namespace {

using Clock = std::chrono::steady_clock;
// The bandwidth measurement reads at least this much (bytes) so that it runs
// long enough to be stable, and at most this much so that it stays short.
constexpr uint64_t kMinBenchBytes = 256ull << 20;
constexpr uint64_t kMaxBenchBytes = 4ull << 30;
// Sleeping is accurate to about this much (seconds); shorter waits spin.
constexpr double kSpinBelowS = 1e-3;

struct StepArgs {
  std::string model = "tiny";
  std::string config;
  uint32_t world_size = 1;
  double scale = 1.0;
  uint32_t steps = 3;
  std::string compute = "none";
  double tflops = 0;
  bool checkpointing = false;
  bool json = false;
  std::string timeline;
  std::string buffer_elements;
  uint32_t buffer_count = 0;
  bool allow_unpinned = false;
  std::string device_bw;  // bytes/s, skips the measurement
  std::string bench_size;
  bool serial_compute = false;
  uint32_t launch_lead = 2;
  std::string ranks = "threads";  // threads | processes
  int fail_rank = -1;             // testing: this rank's process kills itself in step 1
};

enum class ComputeMode { kNone, kFixed, kBalanced, kFlops };

void PrintError(std::string_view msg) {
  fmt::print(stderr, "ztier bench step: error: {}\n", msg);
}

// Waits until `deadline`. With `spin`: sleep for all but the last
// millisecond (a sleep overshoots by ~0.1 ms, more on a loaded machine) and
// spin the rest, for accuracy below 1 ms. Without: sleep only, leaving the
// core to the pipeline's threads.
void WaitUntil(Clock::time_point deadline, bool spin = true) {
  const auto margin = std::chrono::duration_cast<Clock::duration>(
      std::chrono::duration<double>(kSpinBelowS));
  if (!spin) {
    std::this_thread::sleep_until(deadline);
    return;
  }
  const auto now = Clock::now();
  if (deadline - now > margin) std::this_thread::sleep_until(deadline - margin);
  while (Clock::now() < deadline) {
  }
}

// Scales the element-count thresholds of the config by 1/scale, so that a
// scaled model keeps the same decisions (persistence, reuse, prefetch
// depth) as the full one.
void ScaleThresholds(double scale, tiering::Config* c) {
  auto div = [scale](uint64_t* v) {
    if (*v == tiering::kInfinite) return;
    *v = std::max<uint64_t>(1, static_cast<uint64_t>(std::ceil(static_cast<double>(*v) / scale)));
  };
  div(&c->coordinator.prefetch_bucket_size);
  div(&c->coordinator.max_reuse_distance);
  div(&c->coordinator.param_persistence_threshold);
  div(&c->coordinator.model_persistence_threshold);
  div(&c->tiers.device.max_live_parameters);
  div(&c->tiers.host.max_in_cpu);
  if (c->coordinator.nvme_lookahead) div(&*c->coordinator.nvme_lookahead);
}

// Per-step figures, all ranks together where they add up.
struct StepFigures {
  double seconds = 0;  // slowest rank
  uint64_t bytes_read = 0, bytes_written = 0;
  uint64_t bytes_needed = 0;  // partition bytes the step's fetches used, once per pass
  double stall_nvme_s = 0, stall_device_s = 0;  // rank 0
  double hit_rate = 1;                          // rank 0
  double compute_s = 0;                         // rank 0, emulated
  // Collective spans (all-gathers: copy done .. gather seen complete), mean
  // over ranks: their durations summed, and the time covered by at least
  // one (the collective stream busy or waiting for a peer).
  double collective_sum_s = 0, collective_busy_s = 0;
};

using TimePoint = Clock::time_point;

// The collective spans of each rank, forwarded to `inner` (the timeline)
// when there is one.
class CollectiveMeter : public coordinator::TimelineSink {
 public:
  CollectiveMeter(uint32_t world, coordinator::TimelineSink* inner)
      : spans_(world), inner_(inner) {}
  void Span(uint32_t rank, coordinator::TimelineStage stage, uint64_t id, TimePoint begin,
            TimePoint end) override {
    if (stage == coordinator::TimelineStage::kCollective && rank < spans_.size()) {
      std::lock_guard<std::mutex> lock(mu_);
      spans_[rank].emplace_back(begin, end);
    }
    if (inner_) inner_->Span(rank, stage, id, begin, end);
  }
  // Per step of `rank` (step s starts at starts[s]; a span counts in the
  // step in which it ends, one ending before the first step in step 0):
  // the sum of the span durations and their union, in seconds.
  void PerStep(uint32_t rank, const std::vector<TimePoint>& starts, std::vector<double>* sum,
               std::vector<double>* busy) const {
    sum->assign(starts.size(), 0.0);
    busy->assign(starts.size(), 0.0);
    if (starts.empty()) return;
    std::vector<std::vector<std::pair<TimePoint, TimePoint>>> by_step(starts.size());
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (const auto& sp : spans_[rank]) {
        const size_t s = static_cast<size_t>(
            std::upper_bound(starts.begin(), starts.end(), sp.second) - starts.begin());
        by_step[s == 0 ? 0 : s - 1].push_back(sp);
      }
    }
    for (size_t s = 0; s < by_step.size(); ++s) {
      auto& v = by_step[s];
      std::sort(v.begin(), v.end());
      TimePoint covered_to = TimePoint::min();
      for (const auto& [b, e] : v) {
        (*sum)[s] += std::chrono::duration<double>(e - b).count();
        const TimePoint from = std::max(b, covered_to);
        if (e > from) {
          (*busy)[s] += std::chrono::duration<double>(e - from).count();
          covered_to = e;
        }
      }
    }
  }

 private:
  mutable std::mutex mu_;
  std::vector<std::vector<std::pair<TimePoint, TimePoint>>> spans_;
  coordinator::TimelineSink* inner_;
};

// A child process's timeline spans and steps, sent to the parent and
// replayed into its TimelineRecorder (steady_clock is one clock for all
// processes of the machine).
class SpanBuffer : public coordinator::TimelineSink {
 public:
  void Span(uint32_t rank, coordinator::TimelineStage stage, uint64_t id, TimePoint begin,
            TimePoint end) override {
    std::lock_guard<std::mutex> lock(mu_);
    j_.push_back({rank, static_cast<int>(stage), id, begin.time_since_epoch().count(),
                  end.time_since_epoch().count()});
  }
  void Step(uint32_t rank, uint64_t step, TimePoint begin, TimePoint end) {
    std::lock_guard<std::mutex> lock(mu_);
    j_.push_back({rank, -1, step, begin.time_since_epoch().count(),
                  end.time_since_epoch().count()});
  }
  nlohmann::json Take() {
    std::lock_guard<std::mutex> lock(mu_);
    return std::move(j_);
  }
  static void Replay(const nlohmann::json& spans, TimelineRecorder* to) {
    for (const auto& r : spans) {
      const TimePoint b{Clock::duration(r[3].get<int64_t>())};
      const TimePoint e{Clock::duration(r[4].get<int64_t>())};
      const int stage = r[1].get<int>();
      if (stage < 0) {
        to->Step(r[0].get<uint32_t>(), r[2].get<uint64_t>(), b, e);
      } else {
        to->Span(r[0].get<uint32_t>(), static_cast<coordinator::TimelineStage>(stage),
                 r[2].get<uint64_t>(), b, e);
      }
    }
  }

 private:
  std::mutex mu_;
  nlohmann::json j_ = nlohmann::json::array();
};

nlohmann::json StatsToJson(const coordinator::CoordinatorStats& s) {
  return {s.steps,           s.fetch_calls,        s.fetch_calls_with_demand,
          s.params_fetched,  s.demand_gathers,     s.prefetch_gathers,
          s.prefetch_hits,   s.waits,              s.releases,
          s.nvme_reads,      s.nvme_read_reclaims, s.trace_invalidations,
          s.peak_live_numel, s.peak_swap_buffers,  s.stall_nvme_s,
          s.stall_device_s,  s.live_numel};
}

coordinator::CoordinatorStats StatsFromJson(const nlohmann::json& j) {
  coordinator::CoordinatorStats s;
  size_t i = 0;
  for (uint64_t* f : {&s.steps, &s.fetch_calls, &s.fetch_calls_with_demand, &s.params_fetched,
                      &s.demand_gathers, &s.prefetch_gathers, &s.prefetch_hits, &s.waits,
                      &s.releases, &s.nvme_reads, &s.nvme_read_reclaims,
                      &s.trace_invalidations, &s.peak_live_numel}) {
    *f = j.at(i++).get<uint64_t>();
  }
  s.peak_swap_buffers = j.at(i++).get<uint32_t>();
  s.stall_nvme_s = j.at(i++).get<double>();
  s.stall_device_s = j.at(i++).get<double>();
  s.live_numel = j.at(i++).get<uint64_t>();
  return s;
}

struct RunOutput {
  std::vector<coordinator::RankResult> ranks;
  std::vector<StepFigures> steps;
};

class StepBench {
 public:
  explicit StepBench(const StepArgs& a) : a_(a) {}
  int Run();

 private:
  Status Prepare();
  // Sequential read on the first NVMe path into `out` (bench io).
  Status MeasureDevice(IoBenchResult* out);
  Result<RunOutput> RunSteps(uint32_t steps, bool emulate, TimelineRecorder* timeline);
  // Compute seconds of one module fetch, for the emulated modes.
  double ComputeFor(const coordinator::TraceEvent& e) const;
  void Report(const RunOutput& out);

  const StepArgs& a_;
  coordinator::ModelShape shape_;
  tiering::Config config_;
  coordinator::TraceFile trace_;
  ComputeMode mode_ = ComputeMode::kNone;
  double fixed_s_ = 0;
  uint64_t buffer_elements_ = 0;  // 0: config
  uint32_t buffer_count_ = 0;
  std::vector<std::string> notes_;
  std::map<uint64_t, const coordinator::TraceModule*> modules_;
  std::map<uint64_t, const coordinator::TraceParam*> params_;
  // Balanced mode: seconds of compute per byte a module fetch swaps in.
  std::map<uint64_t, uint64_t> module_bytes_;  // bytes per rank a fetch swaps in
  double seconds_per_byte_ = 0;
  double balanced_io_s_ = 0;
  IoBenchResult device_, device_after_;
  double device_bw_ = 0;  // bytes/s: the mean of the runs before and after the steps
  bool measured_bw_ = false;
};

Status StepBench::Prepare() {
  if (a_.steps == 0) return Status::InvalidArgument("--steps must be at least 1");
  if (a_.ranks != "threads" && a_.ranks != "processes") {
    return Status::InvalidArgument(
        fmt::format("--ranks '{}' is not threads or processes", a_.ranks));
  }
  if (a_.fail_rank >= 0 && (a_.ranks != "processes" ||
                            static_cast<uint32_t>(a_.fail_rank) >= a_.world_size)) {
    return Status::InvalidArgument(
        "--fail-rank needs --ranks processes and a rank below --world-size");
  }
  if (a_.world_size == 0) return Status::InvalidArgument("--world-size must be at least 1");
  if (!(a_.scale >= 1.0)) {
    return Status::InvalidArgument(fmt::format(
        "--scale {} must be at least 1 (it divides every tensor's element count)", a_.scale));
  }
  if (a_.compute == "none") {
    mode_ = ComputeMode::kNone;
  } else if (a_.compute == "balanced") {
    mode_ = ComputeMode::kBalanced;
  } else {
    auto d = ParseDurationSeconds(a_.compute);
    if (!d.ok()) {
      return Status::InvalidArgument(fmt::format(
          "--compute '{}' is not none, balanced or a duration per module (e.g. 2ms)",
          a_.compute));
    }
    mode_ = ComputeMode::kFixed;
    fixed_s_ = *d;
  }
  if (a_.tflops < 0) return Status::InvalidArgument("--tflops must be positive");
  if (a_.tflops > 0) {
    if (mode_ != ComputeMode::kNone) {
      return Status::InvalidArgument("--tflops and --compute exclude each other: give one");
    }
    mode_ = ComputeMode::kFlops;
  }

  ZTIER_ASSIGN_OR_RETURN(std::string model_path, ResolveModelPath(a_.model));
  ZTIER_ASSIGN_OR_RETURN(shape_, coordinator::LoadModelShape(model_path));
  auto config = LoadConfigOrDefaults(a_.config);
  if (!config.ok()) return config.status().WithContext("--config");
  config_ = *config;
  if (config_.tiers.params != tiering::ParamTier::kNvme) {
    notes_.push_back("tiers.params is host: no NVMe traffic, the bound is compute alone");
  }
  if (!a_.bench_size.empty()) {
    // The measurement reads whole io.block_size requests: it needs one.
    auto size = ParseSize(a_.bench_size);
    if (!size.ok()) return size.status().WithContext("--bench-size");
    if (*size < config_.io.block_size) {
      return Status::InvalidArgument(fmt::format(
          "--bench-size {} is smaller than one request of the config's io.block_size ({}): "
          "give at least {}",
          a_.bench_size, FormatSize(config_.io.block_size), FormatSize(config_.io.block_size)));
    }
  }
  if (a_.allow_unpinned) config_.tiers.host.allow_unpinned = true;
  if (a_.ranks == "threads") {
    if (a_.world_size > 1 && config_.comm.backend != tiering::CommBackend::kLocal) {
      // Ranks are threads of this process: the local collective joins them.
      config_.comm.backend = tiering::CommBackend::kLocal;
      notes_.push_back("world size > 1: ranks are threads here, comm.backend set to local");
    }
  } else if (a_.world_size > 1) {
    std::string why;
    if (!coordinator::GlooAvailable(&why)) {
      return Status::Unavailable(
          fmt::format("--ranks processes needs the gloo collective: {}", why));
    }
    if (config_.comm.backend != tiering::CommBackend::kGloo) {
      config_.comm.backend = tiering::CommBackend::kGloo;
      notes_.push_back(
          "world size > 1: ranks are processes here, comm.backend set to gloo (a fresh file "
          "store under the first NVMe path per run)");
    }
  } else {
    notes_.push_back("world size 1: one child process, no collective");
  }
  if (a_.scale != 1.0) {
    ScaleThresholds(a_.scale, &config_);
    notes_.push_back(fmt::format(
        "scale 1/{}: element thresholds (prefetch bucket, reuse distance, persistence, "
        "max live) divided by {} as well, so the scaled model makes the same decisions",
        a_.scale, a_.scale));
  }

  coordinator::TraceGenOptions go;
  go.world_size = a_.world_size;
  go.scale = a_.scale;
  go.checkpointing = a_.checkpointing;
  go.steps = 1;  // the runner repeats it; MoE shapes get their own steps below
  if (shape_.family == "moe") go.steps = a_.steps + 2;
  ZTIER_ASSIGN_OR_RETURN(trace_, coordinator::GenerateTrace(shape_, go));
  for (const auto& m : trace_.modules) modules_[m.id] = &m;
  for (const auto& p : trace_.params) params_[p.id] = &p;

  // Swap buffers.
  const tiering::ModelNumbers numbers =
      ModelNumbersOf(trace_, config_.coordinator.param_persistence_threshold);
  tiering::PlanInput pi;
  pi.model = numbers;
  pi.world_size = a_.world_size;
  pi.config = config_;
  ZTIER_ASSIGN_OR_RETURN(tiering::Plan plan, tiering::MakePlan(pi));
  if (!a_.buffer_elements.empty()) {
    ZTIER_ASSIGN_OR_RETURN(buffer_elements_,
                           tiering::ParseElementCount(a_.buffer_elements,
                                                      {1, tiering::kMaxElements, false}));
  } else if (a_.scale != 1.0) {
    buffer_elements_ = plan.recommend.buffer_size;
  }
  buffer_count_ = a_.buffer_count;
  if (buffer_count_ == 0 && a_.scale != 1.0) buffer_count_ = plan.recommend.buffer_count;
  if (buffer_count_ != 0) config_.tiers.nvme.buffer_count = buffer_count_;
  if (a_.scale != 1.0 && config_.tiers.params == tiering::ParamTier::kNvme) {
    notes_.push_back(fmt::format(
        "swap buffers {} x {} elements ({} pinned): scaled shape, sized from the largest "
        "partition ({} elements) and to cover the drive queue (queue_depth x block_size), "
        "not the config's {} x {} (--buffer-elements, --buffer-count override)",
        config_.tiers.nvme.buffer_count, buffer_elements_,
        tiering::HumanBytes(uint64_t{config_.tiers.nvme.buffer_count} * buffer_elements_ *
                            config_.tiers.nvme.buffer_element_bytes),
        plan.largest_partition, pi.config.tiers.nvme.buffer_count,
        tiering::FormatElementCount(pi.config.tiers.nvme.buffer_size)));
  }

  // Bytes each module fetch swaps in (per rank), for the balanced mode.
  const uint64_t elem = config_.tiers.nvme.buffer_element_bytes;
  for (const auto& m : trace_.modules) {
    uint64_t b = 0;
    for (uint64_t id : m.params) {
      const auto* p = params_[id];
      if (p->persist || p->numel <= config_.coordinator.param_persistence_threshold) continue;
      b += tiering::PartitionElements(p->numel, a_.world_size) * elem;
    }
    module_bytes_[m.id] = b;
  }
  return Status::Ok();
}

Status StepBench::MeasureDevice(IoBenchResult* out) {
  // As much as a step reads, all ranks: each swapped parameter twice
  // (forward and backward), in elements x bytes per element.
  uint64_t step_bytes = 0;
  for (const auto& p : trace_.params) {
    if (p.numel > config_.coordinator.param_persistence_threshold) {
      step_bytes += 2 * p.numel * config_.tiers.nvme.buffer_element_bytes;
    }
  }
  uint64_t size = std::clamp(step_bytes, kMinBenchBytes, kMaxBenchBytes);
  if (!a_.bench_size.empty()) {
    ZTIER_ASSIGN_OR_RETURN(size, ParseSize(a_.bench_size));
  }
  const std::string dir = config_.tiers.nvme.paths.front();
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    return Status::IoError(fmt::format("creating {}: {}", dir, ec.message()));
  }
  IoBenchOptions o;
  o.backend = std::string(tiering::IoBackendConfigName(config_.io.backend));
  o.rw = "read";
  o.bs = std::to_string(config_.io.block_size);
  o.qd = config_.io.queue_depth;
  o.size = std::to_string(size);
  o.files = {dir + "/bench_step_io.dat"};
  o.direct = config_.io.direct;
  o.progress = false;
  if (!a_.json) {
    fmt::print(stderr, "ztier bench step: measuring sequential read on {} ({}, bs {}, qd {})\n",
               dir, FormatSize(size), FormatSize(config_.io.block_size),
               config_.io.queue_depth);
  }
  auto r = RunIoBenchmark(o);
  if (!r.ok()) return r.status().WithContext("measuring the device bandwidth (bench io)");
  *out = *r;
  return Status::Ok();
}

double StepBench::ComputeFor(const coordinator::TraceEvent& e) const {
  switch (mode_) {
    case ComputeMode::kNone: return 0;
    case ComputeMode::kFixed: return fixed_s_;
    case ComputeMode::kBalanced: {
      auto it = module_bytes_.find(e.module);
      return it == module_bytes_.end() ? 0 : seconds_per_byte_ * static_cast<double>(it->second);
    }
    case ComputeMode::kFlops: {
      auto it = modules_.find(e.module);
      if (it == modules_.end()) return 0;
      return static_cast<double>(it->second->flops) * (e.forward ? 1.0 : 2.0) /
             (a_.tflops * 1e12);
    }
  }
  return 0;
}

Result<RunOutput> StepBench::RunSteps(uint32_t steps, bool emulate, TimelineRecorder* timeline) {
  coordinator::RunOptions ro;
  ro.runtime.config = config_;
  ro.runtime.buffer_elements_override = buffer_elements_;
  ro.world_size = a_.world_size;
  const bool moe = trace_.steps.size() > 1;
  ro.repeat = moe ? 1 : steps;
  coordinator::TraceFile trace = trace_;
  if (moe) trace.steps.resize(std::min<size_t>(trace.steps.size(), steps));

  const uint32_t world = a_.world_size;
  const bool processes = a_.ranks == "processes";
  // Where the hooks draw (the recorder, or a child's span buffer) and the
  // collective meter in front of it for the coordinator's spans.
  coordinator::TimelineSink* sink = timeline;
  std::function<void(uint32_t, uint64_t, TimePoint, TimePoint)> mark_step;
  if (timeline) {
    mark_step = [timeline](uint32_t rank, uint64_t step, TimePoint b, TimePoint e) {
      timeline->Step(rank, step, b, e);
    };
  }
  std::vector<Clock::time_point> fetch_begin(world);
  std::vector<Clock::time_point> step_begin(world);
  // step_starts[rank][step]: when the step's first fetch began.
  std::vector<std::vector<Clock::time_point>> step_starts(world);
  // The emulated device's compute stream, per rank: when its last queued
  // module compute ends.
  std::vector<Clock::time_point> device_free(world);
  // End times of the module computes queued on it, oldest first.
  std::vector<std::deque<Clock::time_point>> queued(world);
  // step_s[rank][step]: first fetch to the end of the step's last compute.
  std::vector<std::vector<double>> step_s(world, std::vector<double>(steps + 1, 0.0));
  // compute_s[rank][step]: emulated seconds.
  std::vector<std::vector<double>> compute_s(world, std::vector<double>(steps + 1, 0.0));
  // Collective seconds per rank and step: span sum, and busy (union).
  std::vector<std::vector<double>> coll_sum(world), coll_busy(world);
  std::vector<uint8_t> started(world, 0);
  coordinator::RunHooks hooks;
  hooks.before_fetch = [&](uint32_t rank, uint64_t step, const coordinator::TraceEvent&) {
    const auto now = Clock::now();
    fetch_begin[rank] = now;
    if (!started[rank]) {
      step_begin[rank] = now;
      step_starts[rank].push_back(now);
      started[rank] = 1;
    }
    if (processes && a_.fail_rank >= 0 && rank == static_cast<uint32_t>(a_.fail_rank) &&
        step == 1) {
      fmt::print(stderr, "ztier bench step: rank {}: --fail-rank: killing this process\n",
                 rank);
      fflush(stderr);
      raise(SIGKILL);
    }
  };
  hooks.after_fetch = [&](uint32_t rank, uint64_t step, const coordinator::TraceEvent& e) {
    const auto t0 = Clock::now();
    if (sink) {
      sink->Span(rank, coordinator::TimelineStage::kFetchStall, e.module, fetch_begin[rank], t0);
    }
    const double c = emulate ? ComputeFor(e) : 0.0;
    if (c <= 0) return;
    const auto dur = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(c));
    if (step < compute_s[rank].size()) compute_s[rank][step] += c;
    if (a_.serial_compute) {
      WaitUntil(t0 + dur);
      if (sink) {
        sink->Span(rank, coordinator::TimelineStage::kCompute, e.module, t0, Clock::now());
      }
      return;
    }
    // As a trainer whose kernels queue on the device: the module's compute
    // starts once its parameters are there and the previous module's
    // compute is done; the host goes on to the next hooks meanwhile and
    // waits only when --launch-lead module computes are queued. The
    // compute times are the emulated device's, exact by construction, so
    // the host sleeps (a late wake-up only delays the next fetch) and
    // leaves its core to the I/O and copy threads, as a GPU would.
    const auto begin = std::max(t0, device_free[rank]);
    device_free[rank] = begin + dur;
    auto& q = queued[rank];
    q.push_back(begin + dur);
    while (q.size() > std::max<uint32_t>(1, a_.launch_lead)) {
      WaitUntil(q.front(), /*spin=*/false);
      q.pop_front();
    }
    if (sink) {
      sink->Span(rank, coordinator::TimelineStage::kCompute, e.module, begin, begin + dur);
    }
  };
  hooks.before_reset = [&](uint32_t rank, uint64_t step) {
    // The step ends when the device has finished its compute.
    WaitUntil(device_free[rank], /*spin=*/false);
    queued[rank].clear();
    device_free[rank] = std::min(device_free[rank], Clock::now());
    const auto end = Clock::now();
    if (step < step_s[rank].size()) {
      step_s[rank][step] = std::chrono::duration<double>(end - step_begin[rank]).count();
    }
    if (mark_step) mark_step(rank, step, step_begin[rank], end);
    started[rank] = 0;
  };
  Progress progress("ztier bench step:", steps, !a_.json || isatty(STDERR_FILENO));
  // Rank 0 reports after its before_reset: step_s holds the step's time.
  hooks.step_done = [&](uint64_t step, double) {
    const double seconds = step < step_s[0].size() ? step_s[0][step] : 0.0;
    progress.Update(step + 1, fmt::format("step {}{}: {:.3f} s", step,
                                          step == 0 ? " (records the trace)" : "", seconds));
  };
  RunOutput out;
  if (!processes) {
    std::unique_ptr<CollectiveMeter> meter;
    if (world > 1) meter = std::make_unique<CollectiveMeter>(world, timeline);
    ro.runtime.timeline = meter ? meter.get() : static_cast<coordinator::TimelineSink*>(timeline);
    auto result = coordinator::RunTrace(trace, ro, hooks);
    progress.Finish();
    if (!result.ok()) return result.status();
    out.ranks = std::move(result).value();
    for (uint32_t rank = 0; rank < world; ++rank) {
      if (meter) meter->PerStep(rank, step_starts[rank], &coll_sum[rank], &coll_busy[rank]);
    }
  } else {
    // A fresh directory for the gloo store and the children's results.
    std::string base = config_.tiers.nvme.paths.front();
    std::error_code ec;
    std::filesystem::create_directories(base, ec);
    std::string tmpl = base + "/bench_step_ranks.XXXXXX";
    if (mkdtemp(tmpl.data()) == nullptr) {
      return Status::FromErrno(errno, fmt::format("creating a directory like {}", tmpl));
    }
    const std::string run_dir = tmpl;
    const std::string store_dir = run_dir + "/gloo_store";
    std::filesystem::create_directories(store_dir, ec);
    if (ec) return Status::IoError(fmt::format("creating {}: {}", store_dir, ec.message()));
    ro.runtime.gloo.store_path = store_dir;
    // Past comm.timeout every rank of a broken group has failed on its own.
    const auto grace = std::chrono::milliseconds(1000ull * config_.comm.timeout + 10'000);
    auto payloads = RunInChildProcesses(
        world, run_dir, grace, [&](uint32_t rank) -> Result<std::string> {
          SpanBuffer buffer;
          if (timeline) {
            sink = &buffer;
            mark_step = [&buffer](uint32_t r, uint64_t s, TimePoint b, TimePoint e) {
              buffer.Step(r, s, b, e);
            };
          }
          std::unique_ptr<CollectiveMeter> meter;
          if (world > 1) meter = std::make_unique<CollectiveMeter>(world, sink);
          coordinator::RunOptions mine = ro;
          mine.runtime.timeline = meter ? meter.get() : sink;
          coordinator::RankResult rr;
          Status s = coordinator::RunTraceRank(trace, mine, hooks, rank, nullptr, &rr);
          if (rank == 0) progress.Finish();
          if (!s.ok()) return s;
          std::vector<double> sum, busy;
          if (meter) meter->PerStep(rank, step_starts[rank], &sum, &busy);
          nlohmann::json st = nlohmann::json::array();
          for (const auto& x : rr.steps) {
            st.push_back({x.seconds, x.stall_nvme_s, x.stall_device_s, x.fetch_calls,
                          x.fetch_calls_with_demand, x.bytes_read, x.bytes_written,
                          x.bytes_needed});
          }
          nlohmann::json j = {{"description", rr.description},
                              {"stats", StatsToJson(rr.stats)},
                              {"steps", st},
                              {"step_s", step_s[rank]},
                              {"compute_s", compute_s[rank]},
                              {"collective_sum_s", sum},
                              {"collective_busy_s", busy},
                              {"timeline", timeline ? buffer.Take() : nlohmann::json::array()}};
          return j.dump();
        });
    std::filesystem::remove_all(run_dir, ec);
    if (!payloads.ok()) return payloads.status();
    out.ranks.resize(world);
    for (uint32_t rank = 0; rank < world; ++rank) {
      try {
        const auto j = nlohmann::json::parse((*payloads)[rank]);
        auto& rr = out.ranks[rank];
        rr.description = j.at("description").get<std::string>();
        rr.stats = StatsFromJson(j.at("stats"));
        for (const auto& x : j.at("steps")) {
          coordinator::StepTiming t;
          t.seconds = x[0].get<double>();
          t.stall_nvme_s = x[1].get<double>();
          t.stall_device_s = x[2].get<double>();
          t.fetch_calls = x[3].get<uint64_t>();
          t.fetch_calls_with_demand = x[4].get<uint64_t>();
          t.bytes_read = x[5].get<uint64_t>();
          t.bytes_written = x[6].get<uint64_t>();
          t.bytes_needed = x[7].get<uint64_t>();
          rr.steps.push_back(t);
        }
        step_s[rank] = j.at("step_s").get<std::vector<double>>();
        compute_s[rank] = j.at("compute_s").get<std::vector<double>>();
        coll_sum[rank] = j.at("collective_sum_s").get<std::vector<double>>();
        coll_busy[rank] = j.at("collective_busy_s").get<std::vector<double>>();
        if (timeline) SpanBuffer::Replay(j.at("timeline"), timeline);
      } catch (const std::exception& e) {
        return Status::Internal(fmt::format("rank {}'s result: {}", rank, e.what()));
      }
    }
  }
  const size_t n = out.ranks[0].steps.size();
  for (size_t s = 0; s < n; ++s) {
    StepFigures f;
    for (uint32_t rank = 0; rank < world; ++rank) {
      const auto& r = out.ranks[rank];
      if (s >= r.steps.size()) continue;
      f.seconds = std::max(f.seconds, s < step_s[rank].size() ? step_s[rank][s] : 0.0);
      f.bytes_read += r.steps[s].bytes_read;
      f.bytes_written += r.steps[s].bytes_written;
      f.bytes_needed += r.steps[s].bytes_needed;
      if (s < coll_sum[rank].size()) f.collective_sum_s += coll_sum[rank][s] / world;
      if (s < coll_busy[rank].size()) f.collective_busy_s += coll_busy[rank][s] / world;
    }
    const auto& st = out.ranks[0].steps[s];
    f.stall_nvme_s = st.stall_nvme_s;
    f.stall_device_s = st.stall_device_s;
    f.hit_rate = st.fetch_calls
                     ? static_cast<double>(st.fetch_calls - st.fetch_calls_with_demand) /
                           static_cast<double>(st.fetch_calls)
                     : 1.0;
    f.compute_s = s < compute_s[0].size() ? compute_s[0][s] : 0;
    out.steps.push_back(f);
  }
  return out;
}

void StepBench::Report(const RunOutput& out) {
  // Measured steps: all but the recording one.
  std::vector<StepFigures> m(out.steps.begin() + 1, out.steps.end());
  auto med = [&](auto field) {
    std::vector<double> v;
    for (const auto& f : m) v.push_back(static_cast<double>(field(f)));
    return Median(v);
  };
  auto bound_of = [&](const StepFigures& f) {
    const double io = device_bw_ > 0 ? static_cast<double>(f.bytes_read + f.bytes_written) /
                                           device_bw_
                                     : 0.0;
    return std::max(f.compute_s, io);
  };
  const double step_s = med([](const StepFigures& f) { return f.seconds; });
  const double bound_s = med(bound_of);
  const double compute_s = med([](const StepFigures& f) { return f.compute_s; });
  const double read = med([](const StepFigures& f) { return f.bytes_read; });
  const double written = med([](const StepFigures& f) { return f.bytes_written; });
  const double needed = med([](const StepFigures& f) { return f.bytes_needed; });
  // Read overhead: bytes read over bytes the step's fetches used.
  const double read_over_needed = med([](const StepFigures& f) {
    return f.bytes_needed ? static_cast<double>(f.bytes_read) / f.bytes_needed : 0.0;
  });
  const double eff_bw = med([](const StepFigures& f) {
    return f.seconds > 0 ? static_cast<double>(f.bytes_read) / f.seconds : 0.0;
  });
  const double stall_nvme = med([](const StepFigures& f) { return f.stall_nvme_s; });
  const double stall_dev = med([](const StepFigures& f) { return f.stall_device_s; });
  const double hit = med([](const StepFigures& f) { return f.hit_rate; });
  const double coll_sum = med([](const StepFigures& f) { return f.collective_sum_s; });
  const double coll_busy = med([](const StepFigures& f) { return f.collective_busy_s; });
  const auto& r0 = out.ranks[0];
  const uint64_t elem = config_.tiers.nvme.buffer_element_bytes;
  const uint64_t buffer_bytes =
      (buffer_elements_ ? buffer_elements_ : config_.tiers.nvme.buffer_size) * elem;
  const uint64_t peak_pinned = uint64_t{r0.stats.peak_swap_buffers} * buffer_bytes;
  const uint64_t pool_bytes = uint64_t{config_.tiers.nvme.buffer_count} * buffer_bytes;
  const uint64_t peak_device = r0.stats.peak_live_numel * elem;
  const char* mode_name = mode_ == ComputeMode::kNone       ? "none"
                          : mode_ == ComputeMode::kFixed    ? "fixed"
                          : mode_ == ComputeMode::kBalanced ? "balanced"
                                                            : "flops";

  if (a_.json) {
    nlohmann::json per_step = nlohmann::json::array();
    for (size_t i = 0; i < out.steps.size(); ++i) {
      const auto& f = out.steps[i];
      per_step.push_back({{"step", i},
                          {"measured", i > 0},
                          {"seconds", f.seconds},
                          {"bound_seconds", bound_of(f)},
                          {"compute_seconds", f.compute_s},
                          {"bytes_read", f.bytes_read},
                          {"bytes_written", f.bytes_written},
                          {"bytes_needed", f.bytes_needed},
                          {"stall_nvme_seconds", f.stall_nvme_s},
                          {"stall_device_seconds", f.stall_device_s},
                          {"prefetch_hit_rate", f.hit_rate},
                          {"collective_seconds_per_rank", f.collective_sum_s},
                          {"collective_busy_seconds_per_rank", f.collective_busy_s}});
    }
    nlohmann::json j = {
        {"model", shape_.name},
        {"world_size", a_.world_size},
        {"ranks", a_.ranks},
        {"scale", a_.scale},
        {"steps", m.size()},
        {"compute", mode_name},
        {"step_seconds", step_s},
        {"bound_seconds", bound_s},
        {"step_over_bound", bound_s > 0 ? step_s / bound_s : 0.0},
        {"compute_seconds", compute_s},
        {"bytes_read", read},
        {"bytes_written", written},
        {"bytes_needed", needed},
        {"read_over_needed", read_over_needed},
        {"effective_read_bw_bytes_per_s", eff_bw},
        {"device_read_bw_bytes_per_s", device_bw_},
        {"effective_over_device_bw", device_bw_ > 0 ? eff_bw / device_bw_ : 0.0},
        {"device_bw_measured", measured_bw_},
        {"prefetch_hit_rate", hit},
        {"stall_seconds", {{"nvme", stall_nvme}, {"h2d_collective", stall_dev}}},
        {"collective_seconds_per_rank", coll_sum},
        {"collective_busy_seconds_per_rank", coll_busy},
        {"peak_pinned_bytes", peak_pinned},
        {"pinned_pool_bytes", pool_bytes},
        {"peak_device_bytes", peak_device},
        {"swap_buffers", {{"count", config_.tiers.nvme.buffer_count},
                          {"bytes", buffer_bytes}}},
        {"io", {{"backend", std::string(tiering::IoBackendConfigName(config_.io.backend))},
                {"block_size", config_.io.block_size},
                {"queue_depth", config_.io.queue_depth}}},
        {"rank0", r0.description},
        {"notes", notes_},
        {"per_step", per_step},
    };
    if (mode_ == ComputeMode::kFixed) j["compute_per_module_seconds"] = fixed_s_;
    if (mode_ == ComputeMode::kFlops) j["tflops"] = a_.tflops;
    if (mode_ == ComputeMode::kBalanced) j["balanced_io_seconds"] = balanced_io_s_;
    if (measured_bw_) {
      j["device_bench"] = {{"backend", device_.backend},
                           {"bs", device_.bs},
                           {"qd", device_.qd},
                           {"bytes", device_.bytes},
                           {"bw_before_bytes_per_s", device_.bw_bytes_per_s},
                           {"bw_after_bytes_per_s", device_after_.bw_bytes_per_s},
                           {"file", device_.file}};
    }
    if (!a_.timeline.empty()) j["timeline"] = a_.timeline;
    std::cout << WithRunInfo(std::move(j)).dump(2) << std::endl;
    return;
  }
  fmt::print("ztier bench step: {}{}, world size {} ({}), {} measured steps after 1 recording "
             "step, compute {}{}\n",
             shape_.name, a_.scale != 1.0 ? fmt::format(" (scale 1/{})", a_.scale) : "",
             a_.world_size, a_.ranks, m.size(), mode_name,
             mode_ == ComputeMode::kFixed   ? fmt::format(" ({} s per module)", fixed_s_)
             : mode_ == ComputeMode::kFlops ? fmt::format(" ({} TFLOP/s)", a_.tflops)
                                            : "");
  fmt::print("  {}\n", r0.description);
  for (const auto& n : notes_) fmt::print("  note: {}\n", n);
  if (read == 0 && config_.tiers.params == tiering::ParamTier::kNvme) {
    fmt::print("  note: no parameter was read after the recording step: all stay gathered "
               "(persistence threshold, max_reuse_distance); try a larger model\n");
  }
  if (measured_bw_) {
    fmt::print("  device bandwidth: {:.3f} GB/s, mean of {:.3f} before and {:.3f} after the "
               "steps (bench io: sequential read, {} backend, bs {}, qd {}, {} of {})\n",
               device_bw_ / 1e9, device_.bw_bytes_per_s / 1e9,
               device_after_.bw_bytes_per_s / 1e9, device_.backend, FormatSize(device_.bs),
               device_.qd, FormatSize(device_.bytes), device_.file);
  } else if (device_bw_ > 0) {
    fmt::print("  device bandwidth: {:.3f} GB/s (given)\n", device_bw_ / 1e9);
  }
  fmt::print("  {:<28} {:>14}\n", "median over measured steps", "");
  auto row = [](std::string_view name, std::string value) {
    fmt::print("  {:<28} {:>14}\n", name, value);
  };
  row("step time", fmt::format("{:.4f} s", step_s));
  row("bound", fmt::format("{:.4f} s", bound_s));
  row("step / bound", fmt::format("{:.3f}", bound_s > 0 ? step_s / bound_s : 0.0));
  row("compute", fmt::format("{:.4f} s", compute_s));
  row("bytes read", tiering::HumanBytes(static_cast<uint64_t>(read)));
  row("bytes needed", tiering::HumanBytes(static_cast<uint64_t>(needed)));
  row("read / needed", fmt::format("{:.3f}", read_over_needed));
  row("bytes written", tiering::HumanBytes(static_cast<uint64_t>(written)));
  row("effective read bw", fmt::format("{:.3f} GB/s", eff_bw / 1e9));
  if (device_bw_ > 0) row("effective / device bw", fmt::format("{:.3f}", eff_bw / device_bw_));
  row("stall nvme (rank 0)", fmt::format("{:.4f} s", stall_nvme));
  row("stall h2d+collective", fmt::format("{:.4f} s", stall_dev));
  row("prefetch hit rate", fmt::format("{:.4f}", hit));
  if (a_.world_size > 1) {
    row("collective / rank", fmt::format("{:.4f} s", coll_sum));
    row("collective busy / rank", fmt::format("{:.4f} s", coll_busy));
  }
  row("peak pinned in use", tiering::HumanBytes(peak_pinned));
  row("pinned pool", tiering::HumanBytes(pool_bytes));
  row("peak device (params)", tiering::HumanBytes(peak_device));
  if (!a_.timeline.empty()) {
    fmt::print("  timeline: {} (open in https://ui.perfetto.dev or chrome://tracing)\n",
               a_.timeline);
  }
}

int StepBench::Run() {
  if (Status s = Prepare(); !s.ok()) {
    PrintError(s.ToString());
    return ExitCodeFor(s);
  }
  if (!a_.device_bw.empty()) {
    auto bw = tiering::ParseByteSize(a_.device_bw, {1, tiering::kMaxElements, false});
    if (!bw.ok()) {
      PrintError(bw.status().WithContext("--device-bw (bytes per second)").ToString());
      return kExitUsage;
    }
    device_bw_ = static_cast<double>(*bw);
  } else if (config_.tiers.params == tiering::ParamTier::kNvme) {
    if (Status s = MeasureDevice(&device_); !s.ok()) {
      PrintError(s.ToString());
      return ExitCodeFor(s);
    }
    device_bw_ = device_.bw_bytes_per_s;
    measured_bw_ = true;
  }
  if (mode_ == ComputeMode::kBalanced) {
    if (device_bw_ <= 0) {
      PrintError("--compute balanced needs the device bandwidth (params on NVMe or --device-bw)");
      return kExitUsage;
    }
    // Calibration: the I/O time of a step, measured as the time of the
    // I/O-bound steps (no compute) after the recording one, averaged.
    if (!a_.json) fmt::print(stderr, "ztier bench step: calibration run (no compute)\n");
    constexpr uint32_t kCalibrationSteps = 2;
    auto cal = RunSteps(kCalibrationSteps + 1, /*emulate=*/false, nullptr);
    if (!cal.ok()) {
      PrintError(cal.status().ToString());
      return ExitCodeFor(cal.status());
    }
    for (size_t i = 1; i < cal->steps.size(); ++i) {
      balanced_io_s_ += cal->steps[i].seconds / static_cast<double>(cal->steps.size() - 1);
    }
    notes_.push_back(fmt::format(
        "balanced: compute per step {:.4f} s = the I/O-bound step time of a calibration run "
        "(mean of {} steps), spread over the module fetches by the bytes each swaps in",
        balanced_io_s_, kCalibrationSteps));
    uint64_t fetch_bytes = 0;  // per rank, over the step's fetches
    for (const auto& e : trace_.steps.front()) {
      if (e.op == coordinator::TraceOp::kFetch) fetch_bytes += module_bytes_[e.module];
    }
    seconds_per_byte_ = fetch_bytes ? balanced_io_s_ / static_cast<double>(fetch_bytes) : 0;
  }
  std::unique_ptr<TimelineRecorder> timeline;
  if (!a_.timeline.empty()) timeline = std::make_unique<TimelineRecorder>(Clock::now());
  auto out = RunSteps(a_.steps + 1, /*emulate=*/true, timeline.get());
  if (!out.ok()) {
    PrintError(out.status().ToString());
    return ExitCodeFor(out.status());
  }
  if (measured_bw_) {
    // Again after the steps: a shared drive drifts (seconds-scale swings of
    // tens of percent), so the bound uses the mean of the two runs, which
    // bracket the steps.
    if (Status s = MeasureDevice(&device_after_); !s.ok()) {
      PrintError(s.ToString());
      return ExitCodeFor(s);
    }
    device_bw_ = (device_.bw_bytes_per_s + device_after_.bw_bytes_per_s) / 2;
  }
  if (timeline) {
    TimelineRecorder::Names names;
    names.param = [this](uint64_t id) {
      auto it = params_.find(id);
      return it != params_.end() && !it->second->name.empty() ? it->second->name
                                                              : fmt::format("param {}", id);
    };
    names.module = [this](uint64_t id) {
      auto it = modules_.find(id);
      return it != modules_.end() ? it->second->name : fmt::format("module {}", id);
    };
    if (Status s = timeline->Write(a_.timeline, names); !s.ok()) {
      PrintError(s.ToString());
      return ExitCodeFor(s);
    }
  }
  Report(*out);
  return 0;
}

constexpr const char* kFooter = R"(
The model is a shape file or a name in configs/models/ (tiny, llama-tiny,
gpt2-xl, llama2-7b, llama2-13b, llama2-70b, moe-small). --scale N divides
every tensor's element count by N (and the config's element thresholds with
it), keeping layers, modules and order: a 70B shape on a small disk. Scaled
shapes get swap buffers sized from the largest partition, enough of them to
cover the drive queue (--buffer-elements / --buffer-count override).
Before and after the steps, `bench io` measures sequential read on the first
NVMe path (config block size and queue depth, a file as large as a step's
reads, 256 MiB to 4 GiB); the bound uses the mean of the two (--device-bw
gives it instead). Step 0 records the trace; --steps more are measured;
figures are medians over them, bytes summed over ranks.
  bound = max(compute, (bytes read + written) / device bandwidth)
--compute: none (I/O bound), a time per module fetch (2ms, 500us), or
balanced (a calibration run without compute measures the I/O time of a step;
compute per fetch = its share of the step's swapped-in bytes x that time, so
compute equals I/O and the step should take the bound, not twice). --tflops T:
each module's FLOPs (backward x2) at T TFLOP/s per rank. Compute runs on an
emulated device stream: a module computes once its fetch returned and the
previous module is done; the host runs on (as with kernels queued on a GPU)
and waits only when --launch-lead module computes are queued; the step ends
when the last compute does. --serial-compute makes the host wait out every
module.
--ranks threads (default): the ranks are threads of this process over the
local collective. --ranks processes: one forked child process per rank, the
same work, connected by the gloo collective (TCP) through a fresh store
directory under the first NVMe path; a failing rank fails the run with its
error (the others within comm.timeout). World size > 1 reports the collective
time per rank and step: the coordinator's all-gather spans (copy done ..
gather seen complete) summed, and "busy": the time covered by at least one.
--timeline FILE writes a Chrome trace-event JSON (Perfetto): per rank, tracks
for step, fetch stall, compute, nvme read, h2d, collective.
Progress goes to stderr (a bar on a terminal, a line per step otherwise).)";

}  // namespace

void RegisterBenchStep(CLI::App& bench, int* exit_code) {
  auto a = std::make_shared<StepArgs>();
  CLI::App* cmd = bench.add_subcommand(
      "step", "Training steps of a model shape through coordinator, swapper and io engine, "
              "against the bound max(compute, bytes / device bandwidth)");
  cmd->add_option("--model", a->model, "Model shape: file or name in configs/models/")
      ->capture_default_str();
  cmd->add_option("--config", a->config,
                  "ztier YAML config: file or name in configs/ (default: built-in defaults)");
  cmd->add_option("--world-size", a->world_size, "Ranks")->capture_default_str();
  cmd->add_option("--ranks", a->ranks,
                  "threads: ranks are threads of this process (local collective); processes: "
                  "forked child processes (gloo collective)")
      ->capture_default_str()
      ->check(CLI::IsMember({"threads", "processes"}));
  cmd->add_option("--fail-rank", a->fail_rank,
                  "Testing: this rank's process kills itself in step 1 (--ranks processes)")
      ->group("");
  cmd->add_option("--scale", a->scale, "Divide every tensor's element count by this")
      ->capture_default_str();
  cmd->add_option("--steps", a->steps, "Measured steps (after the recording step)")
      ->capture_default_str();
  cmd->add_option("--compute", a->compute,
                  "Compute per module fetch: none, balanced, or a time (2ms)")
      ->capture_default_str();
  cmd->add_option("--tflops", a->tflops, "Compute = module FLOPs at this many TFLOP/s");
  cmd->add_flag("--serial-compute", a->serial_compute,
                "Host waits out each module's compute before its next hook (no launch lead)");
  cmd->add_option("--launch-lead", a->launch_lead,
                  "Module computes queued on the emulated device before the host waits")
      ->capture_default_str()
      ->check(CLI::Range(1u, 1024u));
  cmd->add_flag("--checkpointing", a->checkpointing,
                "Activation checkpointing (forward modules rerun in backward)");
  cmd->add_flag("--json", a->json, "Print one JSON object on stdout");
  cmd->add_option("--timeline", a->timeline, "Write a Chrome trace-event JSON timeline here");
  cmd->add_option("--buffer-elements", a->buffer_elements, "Elements per swap buffer");
  cmd->add_option("--buffer-count", a->buffer_count, "Swap buffers");
  cmd->add_flag("--allow-unpinned", a->allow_unpinned,
                "Continue with pageable swap buffers when pinning is refused (memlock)");
  cmd->add_option("--device-bw", a->device_bw,
                  "Device read bandwidth in bytes/s (e.g. 2e9): skip measuring it");
  cmd->add_option("--bench-size", a->bench_size, "Bytes the bandwidth measurement reads");
  cmd->footer(kFooter);
  cmd->callback([a, exit_code] {
    StepBench bench(*a);
    *exit_code = bench.Run();
  });
}

}  // namespace ztier::cli
