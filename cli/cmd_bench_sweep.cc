// `ztier bench sweep`: `bench io` over a grid of backend x block size x
// queue depth x threads on one file, with a progress bar; writes every
// point to CSV and JSON and prints the fastest settings as a YAML `io:`
// block to paste into a ztier config.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "cli/bench_util.h"
#include "cli/commands.h"
#include "cli/output.h"
#include "cli/step_util.h"
#include "io/backend.h"
#include "tiering/units.h"

namespace ztier::cli {
namespace {

constexpr int kUsageError = 2;

struct SweepArgs {
  std::vector<std::string> backends = {"io_uring", "libaio", "psync"};
  std::vector<std::string> bs = {"128KiB", "256KiB", "512KiB", "1MiB", "2MiB", "4MiB"};
  std::vector<uint32_t> qd = {4, 8, 16, 32, 64, 128};
  std::vector<uint32_t> threads = {1, 2, 4};
  std::string rw = "read";
  std::string size = "512MiB";
  double time_s = 0;
  std::string file;
  std::string csv = "ztier_sweep.csv";
  std::string json = "ztier_sweep.json";
  bool direct = true;
};

void PrintError(std::string_view msg) {
  fmt::print(stderr, "ztier bench sweep: error: {}\n", msg);
}

int RunSweep(const SweepArgs& a) {
  // Check the grid before running any of it.
  std::vector<std::string> backends;
  for (const auto& b : a.backends) {
    auto kind = io::ParseBackendKind(b);
    if (!kind.ok() || b == "auto") {
      PrintError(fmt::format("--backends: '{}' is not one of io_uring, libaio, psync", b));
      return kUsageError;
    }
    io::BackendOptions bo;
    auto probe = io::CreateBackend(*kind, bo);
    if (!probe.ok()) {
      fmt::print(stderr, "ztier bench sweep: skipping {}: {}\n", b, probe.status().ToString());
      continue;
    }
    backends.push_back(b);
  }
  if (backends.empty()) {
    PrintError("no backend of --backends is available here");
    return kUsageError;
  }
  for (const auto& s : a.bs) {
    if (auto v = ParseSize(s); !v.ok()) {
      PrintError(v.status().WithContext("--bs").ToString());
      return kUsageError;
    }
  }
  if (a.qd.empty() || a.threads.empty() || a.bs.empty()) {
    PrintError("--bs, --qd and --threads each need at least one value");
    return kUsageError;
  }
  std::string file = a.file;
  if (file.empty()) {
    const char* env = getenv("ZTIER_NVME_PATH");
    const std::string dir = (env && *env) ? env : "./ztier_nvme";
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    file = dir + "/bench_sweep.dat";
  }

  const size_t total = backends.size() * a.bs.size() * a.qd.size() * a.threads.size();
  Progress progress("ztier bench sweep:", total, true);
  std::ofstream csv(a.csv);
  if (!csv) {
    PrintError(fmt::format("cannot write --csv {}", a.csv));
    return kUsageError;
  }
  csv << "backend,rw,bs,qd,threads,bytes,seconds,bw_bytes_per_s,iops,lat_p50_us,lat_p99_us,"
         "cpu_s\n";
  nlohmann::json points = nlohmann::json::array();
  IoBenchResult best;
  size_t done = 0;
  for (const auto& backend : backends) {
    for (const auto& bs : a.bs) {
      for (uint32_t qd : a.qd) {
        for (uint32_t threads : a.threads) {
          IoBenchOptions o;
          o.backend = backend;
          o.rw = a.rw;
          o.bs = bs;
          o.qd = qd;
          o.threads = threads;
          o.size = a.size;
          o.time_s = a.time_s;
          o.files = {file};
          o.direct = a.direct;
          o.progress = false;
          auto r = RunIoBenchmark(o);
          ++done;
          if (!r.ok()) {
            progress.Finish();
            PrintError(fmt::format("{} bs {} qd {} threads {}: {}", backend, bs, qd, threads,
                                   r.status().ToString()));
            return 1;
          }
          csv << fmt::format("{},{},{},{},{},{},{:.6f},{:.0f},{:.0f},{:.1f},{:.1f},{:.4f}\n",
                             r->backend, r->rw, r->bs, r->qd, r->threads, r->bytes, r->seconds,
                             r->bw_bytes_per_s, r->iops, r->lat_p50_us, r->lat_p99_us,
                             r->cpu_s);
          points.push_back({{"backend", r->backend},     {"rw", r->rw},
                            {"bs", r->bs},               {"qd", r->qd},
                            {"threads", r->threads},     {"bytes", r->bytes},
                            {"seconds", r->seconds},     {"bw_bytes_per_s", r->bw_bytes_per_s},
                            {"iops", r->iops},           {"lat_p50_us", r->lat_p50_us},
                            {"lat_p99_us", r->lat_p99_us}, {"cpu_s", r->cpu_s}});
          if (r->bw_bytes_per_s > best.bw_bytes_per_s) best = *r;
          progress.Update(done, fmt::format("{} bs {} qd {} threads {}: {:.3f} GB/s", backend,
                                            FormatSize(r->bs), qd, threads,
                                            r->bw_bytes_per_s / 1e9));
        }
      }
    }
  }
  progress.Finish();
  csv.close();
  nlohmann::json doc = {{"rw", a.rw}, {"file", file}, {"size", a.size}, {"points", points}};
  std::ofstream js(a.json);
  js << WithRunInfo(std::move(doc)).dump(2) << "\n";
  if (!csv || !js) {
    PrintError(fmt::format("writing {} or {} failed", a.csv, a.json));
    return 1;
  }
  fmt::print("ztier bench sweep: {} points ({}) on {}; results in {} and {}\n", total, a.rw,
             file, a.csv, a.json);
  fmt::print("best: {:.3f} GB/s ({} bs {} qd {} threads {}, p99 {:.0f} us)\n",
             best.bw_bytes_per_s / 1e9, best.backend, FormatSize(best.bs), best.qd,
             best.threads, best.lat_p99_us);
  fmt::print("# paste into a ztier config:\nio:\n  backend: {}\n  block_size: {}\n"
             "  queue_depth: {}\n  threads: {}\n",
             best.backend, tiering::FormatByteSize(best.bs), best.qd, best.threads);
  return 0;
}

constexpr const char* kFooter = R"(
Every point is one `ztier bench io` run (same engine, same options) on one
file (default ${ZTIER_NVME_PATH:-./ztier_nvme}/bench_sweep.dat, laid out once).
Backends that are not available here are skipped with a note. Lists are
comma separated: --bs 256KiB,1MiB --qd 8,32 --threads 1,2. A point moves
--size bytes (or runs --time seconds). The YAML block printed at the end
holds the fastest point.)";

}  // namespace

void RegisterBenchSweep(CLI::App& bench, int* exit_code) {
  auto a = std::make_shared<SweepArgs>();
  CLI::App* cmd = bench.add_subcommand(
      "sweep", "bench io over backend x block size x queue depth x threads; CSV, JSON and "
               "the best settings as a YAML io block");
  cmd->add_option("--backends", a->backends, "io_uring, libaio, psync")
      ->delimiter(',')
      ->capture_default_str();
  cmd->add_option("--bs", a->bs, "Block sizes")->delimiter(',')->capture_default_str();
  cmd->add_option("--qd", a->qd, "Queue depths")->delimiter(',')->capture_default_str();
  cmd->add_option("--threads", a->threads, "Thread counts")
      ->delimiter(',')
      ->capture_default_str();
  cmd->add_option("--rw", a->rw, "read, write, randread or randwrite")->capture_default_str();
  cmd->add_option("--size", a->size, "Bytes per point")->capture_default_str();
  cmd->add_option("--time", a->time_s, "Seconds per point instead of --size");
  cmd->add_option("--file", a->file, "File to use");
  cmd->add_option("--csv", a->csv, "CSV output")->capture_default_str();
  cmd->add_option("--json", a->json, "JSON output")->capture_default_str();
  cmd->add_flag("--direct,!--no-direct", a->direct, "O_DIRECT (default) or buffered");
  cmd->footer(kFooter);
  cmd->callback([a, exit_code] { *exit_code = RunSweep(*a); });
}

}  // namespace ztier::cli
