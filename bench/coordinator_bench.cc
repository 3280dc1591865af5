// Coordinator overhead with bookkeeping only (null I/O): the cost of the
// fetch / release decisions themselves on model-shaped traces, per module
// call and per parameter decision. Run: build/bench/coordinator_bench
#include <benchmark/benchmark.h>

#include <string>
#include <vector>

#include "coordinator/coordinator.h"
#include "coordinator/trace_file.h"

namespace ztier::coordinator {
namespace {

struct TraceSpec {
  std::string model;
  bool checkpointing = false;
  uint32_t steps = 1;  // > 1: a trace that changes between steps (MoE routing)
  bool hints = false;  // router hints in it
};

TraceFile MakeTrace(const TraceSpec& spec) {
  auto shape =
      LoadModelShape(std::string(ZTIER_SOURCE_DIR) + "/configs/models/" + spec.model + ".yaml");
  if (!shape.ok()) return {};
  TraceGenOptions o;
  o.steps = spec.steps;
  o.checkpointing = spec.checkpointing;
  o.hints = spec.hints;
  auto t = GenerateTrace(*shape, o);
  return t.ok() ? std::move(t).value() : TraceFile{};
}

// One iteration = one whole training step of the trace (forward + backward)
// after the recording step, with DeepSpeed's default limits. A trace of
// several steps is played in turn, so every iteration follows, matches and
// predicts a step that differs from the one before.
void BM_CoordinatorStep(benchmark::State& state, const TraceSpec& spec) {
  const TraceFile t = MakeTrace(spec);
  if (t.steps.empty()) {
    state.SkipWithError("cannot load the model shape");
    return;
  }
  CoordinatorOptions o;
  o.null_io = true;
  auto c = Coordinator::Create(o, CoordinatorDeps{});
  for (const auto& p : t.params) {
    (void)(*c)->RegisterParam(p.id, p.numel, DType::kFloat16, p.tier, p.persist);
  }
  for (const auto& m : t.modules) (void)(*c)->RegisterModule(m.id, m.name, m.params);
  (void)(*c)->Finalize();
  for (const auto& p : t.params) (void)(*c)->SetParamData(p.id, nullptr);
  std::vector<uint64_t> hinted;
  auto run_step = [&](const std::vector<TraceEvent>& events) {
    for (size_t k = 0; k < events.size(); ++k) {
      const TraceEvent& e = events[k];
      if (e.op == TraceOp::kFetch) {
        benchmark::DoNotOptimize((*c)->Fetch(e.module, e.forward));
      } else if (e.op == TraceOp::kRelease) {
        benchmark::DoNotOptimize((*c)->Release(e.module, e.backward));
      } else {
        // A run of hint events is one Hint call, as replay makes it.
        hinted.push_back(e.module);
        if (k + 1 < events.size() && events[k + 1].op == TraceOp::kHint) continue;
        benchmark::DoNotOptimize((*c)->Hint(hinted));
        hinted.clear();
      }
    }
    (void)(*c)->ResetStep();
  };
  run_step(t.steps[0]);  // records the trace
  // Module calls and parameter decisions per step, over the steps played.
  uint64_t calls = 0, params = 0;
  for (const auto& events : t.steps) {
    for (const TraceEvent& e : events) {
      if (e.op != TraceOp::kFetch) continue;
      ++calls;
      params += t.modules[e.module].params.size();
    }
  }
  const double per_step = 1.0 / static_cast<double>(t.steps.size());
  size_t next = t.steps.size() > 1 ? 1 : 0;
  for (auto _ : state) {
    run_step(t.steps[next]);
    next = (next + 1) % t.steps.size();
  }
  const double step_calls = static_cast<double>(calls) * per_step;
  const double step_params = static_cast<double>(params) * per_step;
  state.counters["module_calls"] = step_calls;
  state.counters["param_decisions"] = step_params;
  state.counters["ns_per_fetch_release"] = benchmark::Counter(
      step_calls * static_cast<double>(state.iterations()),
      benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
  state.counters["ns_per_param"] = benchmark::Counter(
      step_params * static_cast<double>(state.iterations()),
      benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
  state.SetItemsProcessed(static_cast<int64_t>(step_params * static_cast<double>(state.iterations())));
}

BENCHMARK_CAPTURE(BM_CoordinatorStep, gpt2_xl, TraceSpec{"gpt2-xl"})
    ->Unit(benchmark::kMicrosecond)->MinTime(0.5);
BENCHMARK_CAPTURE(BM_CoordinatorStep, llama2_7b, TraceSpec{"llama2-7b"})
    ->Unit(benchmark::kMicrosecond)->MinTime(0.5);
BENCHMARK_CAPTURE(BM_CoordinatorStep, llama2_7b_checkpointing, TraceSpec{"llama2-7b", true})
    ->Unit(benchmark::kMicrosecond)->MinTime(0.5);
BENCHMARK_CAPTURE(BM_CoordinatorStep, llama2_70b, TraceSpec{"llama2-70b"})
    ->Unit(benchmark::kMicrosecond)->MinTime(0.5);
// Routing that changes every step: choice slots, guesses, hints.
BENCHMARK_CAPTURE(BM_CoordinatorStep, moe_small_routed, TraceSpec{"moe-small", false, 16})
    ->Unit(benchmark::kMicrosecond)->MinTime(0.5);
BENCHMARK_CAPTURE(BM_CoordinatorStep, moe_small_hinted, TraceSpec{"moe-small", false, 16, true})
    ->Unit(benchmark::kMicrosecond)->MinTime(0.5);

}  // namespace
}  // namespace ztier::coordinator

BENCHMARK_MAIN();
