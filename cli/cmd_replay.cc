// `ztier replay`: runs a ztier-trace-v1 file through the real coordinator and
// swapper, writes the event log and prints the counters.
#include <cstdio>

#include <fmt/format.h>

#include "cli/commands.h"
#include "cli/output.h"
#include "cli/step_util.h"
#include "coordinator/event_log.h"
#include "coordinator/trace_runner.h"
#include "tiering/config.h"
#include "tiering/units.h"

namespace ztier::cli {
namespace {

struct ReplayArgs {
  std::string trace, events, config;
  bool null_io = false;
  uint32_t world_size = 0;
  uint32_t repeat = 1;
  uint32_t warmup_steps = 1;  // steps left out of the hit rate
  std::string buffer_elements;
  std::string device = "host";
  std::string trace_policy;  // overrides coordinator.trace_policy
};

// Applies the trace's "config" overrides ("coordinator.prefetch_bucket_size":
// "50000000", ...) to the coordinator section.
Status ApplyOverrides(const coordinator::TraceFile& t, tiering::Config* c) {
  tiering::Limits any{0, tiering::kInfinite, true};
  for (const auto& [key, value] : t.config) {
    std::string v = value;
    if (v.size() >= 2 && v.front() == '"') v = v.substr(1, v.size() - 2);
    uint64_t* field = nullptr;
    if (key == "coordinator.prefetch_bucket_size") field = &c->coordinator.prefetch_bucket_size;
    if (key == "coordinator.max_reuse_distance") field = &c->coordinator.max_reuse_distance;
    if (key == "coordinator.param_persistence_threshold")
      field = &c->coordinator.param_persistence_threshold;
    if (key == "coordinator.model_persistence_threshold")
      field = &c->coordinator.model_persistence_threshold;
    if (key == "tiers.device.max_live_parameters") field = &c->tiers.device.max_live_parameters;
    if (field == nullptr) {
      return Status::InvalidArgument(fmt::format(
          "trace config key '{}' is not supported in traces (use a --config file)", key));
    }
    ZTIER_ASSIGN_OR_RETURN(*field, tiering::ParseElementCount(v, any));
  }
  return Status::Ok();
}

int RunReplay(const ReplayArgs& a) {
  if (a.null_io && a.device == "cuda") {
    // --null-io creates no device at all; silently running without the GPU
    // asked for would report figures of something else.
    fprintf(stderr,
            "ztier replay: --device cuda and --null-io exclude each other (--null-io runs the "
            "bookkeeping only, with no device): drop one\n");
    return kExitUsage;
  }
  auto path = ResolveTracePath(a.trace);
  if (!path.ok()) {
    fprintf(stderr, "ztier replay: %s\n", path.status().ToString().c_str());
    return kExitUsage;
  }
  auto trace = coordinator::LoadTrace(*path);
  if (!trace.ok()) {
    fprintf(stderr, "ztier replay: %s\n", trace.status().ToString().c_str());
    return kExitUsage;
  }
  auto loaded = LoadConfigOrDefaults(a.config);
  if (!loaded.ok()) {
    fprintf(stderr, "ztier replay: %s\n", loaded.status().ToString().c_str());
    return kExitUsage;
  }
  tiering::Config config = *loaded;
  if (Status s = ApplyOverrides(*trace, &config); !s.ok()) {
    fprintf(stderr, "ztier replay: %s\n", s.ToString().c_str());
    return kExitUsage;
  }
  if (!a.trace_policy.empty()) {
    config.coordinator.trace_policy = a.trace_policy == "single" ? tiering::TracePolicy::kSingle
                                                                 : tiering::TracePolicy::kAdaptive;
  }
  std::unique_ptr<coordinator::JsonLinesSink> sink;
  if (!a.events.empty()) {
    auto s = coordinator::JsonLinesSink::Open(a.events);
    if (!s.ok()) {
      fprintf(stderr, "ztier replay: %s\n", s.status().ToString().c_str());
      return kExitUsage;
    }
    sink = std::move(s).value();
  }
  coordinator::RunOptions ro;
  ro.runtime.config = config;
  ro.runtime.null_io = a.null_io;
  ro.runtime.events = sink.get();
  if (a.device == "host") {
    ro.runtime.device = coordinator::DeviceKind::kHost;
  } else if (a.device == "cuda") {
    ro.runtime.device = coordinator::DeviceKind::kCuda;
  } else {
    ro.runtime.device = coordinator::DeviceKind::kAuto;
  }
  if (!a.buffer_elements.empty()) {
    auto n = tiering::ParseElementCount(a.buffer_elements, {1, tiering::kMaxElements, false});
    if (!n.ok()) {
      fprintf(stderr, "ztier replay: --buffer-elements: %s\n", n.status().ToString().c_str());
      return kExitUsage;
    }
    ro.runtime.buffer_elements_override = *n;
  }
  ro.world_size = a.world_size ? a.world_size : trace->world_size;
  ro.repeat = a.repeat;
  coordinator::RunHooks hooks;
  hooks.step_done = [](uint64_t step, double s) {
    fprintf(stderr, "step %llu: %.3f s\n", static_cast<unsigned long long>(step), s);
  };
  auto result = coordinator::RunTrace(*trace, ro, hooks);
  if (sink) (void)sink->Close();
  if (!result.ok()) {
    fprintf(stderr, "ztier replay: %s\n", result.status().ToString().c_str());
    return ExitCodeFor(result.status());
  }
  const auto& r0 = (*result)[0];
  const auto& s = r0.stats;
  printf("%s\n", r0.description.c_str());
  printf("steps %llu, fetch calls %llu (with a demand gather: %llu)\n",
         (unsigned long long)s.steps, (unsigned long long)s.fetch_calls,
         (unsigned long long)s.fetch_calls_with_demand);
  printf("gathers: demand %llu, prefetch %llu; prefetch hits %llu of %llu params fetched\n",
         (unsigned long long)s.demand_gathers, (unsigned long long)s.prefetch_gathers,
         (unsigned long long)s.prefetch_hits, (unsigned long long)s.params_fetched);
  printf("releases %llu, nvme reads %llu (reclaimed %llu), trace invalidations %llu\n",
         (unsigned long long)s.releases, (unsigned long long)s.nvme_reads,
         (unsigned long long)s.nvme_read_reclaims, (unsigned long long)s.trace_invalidations);
  printf("trace (%s): orders %llu, steps on one order %llu, switches %llu, resyncs %llu, "
         "off-trace fetches %llu\n",
         std::string(tiering::TracePolicyName(config.coordinator.trace_policy)).c_str(),
         (unsigned long long)s.trace_orders, (unsigned long long)s.steps_on_order,
         (unsigned long long)s.trace_switches, (unsigned long long)s.trace_resyncs,
         (unsigned long long)s.trace_off);
  printf("choices: hints %llu (params gathered %llu); guesses right %llu, wrong %llu "
         "(params gathered %llu, wasted %llu); repacks %llu\n",
         (unsigned long long)s.hints, (unsigned long long)s.hint_gathers,
         (unsigned long long)s.speculation_hits, (unsigned long long)s.speculation_misses,
         (unsigned long long)s.speculative_gathers, (unsigned long long)s.speculation_wasted,
         (unsigned long long)s.repacks);
  printf("peak live %llu elements, peak swap buffers %u\n",
         (unsigned long long)s.peak_live_numel, s.peak_swap_buffers);
  printf("stall: nvme %.3f s, device %.3f s\n", s.stall_nvme_s, s.stall_device_s);
  // Fetches after the warm-up steps that needed no demand gather.
  uint64_t calls = 0, demand = 0;
  for (size_t i = a.warmup_steps; i < r0.steps.size(); ++i) {
    calls += r0.steps[i].fetch_calls;
    demand += r0.steps[i].fetch_calls_with_demand;
  }
  if (a.warmup_steps >= r0.steps.size()) {
    printf("prefetch hit rate: no steps after the %u warm-up steps (the run played %zu); "
           "lower --warmup-steps or raise --repeat\n",
           a.warmup_steps, r0.steps.size());
  } else if (calls) {
    printf("prefetch hit rate after %u warm-up step%s: %.4f (%llu of %llu module fetches "
           "without a demand gather)\n",
           a.warmup_steps, a.warmup_steps == 1 ? "" : "s", double(calls - demand) / calls,
           (unsigned long long)(calls - demand), (unsigned long long)calls);
  }
  if (!a.events.empty()) printf("events: %s\n", a.events.c_str());
  return 0;
}

}  // namespace

void RegisterReplay(CLI::App& app, int* exit_code) {
  auto args = std::make_shared<ReplayArgs>();
  CLI::App* cmd = app.add_subcommand(
      "replay", "Run a ztier-trace-v1 file through the coordinator and swapper; write the "
                "event log and print the counters");
  cmd->add_option("--trace", args->trace,
                  "Trace: ztier-trace-v1 JSON file, or a name in configs/traces/ (gpt2_tied, ...)")
      ->required();
  cmd->add_option("--events", args->events, "Write the event log (JSON lines) here");
  cmd->add_option("--config", args->config,
                  "ztier YAML config: file or name in configs/ (default: built-in defaults)");
  cmd->add_flag("--null-io", args->null_io, "Bookkeeping only: no NVMe I/O, no device copies");
  cmd->add_option("--trace-policy", args->trace_policy,
                  "adaptive (learn several orders, choices, re-synchronise) or single (one "
                  "order, dropped at the first deviation: DeepSpeed's rule); default: the "
                  "config's coordinator.trace_policy")
      ->check(CLI::IsMember({"adaptive", "single"}));
  cmd->add_option("--world-size", args->world_size, "Ranks (threads); default: the trace's");
  cmd->add_option("--repeat", args->repeat, "Play the trace's steps this many times")
      ->check(CLI::Range(1u, 100000u));
  cmd->add_option("--warmup-steps", args->warmup_steps,
                  "Steps left out of the prefetch hit rate: the first ones, while the "
                  "coordinator learns the orders (e.g. 9 for rounds of 8 decode steps and a "
                  "training step)")
      ->capture_default_str();
  cmd->add_option("--device", args->device,
                  "Device backend: host (emulation, default), cuda, or auto")
      ->check(CLI::IsMember({"host", "cuda", "auto"}));
  cmd->add_option("--buffer-elements", args->buffer_elements,
                  "Elements per swap buffer (overrides tiers.nvme.buffer_size)");
  cmd->callback([args, exit_code] { *exit_code = RunReplay(*args); });
}

}  // namespace ztier::cli
