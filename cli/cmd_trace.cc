// `ztier trace gen --model FILE` (a ztier-trace-v1 file from a model shape)
// and `ztier trace info FILE` (what a trace holds).
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "cli/commands.h"
#include "cli/data_files.h"
#include "cli/output.h"
#include "coordinator/trace_file.h"

namespace ztier::cli {
namespace {


void PrintError(const Status& s) {
  // The library's messages are one error per line, already naming the file.
  std::string_view msg = s.message();
  size_t start = 0;
  while (start < msg.size()) {
    size_t end = msg.find('\n', start);
    if (end == std::string_view::npos) end = msg.size();
    std::string_view line = msg.substr(start, end - start);
    fprintf(stderr, "ztier: %.*s\n", static_cast<int>(line.size()),
            line.data());
    start = end + 1;
  }
}

uint64_t TotalNumel(const coordinator::TraceFile& t) {
  uint64_t n = 0;
  for (const coordinator::TraceParam& p : t.params) n += p.numel;
  return n;
}

// "56" when every step has the same number of events, else "54..58".
std::string EventsPerStep(const coordinator::TraceFile& t) {
  if (t.steps.empty()) return "0";
  size_t lo = SIZE_MAX, hi = 0;
  for (const auto& s : t.steps) {
    lo = std::min(lo, s.size());
    hi = std::max(hi, s.size());
  }
  return lo == hi ? fmt::format("{}", lo) : fmt::format("{}..{}", lo, hi);
}

// Steps with no backward event: the forward-only (decode) steps.
size_t ForwardOnlySteps(const coordinator::TraceFile& t) {
  return static_cast<size_t>(
      std::count_if(t.steps.begin(), t.steps.end(), [](const auto& s) {
        return std::none_of(s.begin(), s.end(),
                            [](const auto& e) { return e.backward; });
      }));
}

struct GenArgs {
  std::string model;
  uint32_t steps = 3;
  uint32_t decode_steps = 0;
  uint32_t world_size = 1;
  double scale = 1.0;
  bool checkpointing = false;
  uint64_t seed = 1;
  bool hints = false;
  std::string out;
};

int RunGen(const GenArgs& a) {
  // A name resolves as in `plan` and `bench step` (cli/data_files.h).
  Result<std::string> path = ResolveModelPath(a.model);
  if (!path.ok()) {
    PrintError(path.status());
    return kExitUsage;
  }
  Result<coordinator::ModelShape> shape = coordinator::LoadModelShape(*path);
  if (!shape.ok()) {
    PrintError(shape.status());
    return kExitUsage;
  }
  coordinator::TraceGenOptions o;
  o.steps = a.steps;
  o.decode_steps = a.decode_steps;
  o.world_size = a.world_size;
  o.scale = a.scale;
  o.checkpointing = a.checkpointing;
  o.seed = a.seed;
  o.hints = a.hints;
  Result<coordinator::TraceFile> trace = coordinator::GenerateTrace(*shape, o);
  if (!trace.ok()) {
    PrintError(trace.status());
    return kExitUsage;
  }
  if (a.out.empty() || a.out == "-") {
    std::string json = coordinator::TraceToJson(*trace);
    if (fwrite(json.data(), 1, json.size(), stdout) != json.size() ||
        fflush(stdout) != 0) {
      fprintf(stderr, "ztier: trace gen: cannot write to standard output\n");
      return kExitFailure;
    }
  } else if (Status s = coordinator::SaveTrace(*trace, a.out); !s.ok()) {
    PrintError(s);
    return kExitFailure;
  }
  // Said only when there are any, so the default line stays as it was.
  const size_t forward_only = ForwardOnlySteps(*trace);
  const std::string forward_only_text =
      forward_only == 0 ? ""
                        : fmt::format(" ({} forward-only)", forward_only);
  fprintf(
      stderr,
      "ztier: trace gen: %s: %zu params, %llu elements (%.3g), %zu modules, "
      "%s events per step, %zu step%s%s%s%s\n",
      trace->model.c_str(), trace->params.size(),
      static_cast<unsigned long long>(TotalNumel(*trace)),
      static_cast<double>(TotalNumel(*trace)), trace->modules.size(),
      EventsPerStep(*trace).c_str(), trace->steps.size(),
      trace->steps.size() == 1 ? "" : "s", forward_only_text.c_str(),
      a.out.empty() || a.out == "-" ? "" : " -> ",
      a.out == "-" ? "" : a.out.c_str());
  return 0;
}

struct InfoArgs {
  std::string file;
};

int RunInfo(const InfoArgs& a) {
  Result<coordinator::TraceFile> r = coordinator::LoadTrace(a.file);
  if (!r.ok()) {
    PrintError(r.status());
    return kExitUsage;
  }
  const coordinator::TraceFile& t = *r;

  std::map<std::string, size_t> tiers;
  size_t persistent = 0;
  const coordinator::TraceParam* largest = nullptr;
  for (const coordinator::TraceParam& p : t.params) {
    ++tiers[p.tier == coordinator::ParamTier::kNvme   ? "nvme"
            : p.tier == coordinator::ParamTier::kHost ? "host"
                                                      : "device"];
    persistent += p.persist;
    if (!largest || p.numel > largest->numel) largest = &p;
  }
  std::string tier_text;
  for (const auto& [name, n] : tiers) {
    tier_text += fmt::format("{}{} {}", tier_text.empty() ? "" : ", ", name, n);
  }

  // A param used by more than one module (a tied embedding) is fetched by
  // each of them.
  std::unordered_map<uint64_t, size_t> users;
  size_t with_params = 0;
  std::unordered_map<uint64_t, uint64_t> flops;  // module id -> FLOPs per call
  for (const coordinator::TraceModule& m : t.modules) {
    with_params += !m.params.empty();
    for (uint64_t p : m.params) ++users[p];
    flops[m.id] = m.flops;
  }
  size_t shared = 0;
  for (const auto& [p, n] : users) shared += n > 1;

  // Compute of the first step: forward calls once, backward calls twice
  // (gradients of inputs and of weights).
  double step_flops = 0;
  if (!t.steps.empty()) {
    for (const coordinator::TraceEvent& e : t.steps[0]) {
      if (e.op != coordinator::TraceOp::kFetch) continue;
      step_flops +=
          static_cast<double>(flops[e.module]) * (e.forward ? 1.0 : 2.0);
    }
  }

  // Where the module order first differs from step 0's (an MoE model routes
  // each step differently; the coordinator then records the trace again).
  std::string order = "the same in every step";
  for (size_t s = 1; s < t.steps.size(); ++s) {
    const auto& a0 = t.steps[0];
    const auto& as = t.steps[s];
    size_t n = std::min(a0.size(), as.size());
    size_t i = 0;
    while (i < n && a0[i].op == as[i].op && a0[i].module == as[i].module) ++i;
    if (i < n || a0.size() != as.size()) {
      order =
          fmt::format("differs: step {} departs from step 0 at event {}", s, i);
      break;
    }
  }

  uint64_t total = TotalNumel(t);
  std::string largest_name = !largest ? "-"
                             : largest->name.empty()
                                 ? fmt::format("id {}", largest->id)
                                 : largest->name;
  printf("%s: ztier-trace-v1%s%s, world_size %u\n", a.file.c_str(),
         t.model.empty() ? "" : ", model ", t.model.c_str(), t.world_size);
  printf(
      "params:   %zu, %llu elements (%.3g); largest %llu (%s); %zu persistent; "
      "%s\n",
      t.params.size(), static_cast<unsigned long long>(total),
      static_cast<double>(total),
      static_cast<unsigned long long>(largest ? largest->numel : 0),
      largest_name.c_str(), persistent,
      tier_text.empty() ? "no tiers" : tier_text.c_str());
  printf(
      "modules:  %zu, %zu with params; %zu param%s shared by several modules\n",
      t.modules.size(), with_params, shared, shared == 1 ? "" : "s");
  printf("steps:    %zu, %s events per step; module order %s\n", t.steps.size(),
         EventsPerStep(t).c_str(), order.c_str());
  printf(
      "compute:  %.3g FLOPs in step 0 (forward calls x1, backward calls x2)\n",
      step_flops);
  if (!t.config.empty()) {
    printf("config:  ");
    for (const auto& [k, v] : t.config) printf(" %s=%s", k.c_str(), v.c_str());
    printf("\n");
  }
  return 0;
}

}  // namespace

void RegisterTraceCommands(CLI::App& app, int* exit_code) {
  CLI::App* trace = app.add_subcommand(
      "trace",
      "Generate a ztier-trace-v1 file from a model shape, or summarize one");
  trace->require_subcommand(1);

  auto gen_args = std::make_shared<GenArgs>();
  CLI::App* gen = trace->add_subcommand(
      "gen",
      "Write the trace of a model shape (a file, or a name in configs/models/): its "
      "parameters, "
      "modules and the fetch/release calls of each training step");
  gen->add_option("--model", gen_args->model,
                  "Model shape: file or name in configs/models/ (tiny, llama2-7b, ...)")
      ->required();
  gen->add_option("--steps", gen_args->steps, "Training steps to record")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  gen->add_option(
         "--decode-steps", gen_args->decode_steps,
         fmt::format("Forward-only (generation) steps before each training "
                     "step, as in RL training; the file holds steps x "
                     "(N + 1) steps (N at most {})",
                     coordinator::kMaxDecodeSteps))
      ->capture_default_str();
  gen->add_option("--world-size", gen_args->world_size,
                  "Ranks the trace is for")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  gen->add_option(
         "--scale", gen_args->scale,
         "Divide every tensor's element count (and FLOPs) by this, keeping the "
         "structure: a large model on a small disk")
      ->capture_default_str();
  gen->add_flag(
      "--checkpointing", gen_args->checkpointing,
      "Activation checkpointing: each layer's forward runs again in backward");
  gen->add_option("--seed", gen_args->seed, "MoE routing seed")
      ->capture_default_str();
  gen->add_flag("--hints", gen_args->hints,
                "MoE: after each router, hint events naming the experts it chose "
                "(what a trainer passes to ztier_module_hint); replay gives them "
                "to the coordinator");
  gen->add_option("-o,--output", gen_args->out,
                  "Output file (default: standard output)");
  gen->callback([gen_args, exit_code] { *exit_code = RunGen(*gen_args); });

  auto info_args = std::make_shared<InfoArgs>();
  CLI::App* info = trace->add_subcommand(
      "info", "Summarize a trace file (exit 2 if invalid)");
  info->add_option("FILE", info_args->file, "ztier-trace-v1 JSON file")
      ->required();
  info->callback([info_args, exit_code] { *exit_code = RunInfo(*info_args); });
}

}  // namespace ztier::cli
