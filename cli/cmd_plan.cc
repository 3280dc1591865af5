// `ztier plan`: the memory planner (tiering/plan.h) for a model shape, a
// world size and a config: bytes per rank on each tier, whether it fits, the
// swap-buffer and prefetch settings it recommends, and the step time the
// NVMe and PCIe bandwidths allow (measured with `bench io` on the config's
// path with --measure, or given).
#include <sys/statvfs.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <iostream>
#include <memory>
#include <string>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "cli/bench_util.h"
#include "cli/commands.h"
#include "cli/output.h"
#include "cli/step_util.h"
#include "coordinator/trace_file.h"
#include "tiering/plan.h"
#include "tiering/units.h"

namespace ztier::cli {
namespace {


struct PlanArgs {
  std::string model;
  std::string config;
  uint32_t world_size = 1;
  double scale = 1.0;
  std::string optimizer = "nvme";
  bool fp32_gradients = false;
  std::string nvme_bw, nvme_write_bw, pcie_bw;
  double tflops = 0;
  std::string device_memory, host_memory, nvme_capacity;
  bool measure = false;
  bool json = false;
};

void PrintError(std::string_view msg) { fmt::print(stderr, "ztier plan: error: {}\n", msg); }

Result<uint64_t> OptionalBytes(const std::string& text, const char* flag) {
  if (text.empty()) return uint64_t{0};
  auto v = tiering::ParseByteSize(text, {0, UINT64_MAX - 1, false});
  if (!v.ok()) return v.status().WithContext(flag);
  return *v;
}

uint64_t HostMemoryBytes() {
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long page = sysconf(_SC_PAGE_SIZE);
  return pages > 0 && page > 0 ? static_cast<uint64_t>(pages) * static_cast<uint64_t>(page) : 0;
}

// Free bytes of the file system holding `path` (or its parent).
uint64_t FreeBytes(std::string path) {
  struct statvfs s {};
  while (!path.empty()) {
    if (statvfs(path.c_str(), &s) == 0) return static_cast<uint64_t>(s.f_bavail) * s.f_frsize;
    const auto parent = std::filesystem::path(path).parent_path().string();
    if (parent == path) break;
    path = parent;
  }
  return statvfs(".", &s) == 0 ? static_cast<uint64_t>(s.f_bavail) * s.f_frsize : 0;
}

Result<IoBenchResult> Measure(const tiering::Config& c, const char* rw) {
  const std::string dir = c.tiers.nvme.paths.empty() ? "ztier_nvme" : c.tiers.nvme.paths.front();
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  IoBenchOptions o;
  o.backend = std::string(tiering::IoBackendConfigName(c.io.backend));
  o.rw = rw;
  o.bs = std::to_string(c.io.block_size);
  o.qd = c.io.queue_depth;
  o.size = "512MiB";
  o.files = {dir + "/bench_plan_io.dat"};
  o.direct = c.io.direct;
  o.progress = false;
  return RunIoBenchmark(o);
}

int RunPlan(const PlanArgs& a) {
  auto path = ResolveModelPath(a.model);
  if (!path.ok()) return PrintError(path.status().ToString()), kExitUsage;
  auto shape = coordinator::LoadModelShape(*path);
  if (!shape.ok()) return PrintError(shape.status().ToString()), kExitUsage;
  auto config = LoadConfigOrDefaults(a.config);
  if (!config.ok()) return PrintError(config.status().ToString()), kExitUsage;
  auto opt = tiering::ParseStateTier(a.optimizer);
  if (!opt.ok()) return PrintError(opt.status().WithContext("--optimizer").ToString()), kExitUsage;
  if (a.world_size == 0) return PrintError("--world-size must be at least 1"), kExitUsage;
  if (!(a.scale >= 1.0)) return PrintError("--scale must be at least 1"), kExitUsage;

  coordinator::TraceGenOptions go;
  go.steps = 1;
  go.world_size = a.world_size;
  go.scale = a.scale;
  auto trace = coordinator::GenerateTrace(*shape, go);
  if (!trace.ok()) return PrintError(trace.status().ToString()), 1;

  tiering::PlanInput in;
  in.model = ModelNumbersOf(*trace, config->coordinator.param_persistence_threshold);
  in.world_size = a.world_size;
  in.config = *config;
  in.optimizer_tier = *opt;
  in.fp32_gradients = a.fp32_gradients;
  in.tflops = a.tflops;
  struct {
    const std::string* text;
    const char* flag;
    double* out;
  } bws[] = {{&a.nvme_bw, "--nvme-bw", &in.nvme_read_bw},
             {&a.nvme_write_bw, "--nvme-write-bw", &in.nvme_write_bw},
             {&a.pcie_bw, "--pcie-bw", &in.pcie_bw}};
  for (auto& b : bws) {
    auto v = OptionalBytes(*b.text, b.flag);
    if (!v.ok()) return PrintError(v.status().ToString()), kExitUsage;
    *b.out = static_cast<double>(*v);
  }
  std::string bw_source = in.nvme_read_bw > 0 ? "given" : "none";
  if (a.measure) {
    if (in.nvme_read_bw == 0) {
      auto r = Measure(*config, "read");
      if (!r.ok()) return PrintError(r.status().WithContext("--measure").ToString()), 1;
      in.nvme_read_bw = r->bw_bytes_per_s;
      bw_source = fmt::format("measured: bench io read {} qd {} on {}", FormatSize(r->bs), r->qd,
                              r->file);
    }
    if (in.nvme_write_bw == 0 && in.optimizer_tier == tiering::StateTier::kNvme) {
      auto w = Measure(*config, "write");
      if (!w.ok()) return PrintError(w.status().WithContext("--measure").ToString()), 1;
      in.nvme_write_bw = w->bw_bytes_per_s;
    }
  }
  auto dev = OptionalBytes(a.device_memory, "--device-memory");
  auto host = OptionalBytes(a.host_memory, "--host-memory");
  auto nvme = OptionalBytes(a.nvme_capacity, "--nvme-capacity");
  for (const auto* r : {&dev, &host, &nvme}) {
    if (!r->ok()) return PrintError(r->status().ToString()), kExitUsage;
  }
  in.device_capacity = *dev;
  // This machine's memory and the NVMe path's free space, shared by the
  // ranks of the node, unless given.
  in.host_capacity = *host ? *host : HostMemoryBytes() / a.world_size;
  in.nvme_capacity =
      *nvme ? *nvme
            : FreeBytes(config->tiers.nvme.paths.empty() ? "." : config->tiers.nvme.paths[0]) /
                  a.world_size;
  auto plan = tiering::MakePlan(in);
  if (!plan.ok()) return PrintError(plan.status().ToString()), kExitUsage;
  const tiering::Plan& p = *plan;
  const auto& r = p.recommend;

  if (a.json) {
    auto tier = [](const tiering::TierBytes& t) {
      return nlohmann::json{{"params", t.params},       {"gradients", t.gradients},
                            {"optimizer", t.optimizer}, {"buffers", t.buffers},
                            {"total", t.total()}};
    };
    nlohmann::json j = {
        {"model", shape->name},
        {"params", in.model.params},
        {"world_size", a.world_size},
        {"scale", a.scale},
        {"optimizer_tier", a.optimizer},
        {"bytes_per_param", p.bytes_per_param},
        {"model_state_bytes", p.model_state_bytes},
        {"per_rank", {{"device", tier(p.device)}, {"host", tier(p.host)}, {"nvme", tier(p.nvme)}}},
        {"pinned_bytes", p.pinned_bytes},
        {"largest_partition_elements", p.largest_partition},
        {"capacity", {{"device", in.device_capacity}, {"host", in.host_capacity},
                      {"nvme", in.nvme_capacity}}},
        {"fits", p.fits},
        {"problems", p.problems},
        {"recommend", {{"buffer_size", r.buffer_size}, {"buffer_count", r.buffer_count},
                       {"prefetch_bucket_size", r.prefetch_bucket_size},
                       {"max_live_parameters", r.max_live_parameters},
                       {"reasons", r.reasons}}},
        {"step", {{"nvme_read_bytes", p.nvme_read_bytes},
                  {"nvme_write_bytes", p.nvme_write_bytes},
                  {"param_read_bytes", p.param_read_bytes},
                  {"pcie_bytes_per_rank", p.pcie_bytes_per_rank},
                  {"nvme_read_bw", in.nvme_read_bw},
                  {"nvme_write_bw", in.nvme_write_bw},
                  {"pcie_bw", in.pcie_bw},
                  {"io_seconds", p.io_seconds},
                  {"param_io_seconds", p.param_io_seconds},
                  {"pcie_seconds", p.pcie_seconds},
                  {"compute_seconds", p.compute_seconds},
                  {"step_seconds", p.step_seconds}}},
    };
    std::cout << WithRunInfo(std::move(j)).dump(2) << std::endl;
    return 0;
  }
  using tiering::HumanBytes;
  fmt::print("ztier plan: {} ({} parameters{}), world size {}, optimizer state on {}\n",
             shape->name, in.model.params,
             a.scale != 1.0 ? fmt::format(", scale 1/{}", a.scale) : "", a.world_size,
             a.optimizer);
  fmt::print("  model states: {:.0f} bytes/param ({}), {} for the model\n", p.bytes_per_param,
             a.fp32_gradients ? "2 fp16 param + 2 fp16 grad + 4 fp32 grad + 12 Adam"
                              : "2 fp16 param + 2 fp16 grad + 12 fp32 Adam state",
             HumanBytes(p.model_state_bytes));
  fmt::print("\n  bytes per rank   {:>12} {:>12} {:>12} {:>12} {:>12} {:>12}\n", "params",
             "gradients", "optimizer", "buffers", "total", "capacity");
  auto row = [](const char* name, const tiering::TierBytes& t, uint64_t cap) {
    fmt::print("  {:<16} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12}\n", name,
               HumanBytes(t.params), HumanBytes(t.gradients), HumanBytes(t.optimizer),
               HumanBytes(t.buffers), HumanBytes(t.total()), cap ? HumanBytes(cap) : "-");
  };
  row("device", p.device, in.device_capacity);
  row("host", p.host, in.host_capacity);
  row("nvme", p.nvme, in.nvme_capacity);
  fmt::print("  (device: gathered working set; host buffers: {} pinned swap buffers)\n",
             HumanBytes(p.pinned_bytes));
  fmt::print("\n  fits: {}\n", p.fits ? "yes" : "no");
  for (const auto& s : p.problems) fmt::print("    - {}\n", s);
  fmt::print("\n  recommended (paste into the config):\n");
  fmt::print("    tiers:\n      device: {{max_live_parameters: {}}}\n",
             tiering::FormatElementCount(r.max_live_parameters));
  fmt::print("      nvme: {{buffer_count: {}, buffer_size: {}}}\n", r.buffer_count,
             tiering::FormatElementCount(r.buffer_size));
  fmt::print("    coordinator: {{prefetch_bucket_size: {}}}\n",
             tiering::FormatElementCount(r.prefetch_bucket_size));
  for (const auto& s : r.reasons) fmt::print("    # {}\n", s);
  fmt::print("\n  per step (all ranks): nvme read {}, written {} (parameters alone: {} read); "
             "pcie {} per rank\n",
             HumanBytes(p.nvme_read_bytes), HumanBytes(p.nvme_write_bytes),
             HumanBytes(p.param_read_bytes), HumanBytes(p.pcie_bytes_per_rank));
  if (in.nvme_read_bw > 0) {
    fmt::print("  nvme bandwidth: read {:.3f} GB/s ({}){}\n", in.nvme_read_bw / 1e9, bw_source,
               in.nvme_write_bw > 0 ? fmt::format(", write {:.3f} GB/s", in.nvme_write_bw / 1e9)
                                    : "");
    fmt::print("  predicted step: {:.3f} s (nvme {:.3f} s, parameters alone {:.3f} s; pcie "
               "{:.3f} s; compute {:.3f} s)\n",
               p.step_seconds, p.io_seconds, p.param_io_seconds, p.pcie_seconds,
               p.compute_seconds);
  } else {
    fmt::print("  predicted step: give --nvme-bw (bytes/s) or --measure\n");
  }
  return 0;
}

}  // namespace

void RegisterPlan(CLI::App& app, int* exit_code) {
  auto a = std::make_shared<PlanArgs>();
  CLI::App* cmd = app.add_subcommand(
      "plan", "Memory plan of a model: bytes per rank on each tier, fit, recommended "
              "buffers and prefetch, predicted step time");
  cmd->add_option("--model", a->model, "Model shape: file or name in configs/models/")
      ->required();
  cmd->add_option("--config", a->config,
                  "ztier YAML config: file or name in configs/ (default: built-in defaults)");
  cmd->add_option("--world-size", a->world_size, "Ranks")->capture_default_str();
  cmd->add_option("--scale", a->scale, "Divide every tensor's element count by this")
      ->capture_default_str();
  cmd->add_option("--optimizer", a->optimizer,
                  "Tier of optimizer state and gradients: nvme, host or device")
      ->capture_default_str();
  cmd->add_flag("--fp32-gradients", a->fp32_gradients,
                "Count an fp32 gradient copy (20 bytes/param, the ZeRO-Infinity table)");
  cmd->add_option("--nvme-bw", a->nvme_bw, "NVMe read bandwidth, bytes/s (e.g. 3e9)");
  cmd->add_option("--nvme-write-bw", a->nvme_write_bw, "NVMe write bandwidth, bytes/s");
  cmd->add_option("--pcie-bw", a->pcie_bw, "Host-to-device bandwidth per rank, bytes/s");
  cmd->add_option("--tflops", a->tflops, "Compute per rank, TFLOP/s (compute term)");
  cmd->add_option("--device-memory", a->device_memory, "Device memory per rank (e.g. 80GiB)");
  cmd->add_option("--host-memory", a->host_memory,
                  "Host memory per rank (default: this machine's / world size)");
  cmd->add_option("--nvme-capacity", a->nvme_capacity,
                  "NVMe bytes per rank (default: free space of the path / world size)");
  cmd->add_flag("--measure", a->measure,
                "Measure NVMe bandwidth with bench io on the config's first path");
  cmd->add_flag("--json", a->json, "Print one JSON object on stdout");
  cmd->callback([a, exit_code] { *exit_code = RunPlan(*a); });
}

}  // namespace ztier::cli
