// `ztier bench optimizer`: the pipelined optimizer step with its state on
// NVMe, for a model shape (scaled), measured against the two things that
// bound it, in the same run:
//   - the drive: the step's bytes (state read, state written, parameters
//     written) at the drive's own sequential read and write bandwidth,
//     measured with `bench io`'s engine on a file of the same size (at least
//     one queue of the config's blocks) in the same directory, alternating
//     with the steps (ABBA);
//   - the CPU: the same update over the same elements with the state in
//     memory (same threads, same instruction set).
// step / max(drive time, update time) is the pipeline's overhead: 1.0 means
// the step is as fast as its slower resource allows.
//
// `ztier bench checkpoint` uses the same scaled model and state (after one
// step) and times a checkpoint save and a load of it, each against the
// bytes it moves at the drive's bandwidth measured in the same run, with the
// resident memory each adds (peak during the call less the resident size
// before it).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <unordered_map>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "base/crc32c.h"
#include "base/float16.h"
#include "checkpoint/checkpoint.h"
#include "cli/bench_util.h"
#include "cli/commands.h"
#include "cli/output.h"
#include "cli/step_util.h"
#include "coordinator/runtime.h"
#include "coordinator/trace_file.h"
#include "optim/adam.h"
#include "optim/worker_pool.h"

namespace ztier::cli {
namespace {

using Clock = std::chrono::steady_clock;
namespace co = ztier::coordinator;

struct OptArgs {
  std::string model = "llama2-7b";
  double scale = 64;
  std::string config;
  std::string dir;  // optimizer.paths override
  std::string sub_group_size;  // elements; empty: optimizer.sub_group_size / scale
  uint32_t buffer_count = 0;   // 0: config
  int32_t threads = -1;        // -1: config
  std::string isa;             // empty: config
  std::string dtype = "bf16";  // parameter (and gradient) type
  uint32_t runs = 3;
  bool json = false;
  bool no_progress = false;
};

double Since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

struct RunFigures {
  double step_s = 0, read_bw = 0, write_bw = 0;  // seconds, bytes/s
  double drive_s = 0;                           // the step's bytes at those bandwidths
  swapper::OptimizerStepStats stats;
};

// One checkpoint run: seconds, bytes read and written, resident growth.
struct CheckpointFigures {
  double read_bw = 0, write_bw = 0;  // the drive, bytes/s
  double save_s = 0, load_s = 0;
  double save_bound_s = 0, load_bound_s = 0;  // the call's bytes at those bandwidths
  uint64_t save_rss = 0, load_rss = 0;        // peak resident growth during the call, bytes
  uint64_t data_bytes = 0;                    // the checkpoint's data files
};

class OptimizerBench {
 public:
  explicit OptimizerBench(const OptArgs& a) : a_(a) {}
  // The drive-bandwidth file goes, however the bench ends.
  ~OptimizerBench() {
    std::error_code ec;
    if (!io_file_.empty()) std::filesystem::remove(io_file_, ec);
  }

  // Validates the options, the config and the model shape (usage errors:
  // exit status 2); Setup() then lays out the state (run-time errors: 1).
  Status Prepare();
  Status Setup();
  Status MeasureUpdateInMemory();
  const tiering::Config& config() const { return config_; }
  Result<RunFigures> Run(uint32_t r);
  int Report(const std::vector<RunFigures>& runs);
  // One save and one load of the checkpoint at `dir` (bench checkpoint).
  Result<CheckpointFigures> RunCheckpoint(const std::string& dir);
  int ReportCheckpoint(const std::vector<CheckpointFigures>& runs);
  Status Step();

 private:
  Result<double> PlainIo(const char* rw);
  checkpoint::RankAccess Access();

  OptArgs a_;
  tiering::Config config_;
  co::TraceFile trace_;
  std::unique_ptr<co::RankRuntime> rt_;
  optim::DType dtype_ = optim::DType::kBF16;
  co::DType co_dtype_ = co::DType::kBFloat16;
  std::vector<std::vector<uint8_t>> grads_;  // per parameter
  std::unordered_map<uint64_t, size_t> index_;  // parameter id -> grads_ index
  uint64_t elements_ = 0;
  std::string io_file_;
  uint64_t io_bytes_ = 0;
  double update_s_ = 0;     // median, state in memory
  double checksum_s_ = 0;   // CRC32C of the state read and written, in memory
  double init_s_ = 0;
  optim::AdamHyper hyper_;
};

// Bytes of the file the drive's bandwidth is measured on: the step's state
// (`state_bytes`), but at least one full queue of blocks (`block` bytes x
// `queue_depth`), rounded up to whole blocks. A scaled-down model's state can
// be smaller than one block (tiny at 1/64: 28 KiB of state against 1 MiB
// blocks), and a bandwidth needs the queue kept full to mean anything.
uint64_t DriveBenchBytes(uint64_t state_bytes, uint64_t block, uint32_t queue_depth) {
  block = std::max<uint64_t>(block, 1);
  const uint64_t want = std::max(state_bytes, block * std::max<uint32_t>(queue_depth, 1));
  return (want + block - 1) / block * block;
}

Status OptimizerBench::Prepare() {
  ZTIER_ASSIGN_OR_RETURN(config_, LoadConfigOrDefaults(a_.config));
  if (!(a_.scale >= 1.0)) {
    return Status::InvalidArgument(
        fmt::format("--scale {} must be at least 1 (it divides every tensor's element count)",
                    a_.scale));
  }
  if (a_.dtype == "bf16") {
    dtype_ = optim::DType::kBF16;
    co_dtype_ = co::DType::kBFloat16;
  } else if (a_.dtype == "fp16") {
    dtype_ = optim::DType::kF16;
    co_dtype_ = co::DType::kFloat16;
  } else if (a_.dtype == "fp32") {
    dtype_ = optim::DType::kF32;
    co_dtype_ = co::DType::kFloat32;
  } else {
    return Status::InvalidArgument(
        fmt::format("--dtype {}: use bf16, fp16 or fp32", a_.dtype));
  }
  tiering::OptimizerConfig& oc = config_.optimizer;
  oc.tier = tiering::OptimizerTier::kNvme;
  if (!a_.dir.empty()) oc.paths = {a_.dir};
  if (!a_.sub_group_size.empty()) {
    ZTIER_ASSIGN_OR_RETURN(oc.sub_group_size, tiering::ParseElementCount(a_.sub_group_size, tiering::Limits{1, 10'000'000'000}));
  } else {
    // The same number of sub-groups as the full-size model has.
    oc.sub_group_size = std::max<uint64_t>(
        1, static_cast<uint64_t>(std::ceil(static_cast<double>(oc.sub_group_size) / a_.scale)));
  }
  if (a_.buffer_count != 0) oc.buffer_count = a_.buffer_count;
  if (a_.threads >= 0) oc.threads = static_cast<uint32_t>(a_.threads);
  if (!a_.isa.empty()) {
    ZTIER_ASSIGN_OR_RETURN(optim::Isa isa, optim::ParseIsa(a_.isa));
    oc.isa = isa == optim::Isa::kAvx512 ? tiering::OptimizerIsa::kAvx512
             : isa == optim::Isa::kAvx2 ? tiering::OptimizerIsa::kAvx2
                                        : tiering::OptimizerIsa::kScalar;
  }
  if (tiering::OptimizerPaths(config_).empty()) {
    ZTIER_ASSIGN_OR_RETURN(std::string def, tiering::ExpandEnv(tiering::kDefaultNvmePath));
    oc.paths = {def};
  }
  // Parameters on NVMe too (their partitions are what the step writes); the
  // staging buffers need not be pinned for a CPU-only run.
  config_.tiers.host.allow_unpinned = true;
  if (config_.tiers.params == tiering::ParamTier::kNvme && config_.tiers.nvme.paths.empty()) {
    config_.tiers.nvme.paths = tiering::OptimizerPaths(config_);
  }
  ZTIER_RETURN_IF_ERROR(tiering::ValidateConfig(config_));

  ZTIER_ASSIGN_OR_RETURN(std::string model_path, ResolveModelPath(a_.model));
  ZTIER_ASSIGN_OR_RETURN(co::ModelShape shape, co::LoadModelShape(model_path));
  co::TraceGenOptions go;
  go.scale = a_.scale;
  go.steps = 1;
  ZTIER_ASSIGN_OR_RETURN(trace_, co::GenerateTrace(shape, go));
  return Status::Ok();
}

Status OptimizerBench::Setup() {
  uint64_t largest = 0;
  for (const auto& p : trace_.params) {
    elements_ += p.numel;
    largest = std::max(largest, p.numel);
  }

  co::RuntimeOptions ro;
  ro.config = config_;
  ro.device = co::DeviceKind::kHost;
  // The config's swap buffers (they carry the parameter writes), sized for
  // the scaled shape: every partition fits one buffer.
  ro.buffer_elements_override = largest;
  ro.config.tiers.nvme.buffer_element_bytes = optim::DTypeBytes(dtype_);
  ZTIER_ASSIGN_OR_RETURN(rt_, co::RankRuntime::Create(ro));
  co::Coordinator& c = rt_->coordinator();
  for (const auto& p : trace_.params) {
    ZTIER_RETURN_IF_ERROR(c.RegisterParam(p.id, p.numel, co_dtype_, co::ParamTier::kNvme,
                                          false, p.name));
  }
  ZTIER_RETURN_IF_ERROR(c.Finalize());
  // Parameters: small values; gradients: a cheap deterministic pattern.
  const uint32_t eb = optim::DTypeBytes(dtype_);
  auto encode = [&](float f, uint8_t* out) {
    if (dtype_ == optim::DType::kF32) {
      memcpy(out, &f, 4);
    } else {
      const uint16_t h =
          dtype_ == optim::DType::kF16 ? FloatToHalf(f) : FloatToBf16(f);
      memcpy(out, &h, 2);
    }
  };
  std::vector<swapper::OptimizerSegment> segments;
  uint64_t seed = 1;
  for (const auto& p : trace_.params) {
    std::vector<uint8_t> data(p.numel * eb), grad(p.numel * eb);
    for (uint64_t i = 0; i < p.numel; ++i) {
      seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
      const float u = static_cast<float>(seed >> 40) / static_cast<float>(1 << 24) - 0.5f;
      encode(0.02f * u, data.data() + i * eb);
      encode(u, grad.data() + i * eb);
    }
    ZTIER_RETURN_IF_ERROR(c.SetParamData(p.id, data.data()));
    grads_.push_back(std::move(grad));
    index_[p.id] = grads_.size() - 1;
    segments.push_back({p.id, p.numel, dtype_});
  }
  const auto t0 = Clock::now();
  ZTIER_RETURN_IF_ERROR(rt_->CreateOptimizer(std::move(segments)));
  init_s_ = Since(t0);
  hyper_.lr = 1e-4;
  hyper_.weight_decay = 0.01;
  // The drive's own bandwidth, on a file as large as one step's state (at
  // least one queue of blocks: DriveBenchBytes).
  const auto& paths = tiering::OptimizerPaths(config_);
  io_file_ = paths.front() + "/bench_optimizer_io.dat";
  io_bytes_ = DriveBenchBytes(rt_->optimizer()->store().used() / 2, config_.io.block_size,
                              config_.io.queue_depth);
  return Status::Ok();
}

Status OptimizerBench::MeasureUpdateInMemory() {
  // The same elements, threads and instruction set, state in memory:
  // master, moments, gradients and parameter output as large as the model's.
  swapper::OptimizerSwapper& opt = *rt_->optimizer();
  optim::WorkerPool pool(opt.options().threads);
  const uint32_t eb = optim::DTypeBytes(dtype_);
  std::vector<float> master(elements_, 0.01f), m(elements_, 0.f), v(elements_, 0.f);
  std::vector<uint8_t> grad(elements_ * eb), out(elements_ * eb);
  // Gradients from the real ones (same values, same cost).
  uint64_t at = 0;
  for (const auto& g : grads_) {
    memcpy(grad.data() + at, g.data(), g.size());
    at += g.size();
  }
  std::vector<double> upd, crc;
  for (int rep = 0; rep < 3; ++rep) {
    const auto c = optim::MakeConstants(hyper_, rep + 1);
    optim::AdamSpan s;
    s.master = master.data();
    s.exp_avg = m.data();
    s.exp_avg_sq = v.data();
    s.grad = grad.data();
    s.grad_type = dtype_;
    s.param_out = out.data();
    s.out_type = dtype_;
    s.n = elements_;
    auto t0 = Clock::now();
    optim::AdamUpdateParallel(pool, c, s, opt.isa());
    upd.push_back(Since(t0));
    // The checksums the step computes: each state byte is checked once when
    // read and summed once when written.
    const uint64_t chunk = 1 << 20;
    const uint8_t* bytes[3] = {reinterpret_cast<const uint8_t*>(master.data()),
                               reinterpret_cast<const uint8_t*>(m.data()),
                               reinterpret_cast<const uint8_t*>(v.data())};
    const uint64_t per = elements_ * 4;
    const uint64_t chunks = (per + chunk - 1) / chunk;
    std::atomic<uint32_t> sink{0};
    t0 = Clock::now();
    for (int pass = 0; pass < 2; ++pass) {
      for (const uint8_t* b : bytes) {
        pool.ParallelFor(chunks, 1, [&](uint64_t lo, uint64_t hi) {
          uint32_t x = 0;
          for (uint64_t k = lo; k < hi; ++k) {
            x ^= Crc32c(b + k * chunk, std::min(chunk, per - k * chunk));
          }
          sink.fetch_xor(x, std::memory_order_relaxed);
        });
      }
    }
    crc.push_back(Since(t0));
  }
  update_s_ = Median(upd);
  checksum_s_ = Median(crc);
  return Status::Ok();
}

Result<double> OptimizerBench::PlainIo(const char* rw) {
  IoBenchOptions o;
  o.backend = std::string(tiering::IoBackendConfigName(config_.io.backend));
  o.rw = rw;
  o.bs = std::to_string(config_.io.block_size);
  o.qd = config_.io.queue_depth;
  o.size = std::to_string(io_bytes_);
  o.files = {io_file_};
  o.direct = config_.io.direct;
  o.progress = false;
  ZTIER_ASSIGN_OR_RETURN(IoBenchResult r, RunIoBenchmark(o));
  return r.bw_bytes_per_s;
}

Status OptimizerBench::Step() {
  return rt_->OptimizerStep(hyper_, [this](uint64_t id) -> const void* {
    return grads_[index_.at(id)].data();
  });
}

Result<RunFigures> OptimizerBench::Run(uint32_t r) {
  RunFigures f;
  // ABBA: the drive's figures before the step in even runs, after it in odd.
  auto drive = [&]() -> Status {
    ZTIER_ASSIGN_OR_RETURN(f.read_bw, PlainIo("read"));
    ZTIER_ASSIGN_OR_RETURN(f.write_bw, PlainIo("write"));
    return Status::Ok();
  };
  if (r % 2 == 0) ZTIER_RETURN_IF_ERROR(drive());
  const auto t0 = Clock::now();
  ZTIER_RETURN_IF_ERROR(Step());
  f.step_s = Since(t0);
  if (r % 2 == 1) ZTIER_RETURN_IF_ERROR(drive());
  f.stats = rt_->optimizer()->last_step_stats();
  f.drive_s = static_cast<double>(f.stats.bytes_read) / f.read_bw +
              static_cast<double>(f.stats.bytes_written + f.stats.param_bytes) / f.write_bw;
  return f;
}

int OptimizerBench::Report(const std::vector<RunFigures>& runs) {
  std::vector<double> step, drive, ratio, rbw, wbw;
  for (const auto& f : runs) {
    step.push_back(f.step_s);
    drive.push_back(f.drive_s);
    rbw.push_back(f.read_bw);
    wbw.push_back(f.write_bw);
    ratio.push_back(f.step_s / std::max(f.drive_s, update_s_));
  }
  const swapper::OptimizerSwapper& opt = *rt_->optimizer();
  const auto& last = runs.back().stats;
  const double bound = std::max(Median(drive), update_s_);
  if (a_.json) {
    nlohmann::json j = {
        {"model", a_.model},
        {"scale", a_.scale},
        {"elements", elements_},
        {"dtype", a_.dtype},
        {"sub_groups", opt.sub_group_count()},
        {"sub_group_size", opt.options().sub_group_size},
        {"buffers", std::min<uint64_t>(opt.options().buffer_count, opt.sub_group_count())},
        {"buffer_bytes", opt.slot_bytes()},
        {"threads", opt.threads()},
        {"isa", optim::IsaName(opt.isa())},
        {"paths", tiering::OptimizerPaths(config_)},
        {"runs", runs.size()},
        {"init_s", init_s_},
        {"step_s", Median(step)},
        {"bytes_read", last.bytes_read},
        {"bytes_written", last.bytes_written},
        {"param_bytes", last.param_bytes},
        {"drive_read_bw_bytes_per_s", Median(rbw)},
        {"drive_write_bw_bytes_per_s", Median(wbw)},
        {"drive_s", Median(drive)},
        {"update_in_memory_s", update_s_},
        {"checksum_in_memory_s", checksum_s_},
        {"step_over_bound", Median(ratio)},
        {"last_step",
         {{"read_wait_s", last.read_wait_s},
          {"buffer_wait_s", last.buffer_wait_s},
          {"verify_s", last.verify_s},
          {"update_s", last.update_s},
          {"checksum_s", last.checksum_s},
          {"param_wait_s", last.param_wait_s},
          {"drain_s", last.drain_s},
          {"peak_buffers", last.peak_buffers}}},
    };
    printf("%s\n", WithRunInfo(std::move(j)).dump().c_str());
    return 0;
  }
  printf("optimizer bench: %s (scale 1/%g), %llu elements (%s parameters), AdamW, %s update, "
         "%u threads\n",
         a_.model.c_str(), a_.scale, static_cast<unsigned long long>(elements_),
         a_.dtype.c_str(), std::string(optim::IsaName(opt.isa())).c_str(), opt.threads());
  printf("  state on %s: %u sub-groups of <= %llu elements, %llu buffers x %s\n",
         opt.store().file().Describe().c_str(), opt.sub_group_count(),
         static_cast<unsigned long long>(opt.options().sub_group_size),
         static_cast<unsigned long long>(
             std::min<uint64_t>(opt.options().buffer_count, opt.sub_group_count())),
         FormatSize(opt.slot_bytes()).c_str());
  printf("  per step: read %s, write %s state + %s parameters; initial state written in %.2f s\n",
         FormatSize(last.bytes_read).c_str(), FormatSize(last.bytes_written).c_str(),
         FormatSize(last.param_bytes).c_str(), init_s_);
  printf("  %-5s %9s %12s %12s %9s %10s %8s\n", "run", "step s", "drive rd GB/s",
         "drive wr GB/s", "drive s", "update s", "ratio");
  for (size_t i = 0; i < runs.size(); ++i) {
    const auto& f = runs[i];
    printf("  %-5zu %9.3f %12.2f %12.2f %9.3f %10.3f %8.3f\n", i + 1, f.step_s, f.read_bw / 1e9,
           f.write_bw / 1e9, f.drive_s, update_s_, ratio[i]);
  }
  printf("median of %zu: step %.3f s; bound max(drive %.3f s, update in memory %.3f s) = %.3f s; "
         "step / bound = %.3f\n",
         runs.size(), Median(step), Median(drive), update_s_, bound, Median(ratio));
  printf("  (checksums in memory %.3f s; last step: waited %.3f s for reads, %.3f s for buffers, "
         "update %.3f s, verify %.3f s, checksum %.3f s, parameter queue %.3f s, drain %.3f s, "
         "peak buffers %u)\n",
         checksum_s_, last.read_wait_s, last.buffer_wait_s, last.update_s, last.verify_s,
         last.checksum_s, last.param_wait_s, last.drain_s, last.peak_buffers);
  return 0;
}

// A field of /proc/self/status in bytes: "VmRSS:" (resident now) or
// "VmHWM:" (its peak).
uint64_t ResidentBytes(const char* field) {
  FILE* f = fopen("/proc/self/status", "r");
  if (f == nullptr) return 0;
  char line[256];
  uint64_t kb = 0;
  const size_t n = strlen(field);
  while (fgets(line, sizeof(line), f) != nullptr) {
    if (strncmp(line, field, n) == 0) kb = strtoull(line + n + 1, nullptr, 10);
  }
  fclose(f);
  return kb * 1024;
}
void ResetPeakResident() {
  if (FILE* f = fopen("/proc/self/clear_refs", "w")) {
    fputs("5", f);  // resets VmHWM to the current resident size (Linux >= 4.0)
    fclose(f);
  }
}

// Runs `call`: its seconds, and the resident memory it added at its peak.
template <typename F>
Status Measure(F&& call, double* seconds, uint64_t* growth) {
  ResetPeakResident();
  const uint64_t before = ResidentBytes("VmRSS:");
  const auto t0 = Clock::now();
  ZTIER_RETURN_IF_ERROR(call());
  *seconds = Since(t0);
  const uint64_t peak = ResidentBytes("VmHWM:");
  *growth = peak - std::min(before, peak);
  return Status::Ok();
}

checkpoint::RankAccess OptimizerBench::Access() {
  checkpoint::RankAccess a;
  checkpoint::BindRuntime(*rt_, &a);
  const auto& segs = rt_->optimizer()->segments();
  for (size_t k = 0; k < segs.size(); ++k) {
    const auto& p = trace_.params[k];
    a.params.push_back({p.id, p.name, {}, p.numel, co_dtype_, p.numel, false,
                        static_cast<int64_t>(k)});
  }
  a.hypers = {hyper_};
  a.library_version = "ztier bench checkpoint";
  return a;
}

Result<CheckpointFigures> OptimizerBench::RunCheckpoint(const std::string& dir) {
  CheckpointFigures f;
  ZTIER_ASSIGN_OR_RETURN(f.read_bw, PlainIo("read"));
  ZTIER_ASSIGN_OR_RETURN(f.write_bw, PlainIo("write"));
  const checkpoint::RankAccess a = Access();
  ZTIER_RETURN_IF_ERROR(
      Measure([&] { return checkpoint::Save(a, dir, {}); }, &f.save_s, &f.save_rss));
  const uint32_t eb = optim::DTypeBytes(dtype_);
  // Save reads the parameters and the state slots, writes the data file;
  // load reads the data file, writes the parameters and the state slots.
  const uint64_t state = rt_->optimizer()->store().used() / 2;
  f.data_bytes = elements_ * (eb + 12);
  f.save_bound_s = static_cast<double>(elements_ * eb + state) / f.read_bw +
                   static_cast<double>(f.data_bytes) / f.write_bw;
  f.load_bound_s = static_cast<double>(f.data_bytes) / f.read_bw +
                   static_cast<double>(elements_ * eb + state) / f.write_bw;
  ZTIER_RETURN_IF_ERROR(
      Measure([&] { return checkpoint::Load(a, dir).status(); }, &f.load_s, &f.load_rss));
  return f;
}

int OptimizerBench::ReportCheckpoint(const std::vector<CheckpointFigures>& runs) {
  std::vector<double> save, load, save_ratio, load_ratio, rbw, wbw, srss, lrss;
  for (const auto& f : runs) {
    save.push_back(f.save_s);
    load.push_back(f.load_s);
    save_ratio.push_back(f.save_s / f.save_bound_s);
    load_ratio.push_back(f.load_s / f.load_bound_s);
    rbw.push_back(f.read_bw);
    wbw.push_back(f.write_bw);
    srss.push_back(static_cast<double>(f.save_rss));
    lrss.push_back(static_cast<double>(f.load_rss));
  }
  const auto& opt = *rt_->optimizer();
  if (a_.json) {
    nlohmann::json j = {{"model", a_.model},
                        {"scale", a_.scale},
                        {"elements", elements_},
                        {"dtype", a_.dtype},
                        {"data_bytes", runs.back().data_bytes},
                        {"state_bytes", opt.store().used() / 2},
                        {"runs", runs.size()},
                        {"drive_read_bw_bytes_per_s", Median(rbw)},
                        {"drive_write_bw_bytes_per_s", Median(wbw)},
                        {"save_s", Median(save)},
                        {"load_s", Median(load)},
                        {"save_over_bound", Median(save_ratio)},
                        {"load_over_bound", Median(load_ratio)},
                        {"save_rss_growth_bytes", Median(srss)},
                        {"load_rss_growth_bytes", Median(lrss)}};
    printf("%s\n", WithRunInfo(std::move(j)).dump().c_str());
    return 0;
  }
  printf("checkpoint bench: %s (scale 1/%g), %llu elements (%s parameters) with AdamW state; "
         "checkpoint data %s\n",
         a_.model.c_str(), a_.scale, static_cast<unsigned long long>(elements_),
         a_.dtype.c_str(), FormatSize(runs.back().data_bytes).c_str());
  printf("  %-4s %9s %9s %8s %9s %9s %8s %10s %10s %9s\n", "run", "rd GB/s", "wr GB/s",
         "save s", "bound s", "ratio", "load s", "bound s", "ratio", "rss+ MiB");
  for (size_t i = 0; i < runs.size(); ++i) {
    const auto& f = runs[i];
    printf("  %-4zu %9.2f %9.2f %8.2f %9.2f %9.3f %8.2f %10.2f %10.3f %9.1f\n", i + 1,
           f.read_bw / 1e9, f.write_bw / 1e9, f.save_s, f.save_bound_s, save_ratio[i], f.load_s,
           f.load_bound_s, load_ratio[i],
           static_cast<double>(std::max(f.save_rss, f.load_rss)) / (1 << 20));
  }
  printf("median of %zu: save %.2f s (%.3f x its bytes at the drive's bandwidth), load %.2f s "
         "(%.3f x); resident growth save %.1f MiB, load %.1f MiB\n",
         runs.size(), Median(save), Median(save_ratio), Median(load), Median(load_ratio),
         Median(srss) / (1 << 20), Median(lrss) / (1 << 20));
  return 0;
}

int RunBenchCheckpoint(const OptArgs& a) {
  OptimizerBench b(a);
  // Exit status 1: the run failed (I/O error, disk full); 2: an option, the
  // config or the model is wrong (Prepare).
  auto fail = [](const Status& s, int code = kExitFailure) {
    fprintf(stderr, "ztier bench checkpoint: error: %s\n", s.ToString().c_str());
    return code;
  };
  if (Status s = b.Prepare(); !s.ok()) return fail(s, kExitUsage);
  Progress progress("checkpoint bench", a.runs + 2, !a.no_progress && !a.json);
  progress.Update(0, "laying out parameters and the initial optimizer state");
  if (Status s = b.Setup(); !s.ok()) return fail(s);
  progress.Update(1, "one optimizer step");
  if (Status s = b.Step(); !s.ok()) return fail(s);
  const std::string dir =
      (a.dir.empty() ? tiering::OptimizerPaths(b.config()).front() : a.dir) + "/bench_checkpoint";
  std::vector<CheckpointFigures> runs;
  Status status;
  for (uint32_t r = 0; r < a.runs && status.ok(); ++r) {
    progress.Update(2 + r, fmt::format("save and load, run {} of {}", r + 1, a.runs));
    Result<CheckpointFigures> f = b.RunCheckpoint(dir);
    if (f.ok()) runs.push_back(*f);
    status = f.status();
  }
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);  // the bench's checkpoint goes, however it ends
  if (!status.ok()) return fail(status);
  progress.Finish();
  return b.ReportCheckpoint(runs);
}

int RunBenchOptimizer(const OptArgs& a) {
  OptimizerBench b(a);
  // Exit status 1: the run failed (I/O error, disk full); 2: an option, the
  // config or the model is wrong (Prepare).
  auto fail = [](const Status& s, int code = kExitFailure) {
    fprintf(stderr, "ztier bench optimizer: error: %s\n", s.ToString().c_str());
    return code;
  };
  if (Status s = b.Prepare(); !s.ok()) return fail(s, kExitUsage);
  Progress progress("optimizer bench", a.runs + 3, !a.no_progress && !a.json);
  progress.Update(0, "laying out parameters and the initial optimizer state");
  if (Status s = b.Setup(); !s.ok()) return fail(s);
  progress.Update(1, "update with the state in memory");
  if (Status s = b.MeasureUpdateInMemory(); !s.ok()) return fail(s);
  progress.Update(2, "warm-up step");
  // One step that is not measured (first touch of the buffers and files).
  if (Result<RunFigures> w = b.Run(1); !w.ok()) return fail(w.status());
  std::vector<RunFigures> runs;
  for (uint32_t r = 0; r < a.runs; ++r) {
    progress.Update(3 + r, fmt::format("run {} of {}", r + 1, a.runs));
    Result<RunFigures> f = b.Run(r);
    if (!f.ok()) return fail(f.status());
    runs.push_back(*f);
  }
  progress.Finish();
  return b.Report(runs);
}


constexpr const char* kFooter = R"(
The model is a shape file or a name in configs/models/ (tiny, llama-tiny,
moe-small, gpt2-xl, llama2-7b, llama2-13b, llama2-70b); --scale N divides
every tensor's element count by N (default 64; the 7B shape at 1/2048 runs in
seconds). The drive is measured with the config's io.backend, io.block_size
and io.queue_depth on a file as large as the optimizer state, but at least
io.block_size x io.queue_depth (a small shape's state can be less than one
block). Exit status: 0 done, 1 the run failed (I/O error, disk full), 2 a bad
option, config or model.)";

}  // namespace

void RegisterBenchOptimizer(CLI::App& bench, int* exit_code) {
  auto a = std::make_shared<OptArgs>();
  CLI::App* cmd = bench.add_subcommand(
      "optimizer",
      "The pipelined optimizer step with its state on NVMe, against the drive's bandwidth and "
      "the update's speed in memory");
  cmd->add_option("--model", a->model, "Model shape (configs/models/<name>.yaml or a path)");
  cmd->add_option("--scale", a->scale, "Divide every tensor's element count by this (>= 1)");
  cmd->add_option("--config", a->config,
                  "ztier YAML config: file or name in configs/ (default: built-in defaults)");
  cmd->add_option("--dir", a->dir, "Directory for the optimizer state (optimizer.paths)");
  cmd->add_option("--sub-group-size", a->sub_group_size,
                  "Elements per sub-group (default: optimizer.sub_group_size / scale)");
  cmd->add_option("--buffer-count", a->buffer_count, "Optimizer buffers (optimizer.buffer_count)")
      ->check(CLI::Range(1u, 64u));
  cmd->add_option("--threads", a->threads, "Update threads; 0: all cores (optimizer.threads)")
      ->check(CLI::Range(0, 1024));
  cmd->add_option("--isa", a->isa, "Update instruction set: avx512, avx2, scalar");
  cmd->add_option("--dtype", a->dtype, "Parameter and gradient type: bf16, fp16, fp32");
  cmd->add_option("--runs", a->runs, "Measured steps (the median is reported)")
      ->check(CLI::Range(1u, 100u));
  cmd->add_flag("--json", a->json, "Print one JSON object");
  cmd->add_flag("--no-progress", a->no_progress, "No progress lines on stderr");
  cmd->footer(kFooter);
  cmd->callback([a, exit_code] { *exit_code = RunBenchOptimizer(*a); });
}

void RegisterBenchCheckpoint(CLI::App& bench, int* exit_code) {
  auto a = std::make_shared<OptArgs>();
  CLI::App* cmd = bench.add_subcommand(
      "checkpoint",
      "Save and load a checkpoint of a model's parameters and optimizer state (on NVMe), "
      "against the drive's bandwidth");
  cmd->add_option("--model", a->model, "Model shape (configs/models/<name>.yaml or a path)");
  cmd->add_option("--scale", a->scale, "Divide every tensor's element count by this (>= 1)");
  cmd->add_option("--config", a->config,
                  "ztier YAML config: file or name in configs/ (default: built-in defaults)");
  cmd->add_option("--dir", a->dir,
                  "Directory for the state and the checkpoint (optimizer.paths)");
  cmd->add_option("--dtype", a->dtype, "Parameter type: bf16, fp16, fp32");
  cmd->add_option("--runs", a->runs, "Measured save+load runs (medians are reported)")
      ->check(CLI::Range(1u, 100u));
  cmd->add_flag("--json", a->json, "Print one JSON object");
  cmd->add_flag("--no-progress", a->no_progress, "No progress lines on stderr");
  cmd->footer(kFooter);
  cmd->callback([a, exit_code] { *exit_code = RunBenchCheckpoint(*a); });
}

}  // namespace ztier::cli
