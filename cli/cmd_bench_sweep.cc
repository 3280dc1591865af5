// `ztier bench sweep`: `bench io` over a grid of backend x block size x
// queue depth x threads on one file. Each point is measured reading and
// writing, --runs times, after a warm-up; the points are ranked by the
// bandwidth of one read plus one write of the same bytes (what a training
// step does with its swapped state), and an `io:` block is recommended only
// when a point beats the config's own point beyond the run-to-run spread.
// Every run goes to CSV, every point's medians and ranges to JSON.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "cli/bench_util.h"
#include "cli/commands.h"
#include "cli/output.h"
#include "cli/step_util.h"
#include "cli/sweep_rule.h"
#include "io/backend.h"
#include "tiering/units.h"

namespace ztier::cli {
namespace {

struct SweepArgs {
  std::vector<std::string> backends = {"io_uring", "libaio", "psync"};
  std::vector<std::string> bs = {"128KiB", "256KiB", "512KiB", "1MiB", "2MiB", "4MiB"};
  std::vector<uint32_t> qd = {4, 8, 16, 32, 64, 128};
  std::vector<uint32_t> threads = {1, 2, 4};
  bool random = false;  // random offsets (randread/randwrite) instead of sequential
  std::string size = "512MiB";
  double time_s = 0;
  uint32_t runs = 3;    // measured read+write runs per point
  uint32_t warmup = 1;  // unmeasured read+write runs of the default point first
  std::string config;   // its io: block is the default point
  std::string file;
  std::string csv = "ztier_sweep.csv";
  std::string json = "ztier_sweep.json";
  bool direct = true;
};

// One grid point and what its runs measured.
struct Point {
  std::string backend;
  uint64_t bs = 0;  // bytes per request
  uint32_t qd = 0;
  uint32_t threads = 0;
  bool in_grid = true;  // false: the default point, added because the grid lacks it
  std::vector<IoBenchResult> reads, writes;
};

void PrintError(std::string_view msg) {
  fmt::print(stderr, "ztier bench sweep: error: {}\n", msg);
}

std::string Describe(const Point& p) {
  return fmt::format("{} bs {} qd {} threads {}", p.backend, FormatSize(p.bs), p.qd, p.threads);
}

// The backends of --backends that work here, in the order given; the others
// are skipped with a note. Usage error: a name that is not a backend.
Result<std::vector<std::string>> AvailableBackends(const std::vector<std::string>& names) {
  std::vector<std::string> out;
  for (const auto& b : names) {
    auto kind = io::ParseBackendKind(b);
    if (!kind.ok() || b == "auto") {
      return Status::InvalidArgument(
          fmt::format("--backends: '{}' is not one of io_uring, libaio, psync", b));
    }
    auto probe = io::CreateBackend(*kind, io::BackendOptions{});
    if (!probe.ok()) {
      fmt::print(stderr, "ztier bench sweep: skipping {}: {}\n", b, probe.status().ToString());
      continue;
    }
    out.push_back(b);
  }
  if (out.empty()) {
    return Status::Unavailable("no backend of --backends is available here: try --backends psync");
  }
  return out;
}

// The backend `io.backend: auto` resolves to: the first of io_uring, libaio,
// psync that works here (the engine probes in that order).
Result<std::string> ResolveAuto() {
  for (const char* b : {"io_uring", "libaio", "psync"}) {
    auto kind = io::ParseBackendKind(b);
    if (kind.ok() && io::CreateBackend(*kind, io::BackendOptions{}).ok()) return std::string(b);
  }
  return Status::Unavailable("no I/O backend works here");
}

// Every point must give each thread at least one block of --size (and no
// value may be 0: nothing would move, and the check below divides by them).
Status CheckFits(uint64_t size, const Point& p, std::string_view where) {
  if (p.bs == 0 || p.qd == 0 || p.threads == 0) {
    return Status::InvalidArgument(fmt::format(
        "{}: block size, queue depth and threads must each be at least 1 (got bs {}, qd {}, "
        "threads {})",
        where, p.bs, p.qd, p.threads));
  }
  if (size / p.bs / p.threads > 0) return Status::Ok();
  return Status::InvalidArgument(fmt::format(
      "--size {} is smaller than {} (block {} x {} threads): give --size at least {}",
      FormatSize(size), where, FormatSize(p.bs), p.threads, FormatSize(p.bs * p.threads)));
}

// The grid, then the default point (the config's io: block) if the grid
// lacks it. `*baseline` is its index.
Result<std::vector<Point>> MakePoints(const SweepArgs& a, const std::vector<std::string>& backends,
                                      const tiering::IoConfig& io, size_t* baseline) {
  ZTIER_ASSIGN_OR_RETURN(const uint64_t size, ParseSize(a.size));
  if (a.qd.empty() || a.threads.empty() || a.bs.empty()) {
    return Status::InvalidArgument("--bs, --qd and --threads each need at least one value");
  }
  std::vector<Point> points;
  for (const auto& backend : backends) {
    for (const auto& text : a.bs) {
      auto bs = ParseSize(text);
      if (!bs.ok()) return bs.status().WithContext("--bs");
      for (uint32_t qd : a.qd) {
        for (uint32_t threads : a.threads) {
          Point p{backend, *bs, qd, threads, true, {}, {}};
          ZTIER_RETURN_IF_ERROR(CheckFits(size, p, "--bs times --threads"));
          points.push_back(std::move(p));
        }
      }
    }
  }
  Point def;
  if (io.backend == io::BackendKind::kAuto) {
    ZTIER_ASSIGN_OR_RETURN(def.backend, ResolveAuto());
  } else {
    def.backend = std::string(tiering::IoBackendConfigName(io.backend));
  }
  def.bs = io.block_size;
  def.qd = io.queue_depth;
  def.threads = io.threads;
  def.in_grid = false;
  ZTIER_RETURN_IF_ERROR(CheckFits(size, def, "the config's io.block_size times io.threads"));
  auto same = [&](const Point& p) {
    return p.backend == def.backend && p.bs == def.bs && p.qd == def.qd &&
           p.threads == def.threads;
  };
  auto it = std::find_if(points.begin(), points.end(), same);
  if (it == points.end()) {
    points.push_back(def);
    it = points.end() - 1;
  }
  *baseline = static_cast<size_t>(it - points.begin());
  return points;
}

class Sweep {
 public:
  Sweep(const SweepArgs& a, std::string file) : a_(a), file_(std::move(file)) {}

  // One `bench io` run of `p`, reading or writing.
  Result<IoBenchResult> RunOnce(const Point& p, bool write) const {
    IoBenchOptions o;
    o.backend = p.backend;
    o.rw = a_.random ? (write ? "randwrite" : "randread") : (write ? "write" : "read");
    o.bs = std::to_string(p.bs);
    o.qd = p.qd;
    o.threads = p.threads;
    o.size = a_.size;
    o.time_s = a_.time_s;
    o.files = {file_};
    o.direct = a_.direct;
    o.progress = false;
    auto r = RunIoBenchmark(o);
    if (!r.ok()) return r.status().WithContext(fmt::format("{} {}", Describe(p), o.rw));
    return r;
  }

  // Warm-up, then --runs rounds over the grid. Rounds (not all of a point's
  // runs back to back) so that a drive's drift over minutes shows as spread
  // within each point rather than as a difference between points; the
  // direction alternates each round (read first, then write first) so that
  // neither always runs on a drive just busied by the other.
  Status Measure(std::vector<Point>* points, size_t baseline) {
    const size_t total = (a_.warmup + a_.runs * points->size()) * 2;
    Progress progress("ztier bench sweep:", total, true);
    size_t done = 0;
    for (uint32_t w = 0; w < a_.warmup; ++w) {
      for (bool write : {false, true}) {
        progress.Update(done++, fmt::format("warm-up: {}", Describe((*points)[baseline])));
        ZTIER_RETURN_IF_ERROR(RunOnce((*points)[baseline], write).status());
      }
    }
    for (uint32_t r = 0; r < a_.runs; ++r) {
      for (Point& p : *points) {
        for (bool write : {r % 2 == 1, r % 2 == 0}) {
          ZTIER_ASSIGN_OR_RETURN(IoBenchResult res, RunOnce(p, write));
          progress.Update(++done, fmt::format("run {}/{}: {} {}: {:.3f} GB/s", r + 1, a_.runs,
                                              Describe(p), write ? "write" : "read",
                                              res.bw_bytes_per_s / 1e9));
          (write ? p.writes : p.reads).push_back(std::move(res));
        }
      }
    }
    progress.Finish();
    return Status::Ok();
  }

 private:
  const SweepArgs& a_;
  std::string file_;
};

std::vector<double> Bandwidths(const std::vector<IoBenchResult>& runs) {
  std::vector<double> v;
  for (const auto& r : runs) v.push_back(r.bw_bytes_per_s);
  return v;
}

Spread CombinedOf(const Point& p) {
  return SpreadOf(CombinedRuns(Bandwidths(p.reads), Bandwidths(p.writes)));
}

// "1.234 (1.100-1.300)": median (min-max) in GB/s.
std::string FormatSpread(const Spread& s) {
  return fmt::format("{:.3f} ({:.3f}-{:.3f})", s.median / 1e9, s.min / 1e9, s.max / 1e9);
}

nlohmann::json SpreadJson(const Spread& s) {
  return {{"median_bw_bytes_per_s", s.median},
          {"min_bw_bytes_per_s", s.min},
          {"max_bw_bytes_per_s", s.max}};
}

nlohmann::json DirectionJson(const std::vector<IoBenchResult>& runs) {
  nlohmann::json j = SpreadJson(SpreadOf(Bandwidths(runs)));
  std::vector<double> p50, p99, cpu;
  for (const auto& r : runs) {
    p50.push_back(r.lat_p50_us);
    p99.push_back(r.lat_p99_us);
    cpu.push_back(r.cpu_s);
  }
  j["runs_bw_bytes_per_s"] = Bandwidths(runs);
  j["lat_p50_us"] = Median(p50);  // medians over the runs
  j["lat_p99_us"] = Median(p99);
  j["cpu_s"] = Median(cpu);
  return j;
}

nlohmann::json IoBlockJson(const Point& p) {
  return {{"backend", p.backend},
          {"block_size", p.bs},
          {"queue_depth", p.qd},
          {"threads", p.threads}};
}

Status WriteCsv(const std::string& path, const std::vector<Point>& points) {
  std::ofstream csv(path);
  csv << "backend,rw,bs,qd,threads,run,bytes,seconds,bw_bytes_per_s,iops,lat_p50_us,lat_p99_us,"
         "cpu_s\n";
  for (const Point& p : points) {
    for (const auto* runs : {&p.reads, &p.writes}) {
      for (size_t i = 0; i < runs->size(); ++i) {
        const IoBenchResult& r = (*runs)[i];
        csv << fmt::format("{},{},{},{},{},{},{},{:.6f},{:.0f},{:.0f},{:.1f},{:.1f},{:.4f}\n",
                           r.backend, r.rw, r.bs, r.qd, r.threads, i + 1, r.bytes, r.seconds,
                           r.bw_bytes_per_s, r.iops, r.lat_p50_us, r.lat_p99_us, r.cpu_s);
      }
    }
  }
  csv.close();
  if (!csv) return Status::IoError(fmt::format("writing --csv {} failed", path));
  return Status::Ok();
}

Status WriteJson(const std::string& path, const SweepArgs& a, const std::string& file,
                 const std::vector<Point>& points, size_t baseline, const SweepDecision& d) {
  nlohmann::json js = nlohmann::json::array();
  for (size_t i = 0; i < points.size(); ++i) {
    const Point& p = points[i];
    const Spread c = CombinedOf(p);
    js.push_back({{"backend", p.backend},
                  {"bs", p.bs},
                  {"qd", p.qd},
                  {"threads", p.threads},
                  {"bytes", p.reads.empty() ? 0 : p.reads.front().bytes},  // per run
                  {"default", i == baseline},
                  {"in_grid", p.in_grid},
                  {"read", DirectionJson(p.reads)},
                  {"write", DirectionJson(p.writes)},
                  {"combined", SpreadJson(c)},
                  {"bw_bytes_per_s", c.median}});
  }
  nlohmann::json doc = {
      {"pattern", a.random ? "random" : "sequential"},
      {"file", file},
      {"size", a.size},
      {"runs", a.runs},
      {"warmup", a.warmup},
      {"combined", "harmonic mean of read and write bandwidth: one read and one write of the "
                   "same bytes"},
      {"rule", "recommend the highest combined median among the points whose combined min "
               "exceeds the default point's combined max"},
      {"points", js},
      {"default", IoBlockJson(points[baseline])},
      {"best", IoBlockJson(points[d.best])},
      {"recommendation", d.recommend ? IoBlockJson(points[*d.recommend]) : nlohmann::json()}};
  std::ofstream out(path);
  out << WithRunInfo(std::move(doc)).dump(2) << "\n";
  out.close();
  if (!out) return Status::IoError(fmt::format("writing --json {} failed", path));
  return Status::Ok();
}

// The table, best combined median first; '*' marks the default point.
void PrintTable(const std::vector<Point>& points, size_t baseline) {
  std::vector<size_t> order(points.size());
  std::vector<Spread> combined;
  for (size_t i = 0; i < points.size(); ++i) {
    order[i] = i;
    combined.push_back(CombinedOf(points[i]));
  }
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t x, size_t y) { return combined[x].median > combined[y].median; });
  fmt::print("  {:<9} {:>8} {:>4} {:>3}  {:<24} {:<24} {}\n", "backend", "bs", "qd", "thr",
             "read GB/s med (min-max)", "write GB/s med (min-max)", "r+w GB/s med (min-max)");
  for (size_t i : order) {
    const Point& p = points[i];
    fmt::print("{} {:<9} {:>8} {:>4} {:>3}  {:<24} {:<24} {}\n", i == baseline ? '*' : ' ',
               p.backend, FormatSize(p.bs), p.qd, p.threads,
               FormatSpread(SpreadOf(Bandwidths(p.reads))),
               FormatSpread(SpreadOf(Bandwidths(p.writes))), FormatSpread(combined[i]));
  }
}

void PrintDecision(const std::vector<Point>& points, size_t baseline, const SweepDecision& d) {
  const Point& def = points[baseline];
  const Spread dc = CombinedOf(def);
  const Spread bc = CombinedOf(points[d.best]);
  if (!d.recommend) {
    if (d.best == baseline) {
      fmt::print("the default ({}) is the fastest point measured: nothing to change\n",
                 Describe(def));
    } else {
      fmt::print("no recommendation: no point beats the default ({1}, r+w {3}) beyond the "
                 "spread; the best median, {0} (r+w {2}), overlaps it: the default is as "
                 "good\n",
                 Describe(points[d.best]), FormatSpread(bc), Describe(def), FormatSpread(dc));
    }
    return;
  }
  const Point& p = points[*d.recommend];
  fmt::print("recommended: {} (r+w GB/s {}), faster in every run than the default {} "
             "(r+w GB/s {})\n",
             Describe(p), FormatSpread(bc), Describe(def), FormatSpread(dc));
  fmt::print("# paste into a ztier config:\nio:\n  backend: {}\n  block_size: {}\n"
             "  queue_depth: {}\n  threads: {}\n",
             p.backend, tiering::FormatByteSize(p.bs), p.qd, p.threads);
}

std::string SweepFile(const SweepArgs& a) {
  if (!a.file.empty()) return a.file;
  const char* env = getenv("ZTIER_NVME_PATH");
  const std::string dir = (env && *env) ? env : "./ztier_nvme";
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  return dir + "/bench_sweep.dat";
}

int RunSweep(const SweepArgs& a) {
  // Everything that can be wrong with the options is checked before any I/O.
  if (a.runs == 0) {
    PrintError("--runs must be at least 1 (3 or more give a spread worth comparing)");
    return kExitUsage;
  }
  auto backends = AvailableBackends(a.backends);
  if (!backends.ok()) {
    PrintError(backends.status().message());
    return kExitUsage;
  }
  auto config = LoadConfigOrDefaults(a.config);
  if (!config.ok()) {
    PrintError(config.status().WithContext("--config").ToString());
    return kExitUsage;
  }
  size_t baseline = 0;
  auto points = MakePoints(a, *backends, config->io, &baseline);
  if (!points.ok()) {
    PrintError(points.status().message());
    return kExitUsage;
  }
  // The outputs must be writable before minutes of runs go into them. The
  // check creates them; a failed run removes the ones it created.
  std::vector<std::string> created;
  for (const std::string* out : {&a.csv, &a.json}) {
    std::error_code ec;
    const bool existed = std::filesystem::exists(*out, ec);
    if (!std::ofstream(*out, std::ios::app)) {
      PrintError(fmt::format("cannot write {}: check the directory exists and is writable", *out));
      return kExitFailure;
    }
    if (!existed) created.push_back(*out);
  }
  const std::string file = SweepFile(a);
  Sweep sweep(a, file);
  if (Status s = sweep.Measure(&*points, baseline); !s.ok()) {
    PrintError(s.ToString());
    for (const std::string& out : created) {
      std::error_code ec;
      std::filesystem::remove(out, ec);
    }
    return ExitCodeFor(s);
  }
  std::vector<Spread> combined;
  for (const Point& p : *points) combined.push_back(CombinedOf(p));
  const SweepDecision d = DecideSweep(combined, baseline);
  Status written = WriteCsv(a.csv, *points);
  if (written.ok()) written = WriteJson(a.json, a, file, *points, baseline, d);
  if (!written.ok()) {
    PrintError(written.message());
    return kExitFailure;
  }
  fmt::print("ztier bench sweep: {} points x {} runs, read and write ({}), on {}; runs in {}, "
             "medians in {}\n",
             points->size(), a.runs, a.random ? "random" : "sequential", file, a.csv, a.json);
  PrintTable(*points, baseline);
  PrintDecision(*points, baseline, d);
  return 0;
}

constexpr const char* kFooter = R"(
Every run is one `ztier bench io` run (same engine, same options) on one
file (default ${ZTIER_NVME_PATH:-./ztier_nvme}/bench_sweep.dat). Each point is
measured reading and writing --size bytes (or for --time seconds), --runs
times, in rounds over the grid, after --warmup unmeasured read+write runs of
the default point (which also lay the file out). The default point is the
io: block of --config (built-in defaults without it: auto backend, 1 MiB,
qd 32, 1 thread), measured even when the grid lacks it.
Points are ranked by the combined bandwidth of a run's read and write: one
read and one write of the same bytes, 2 / (1/read + 1/write) (a training
step reads its swapped bytes and writes them back; the slower direction
bounds it). The table shows median (min-max) over the runs in GB/s, '*' the
default point. An io: block is printed only for a point whose slowest
combined run beats the default point's fastest (ranges that do not overlap),
the highest median of those; otherwise the default is as good as anything
measured and nothing is recommended. Lists are comma separated: --bs 256KiB,1MiB --qd 8,32.
The default grid is 324 points, each read and written --runs times: narrow
it, or bound each run with --time, for a sweep of minutes rather than hours.
Backends not available here are skipped with a note. Exit status: 0 done,
1 a run or an output file failed, 2 a bad option or config.)";

}  // namespace

void RegisterBenchSweep(CLI::App& bench, int* exit_code) {
  auto a = std::make_shared<SweepArgs>();
  CLI::App* cmd = bench.add_subcommand(
      "sweep", "bench io reads and writes over backend x block size x queue depth x threads, "
               "several runs each; recommends an io block only where it beats the default "
               "beyond the noise");
  cmd->add_option("--backends", a->backends, "io_uring, libaio, psync")
      ->delimiter(',')
      ->capture_default_str();
  cmd->add_option("--bs", a->bs, "Block sizes")->delimiter(',')->capture_default_str();
  cmd->add_option("--qd", a->qd, "Queue depths")->delimiter(',')->capture_default_str();
  cmd->add_option("--threads", a->threads, "Thread counts")
      ->delimiter(',')
      ->capture_default_str();
  cmd->add_flag("--random", a->random, "Random offsets (randread/randwrite), not sequential");
  cmd->add_option("--size", a->size, "Bytes per run")->capture_default_str();
  cmd->add_option("--time", a->time_s, "Seconds per run instead of --size");
  cmd->add_option("--runs", a->runs, "Measured read+write runs per point (median and range)")
      ->capture_default_str();
  cmd->add_option("--warmup", a->warmup, "Unmeasured read+write runs of the default point first")
      ->capture_default_str();
  cmd->add_option("--config", a->config, "Config YAML whose io: block is the default point");
  cmd->add_option("--file", a->file, "File to use");
  cmd->add_option("--csv", a->csv, "CSV output: every run")->capture_default_str();
  cmd->add_option("--json", a->json, "JSON output: every point's medians and ranges")
      ->capture_default_str();
  cmd->add_flag("--direct,!--no-direct", a->direct, "O_DIRECT (default) or buffered");
  cmd->footer(kFooter);
  cmd->callback([a, exit_code] { *exit_code = RunSweep(*a); });
}

}  // namespace ztier::cli
