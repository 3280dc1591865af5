// Coordinator overhead with bookkeeping only (null I/O): the cost of the
// fetch / release decisions themselves on model-shaped traces, per module
// call and per parameter decision. Run: build/bench/coordinator_bench
#include <benchmark/benchmark.h>

#include <string>

#include "coordinator/coordinator.h"
#include "coordinator/trace_file.h"

namespace ztier::coordinator {
namespace {

TraceFile MakeTrace(const std::string& model, bool checkpointing) {
  auto shape = LoadModelShape(std::string(ZTIER_SOURCE_DIR) + "/configs/models/" + model + ".yaml");
  if (!shape.ok()) return {};
  TraceGenOptions o;
  o.steps = 1;
  o.checkpointing = checkpointing;
  auto t = GenerateTrace(*shape, o);
  return t.ok() ? std::move(t).value() : TraceFile{};
}

// One iteration = one whole training step of the trace (forward + backward)
// after the recording step, with DeepSpeed's default limits.
void BM_CoordinatorStep(benchmark::State& state, const std::string& model, bool ckpt) {
  const TraceFile t = MakeTrace(model, ckpt);
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
  auto run_step = [&] {
    for (const TraceEvent& e : t.steps[0]) {
      if (e.op == TraceOp::kFetch) {
        benchmark::DoNotOptimize((*c)->Fetch(e.module, e.forward));
      } else {
        benchmark::DoNotOptimize((*c)->Release(e.module, e.backward));
      }
    }
    (void)(*c)->ResetStep();
  };
  run_step();  // records the trace
  uint64_t calls = 0, params = 0;
  for (const TraceEvent& e : t.steps[0]) {
    if (e.op != TraceOp::kFetch) continue;
    ++calls;
    params += t.modules[e.module].params.size();
  }
  for (auto _ : state) run_step();
  state.counters["module_calls"] = static_cast<double>(calls);
  state.counters["param_decisions"] = static_cast<double>(params);
  state.counters["ns_per_fetch_release"] = benchmark::Counter(
      static_cast<double>(calls) * state.iterations(),
      benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
  state.counters["ns_per_param"] = benchmark::Counter(
      static_cast<double>(params) * state.iterations(),
      benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
  state.SetItemsProcessed(static_cast<int64_t>(params) * state.iterations());
}

BENCHMARK_CAPTURE(BM_CoordinatorStep, gpt2_xl, std::string("gpt2-xl"), false)
    ->Unit(benchmark::kMicrosecond)->MinTime(0.5);
BENCHMARK_CAPTURE(BM_CoordinatorStep, llama2_7b, std::string("llama2-7b"), false)
    ->Unit(benchmark::kMicrosecond)->MinTime(0.5);
BENCHMARK_CAPTURE(BM_CoordinatorStep, llama2_7b_checkpointing, std::string("llama2-7b"), true)
    ->Unit(benchmark::kMicrosecond)->MinTime(0.5);
BENCHMARK_CAPTURE(BM_CoordinatorStep, llama2_70b, std::string("llama2-70b"), false)
    ->Unit(benchmark::kMicrosecond)->MinTime(0.5);

}  // namespace
}  // namespace ztier::coordinator

BENCHMARK_MAIN();
