// `ztier bench adam`: throughput of the CPU Adam/AdamW update (optim/) per
// kernel ISA and thread count, against the memory bandwidth this machine
// reaches on the same footprint.
//
// The update is memory bound: per element it reads master, exp_avg,
// exp_avg_sq (fp32) and the gradient, and writes the three state arrays back
// plus the parameter copy (16 + 12 + out bytes with an fp32 gradient). The
// roofline is a stream-like kernel over the same bytes: a += s * b, with a
// the first half of the footprint and b the second. Like the update's state
// it is read-modify-write in place, so neither pays for write-allocate reads
// (a STREAM triad a = b + s * c would, and would understate the bound); the
// update's parameter copy is the only stream that does. s is 0 at run time,
// so the roofline leaves the state as it was.
//
// All arrays live in one allocation (huge pages where the kernel gives
// them), first touched by the pool's threads. For each thread count, every
// kernel (the roofline and each ISA's update) runs once untimed, then the
// kernels take turns --repeats times and the median of each counts: a
// machine whose speed drifts (other tenants, clocks) then shifts them alike.
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "base/float16.h"
#include "base/status.h"
#include "cli/bench_util.h"
#include "cli/commands.h"
#include "cli/output.h"
#include "optim/adam.h"
#include "optim/worker_pool.h"
#if defined(ZTIER_CLI_HAVE_TIERING)
#include "tiering/units.h"
#endif

namespace ztier::cli {
namespace {

using Clock = std::chrono::steady_clock;

// Each array starts on a cache line (bytes).
constexpr uint64_t kArrayAlign = 64;
// The allocation is aligned for transparent huge pages (bytes).
constexpr uint64_t kHugePage = 2 << 20;
// Chunks of the fill and roofline loops are multiples of this many floats
// (a 64-byte line), so no two threads write the same line.
constexpr uint64_t kRooflineGrain = 16;
// More elements than this would not fit any machine this runs on (2^40 =
// 1.1e12 elements, 20 TB of state).
constexpr uint64_t kMaxElements = uint64_t{1} << 40;

struct AdamArgs {
  std::string elements = "16777216";  // 16 Mi
  std::vector<std::string> isas;      // empty: every available one
  std::vector<uint32_t> threads;      // empty: 1 and hardware_concurrency
  std::string out_dtype = "bf16";
  std::string grad_dtype = "f32";
  uint32_t repeats = 5;
  bool json = false;
};

Result<uint64_t> ParseElements(const std::string& text) {
#if defined(ZTIER_CLI_HAVE_TIERING)
  tiering::Limits limits;
  limits.min = 1;
  limits.max = kMaxElements;
  Result<uint64_t> r = tiering::ParseElementCount(text, limits);
  if (!r.ok()) return r.status().WithContext("--elements");
  return r;
#else
  char* end = nullptr;
  const unsigned long long v = std::strtoull(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || v == 0 || v > kMaxElements) {
    return Status::InvalidArgument(
        fmt::format("--elements: '{}' is not a whole number in 1 to {}", text, kMaxElements));
  }
  return static_cast<uint64_t>(v);
#endif
}

Result<optim::DType> ParseDType(std::string_view option, std::string_view text) {
  if (text == "f32") return optim::DType::kF32;
  if (text == "f16") return optim::DType::kF16;
  if (text == "bf16") return optim::DType::kBF16;
  return Status::InvalidArgument(
      fmt::format("{}: unknown type '{}': valid ones are f32, f16, bf16", option, text));
}

std::string_view DTypeName(optim::DType t) {
  switch (t) {
    case optim::DType::kF32:
      return "f32";
    case optim::DType::kF16:
      return "f16";
    case optim::DType::kBF16:
      return "bf16";
  }
  return "?";
}

uint64_t AlignUp(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

struct FreeDeleter {
  void operator()(uint8_t* p) const { std::free(p); }
};

// The update's arrays, carved out of one allocation.
struct Arena {
  std::unique_ptr<uint8_t[], FreeDeleter> mem;
  uint64_t bytes = 0;  // footprint: the arrays and their alignment padding
  optim::AdamSpan span;

  Status Allocate(uint64_t n, optim::DType grad_type, optim::DType out_type) {
    const uint64_t sizes[] = {4 * n, 4 * n, 4 * n, n * optim::DTypeBytes(grad_type),
                              n * optim::DTypeBytes(out_type)};
    uint64_t offsets[5];
    uint64_t total = 0;
    for (int k = 0; k < 5; ++k) {
      offsets[k] = total;
      total = AlignUp(total + sizes[k], kArrayAlign);
    }
    bytes = total;
    mem.reset(static_cast<uint8_t*>(std::aligned_alloc(kHugePage, AlignUp(total, kHugePage))));
    if (!mem) {
      return Status::ResourceExhausted(
          fmt::format("cannot allocate {} for {} elements", FormatSize(total), n));
    }
    // Fewer TLB misses; only a hint, so its result does not matter.
    (void)madvise(mem.get(), AlignUp(total, kHugePage), MADV_HUGEPAGE);
    uint8_t* base = mem.get();
    // The alignment gaps are zeroed: the roofline reads them as floats too.
    for (int k = 0; k < 5; ++k) {
      const uint64_t end = offsets[k] + sizes[k];
      std::memset(base + end, 0, (k < 4 ? offsets[k + 1] : total) - end);
    }
    span.master = reinterpret_cast<float*>(base + offsets[0]);
    span.exp_avg = reinterpret_cast<float*>(base + offsets[1]);
    span.exp_avg_sq = reinterpret_cast<float*>(base + offsets[2]);
    span.grad = base + offsets[3];
    span.grad_type = grad_type;
    span.param_out = base + offsets[4];
    span.out_type = out_type;
    span.n = n;
    return Status::Ok();
  }

  // Fresh state: master in [-1, 1), zero moments, gradients in [-0.01,
  // 0.01), all from a hash of the index (cheap, and the same for any
  // thread split). Written by the pool's threads, so pages land near them.
  void Fill(optim::WorkerPool& pool) {
    const optim::AdamSpan s = span;
    pool.ParallelFor(s.n, kRooflineGrain, [&s](uint64_t begin, uint64_t end) {
      for (uint64_t i = begin; i < end; ++i) {
        uint64_t h = (i + 1) * 0x9e3779b97f4a7c15ull;
        h ^= h >> 31;
        const float u = static_cast<float>(h >> 40) * 0x1p-24f;  // [0, 1)
        s.master[i] = 2 * u - 1;
        s.exp_avg[i] = 0;
        s.exp_avg_sq[i] = 0;
        const float g = (u - 0.5f) * 0.02f;
        switch (s.grad_type) {
          case optim::DType::kF32:
            static_cast<float*>(const_cast<void*>(s.grad))[i] = g;
            break;
          case optim::DType::kF16:
            static_cast<uint16_t*>(const_cast<void*>(s.grad))[i] = FloatToHalf(g);
            break;
          case optim::DType::kBF16:
            static_cast<uint16_t*>(const_cast<void*>(s.grad))[i] = FloatToBf16(g);
            break;
        }
      }
      const uint32_t ob = optim::DTypeBytes(s.out_type);
      std::memset(static_cast<uint8_t*>(s.param_out) + begin * ob, 0, (end - begin) * ob);
    });
  }
};

double SecondsOf(const std::function<void()>& fn) {
  const auto t0 = Clock::now();
  fn();
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// a[i] += s * b[i]: compiled for the widest vector unit the CPU has (the
// CLI is otherwise built for the baseline), so the roofline is never limited
// by instructions rather than memory.
__attribute__((target_clones("avx512f", "avx2", "default"))) void Axpy(
    float* __restrict a, const float* __restrict b, float s, uint64_t n) {
  for (uint64_t i = 0; i < n; ++i) a[i] += s * b[i];
}

// The roofline over the whole arena, a the first half and b the second: 12
// bytes moved (a read, b read, a written) per pair of floats.
struct Roofline {
  float* a = nullptr;
  const float* b = nullptr;
  uint64_t pairs = 0;
  float scale = 0;  // 0, read through a volatile so the loop is kept

  explicit Roofline(Arena& arena) {
    pairs = arena.bytes / 8;
    a = reinterpret_cast<float*>(arena.mem.get());
    b = a + pairs;
    static volatile float zero = 0.0f;
    scale = zero;
  }
  void Run(optim::WorkerPool& pool) const {
    const Roofline* self = this;
    pool.ParallelFor(pairs, kRooflineGrain, [self](uint64_t begin, uint64_t end) {
      Axpy(self->a + begin, self->b + begin, self->scale, end - begin);
    });
  }
  double Bytes() const { return static_cast<double>(pairs) * 12; }
};

struct RooflineResult {
  uint32_t threads = 0;
  double seconds = 0;
  double bytes_per_s = 0;
};

struct UpdateResult {
  optim::Isa isa = optim::Isa::kScalar;
  uint32_t threads = 0;
  double seconds = 0;         // per update of all elements
  double params_per_s = 0;
  double bytes_per_s = 0;     // bytes moved (bytes_per_element each) per second
  double roofline_fraction = 0;
};

int RunBenchAdam(const AdamArgs& args) {
  auto fail = [](const Status& s) {
    fprintf(stderr, "ztier bench adam: %s\n", std::string(s.message()).c_str());
    return ExitCodeFor(s);
  };
  const Result<uint64_t> n = ParseElements(args.elements);
  if (!n.ok()) return fail(n.status());
  const Result<optim::DType> grad_type = ParseDType("--grad-dtype", args.grad_dtype);
  if (!grad_type.ok()) return fail(grad_type.status());
  const Result<optim::DType> out_type = ParseDType("--out-dtype", args.out_dtype);
  if (!out_type.ok()) return fail(out_type.status());

  std::vector<optim::Isa> isas;
  if (args.isas.empty()) {
    for (optim::Isa isa : {optim::Isa::kScalar, optim::Isa::kAvx2, optim::Isa::kAvx512}) {
      if (optim::IsaAvailable(isa)) isas.push_back(isa);
    }
  }
  for (const std::string& name : args.isas) {
    const Result<optim::Isa> isa = optim::ParseIsa(name);
    if (!isa.ok()) return fail(isa.status().WithContext("--isa"));
    if (!optim::IsaAvailable(*isa)) {
      return fail(Status::Unavailable(
          fmt::format("--isa: {} is not available on this CPU or not built in", name)));
    }
    isas.push_back(*isa);
  }
  const uint32_t hw = std::max(1u, std::thread::hardware_concurrency());
  std::vector<uint32_t> thread_counts = args.threads;
  if (thread_counts.empty()) thread_counts = {1, hw};
  for (uint32_t& t : thread_counts) {
    if (t == 0) t = hw;
  }
  thread_counts.erase(std::unique(thread_counts.begin(), thread_counts.end()),
                      thread_counts.end());

  Arena arena;
  if (Status s = arena.Allocate(*n, *grad_type, *out_type); !s.ok()) return fail(s);
  const uint64_t read_bytes = 12 + optim::DTypeBytes(*grad_type);
  const uint64_t write_bytes = 12 + optim::DTypeBytes(*out_type);
  const uint64_t bytes_per_element = read_bytes + write_bytes;

  optim::AdamHyper hyper;  // AdamW, torch's defaults plus some weight decay
  hyper.weight_decay = 0.01;

  // One pool per thread count, kept for the whole run.
  std::vector<std::unique_ptr<optim::WorkerPool>> pools;
  for (uint32_t t : thread_counts) pools.push_back(std::make_unique<optim::WorkerPool>(t));
  arena.Fill(*pools.back());
  const Roofline rl(arena);

  std::vector<RooflineResult> roofline;
  std::vector<UpdateResult> results;
  uint64_t step = 0;
  for (auto& pool_ptr : pools) {
    optim::WorkerPool& pool = *pool_ptr;
    // Kernel 0 is the roofline, kernel 1 + k the update with isas[k].
    std::vector<std::function<void()>> kernels;
    kernels.push_back([&] { rl.Run(pool); });
    for (optim::Isa isa : isas) {
      kernels.push_back([&, isa] {
        optim::AdamUpdateParallel(pool, optim::MakeConstants(hyper, ++step), arena.span, isa);
      });
    }
    for (const auto& k : kernels) k();  // warm-up
    std::vector<std::vector<double>> seconds(kernels.size());
    for (uint32_t r = 0; r < args.repeats; ++r) {
      for (size_t k = 0; k < kernels.size(); ++k) seconds[k].push_back(SecondsOf(kernels[k]));
    }
    RooflineResult rr;
    rr.threads = pool.threads();
    rr.seconds = Median(seconds[0]);
    rr.bytes_per_s = rl.Bytes() / rr.seconds;
    roofline.push_back(rr);
    for (size_t k = 0; k < isas.size(); ++k) {
      UpdateResult r;
      r.isa = isas[k];
      r.threads = pool.threads();
      r.seconds = Median(seconds[k + 1]);
      r.params_per_s = static_cast<double>(*n) / r.seconds;
      r.bytes_per_s = r.params_per_s * static_cast<double>(bytes_per_element);
      r.roofline_fraction = r.bytes_per_s / rr.bytes_per_s;
      results.push_back(r);
    }
  }

  if (args.json) {
    nlohmann::json j = {{"elements", *n},
                        {"grad_dtype", DTypeName(*grad_type)},
                        {"out_dtype", DTypeName(*out_type)},
                        {"read_bytes_per_element", read_bytes},
                        {"write_bytes_per_element", write_bytes},
                        {"bytes_per_element", bytes_per_element},
                        {"footprint_bytes", arena.bytes},
                        {"repeats", args.repeats},
                        {"adamw", hyper.adamw},
                        {"weight_decay", hyper.weight_decay}};
    j["roofline"] = nlohmann::json::array();
    for (const RooflineResult& r : roofline) {
      j["roofline"].push_back(
          {{"kernel", "a += s*b"},
           {"threads", r.threads},
           {"seconds", r.seconds},
           {"bytes_per_s", r.bytes_per_s},
           {"params_per_s", r.bytes_per_s / static_cast<double>(bytes_per_element)}});
    }
    j["results"] = nlohmann::json::array();
    for (const UpdateResult& r : results) {
      j["results"].push_back({{"isa", optim::IsaName(r.isa)},
                              {"threads", r.threads},
                              {"seconds", r.seconds},
                              {"params_per_s", r.params_per_s},
                              {"params_per_s_per_core", r.params_per_s / r.threads},
                              {"bytes_per_s", r.bytes_per_s},
                              {"roofline_fraction", r.roofline_fraction}});
    }
    printf("%s\n", WithRunInfo(std::move(j)).dump().c_str());
    return 0;
  }

  printf("adam bench: %s elements, grad %s, out %s, AdamW; %llu B moved per element "
         "(%llu read, %llu written), footprint %s; median of %u\n",
         fmt::format("{:.4g}", static_cast<double>(*n)).c_str(),
         std::string(DTypeName(*grad_type)).c_str(), std::string(DTypeName(*out_type)).c_str(),
         static_cast<unsigned long long>(bytes_per_element),
         static_cast<unsigned long long>(read_bytes),
         static_cast<unsigned long long>(write_bytes), FormatSize(arena.bytes).c_str(),
         args.repeats);
  printf("roofline: a += s*b over the same footprint\n");
  printf("  %7s %9s %14s\n", "threads", "GB/s", "Gparam/s");
  for (const RooflineResult& r : roofline) {
    printf("  %7u %9.2f %14.3f\n", r.threads, r.bytes_per_s / 1e9,
           r.bytes_per_s / static_cast<double>(bytes_per_element) / 1e9);
  }
  printf("update:\n");
  printf("  %-7s %7s %10s %9s %14s %9s %11s\n", "isa", "threads", "ms/update", "Gparam/s",
         "Gparam/s/core", "GB/s", "of roofline");
  for (const UpdateResult& r : results) {
    printf("  %-7s %7u %10.3f %9.3f %14.3f %9.2f %10.1f%%\n",
           std::string(optim::IsaName(r.isa)).c_str(), r.threads, r.seconds * 1e3,
           r.params_per_s / 1e9, r.params_per_s / r.threads / 1e9, r.bytes_per_s / 1e9,
           r.roofline_fraction * 100);
  }
  return 0;
}

}  // namespace

void RegisterBenchAdam(CLI::App& bench, int* exit_code) {
  auto a = std::make_shared<AdamArgs>();
  CLI::App* cmd = bench.add_subcommand(
      "adam", "CPU Adam/AdamW update throughput per ISA and thread count, against a "
              "memory-bandwidth roofline on the same footprint");
  cmd->add_option("--elements", a->elements,
                  "Parameters updated per step (e.g. 16777216, 1e7, 5_000_000)")
      ->capture_default_str();
  cmd->add_option("--isa", a->isas, "Kernels: scalar, avx2, avx512 (default: every available)")
      ->delimiter(',');
  cmd->add_option("--threads", a->threads,
                  "Thread counts, e.g. 1,2,4 (default: 1 and the hardware threads; 0 = all)")
      ->delimiter(',');
  cmd->add_option("--out-dtype", a->out_dtype, "Parameter copy written: f32, f16, bf16")
      ->capture_default_str();
  cmd->add_option("--grad-dtype", a->grad_dtype, "Gradient read: f32, f16, bf16")
      ->capture_default_str();
  cmd->add_option("--repeats", a->repeats, "Timed updates per case (the median is reported)")
      ->check(CLI::Range(1u, 1000u))
      ->capture_default_str();
  cmd->add_flag("--json", a->json, "Print one JSON object");
  cmd->callback([a, exit_code] { *exit_code = RunBenchAdam(*a); });
}

}  // namespace ztier::cli
