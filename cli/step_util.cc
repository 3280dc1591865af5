#include "cli/step_util.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <map>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

namespace ztier::cli {

namespace fs = std::filesystem;

namespace {

// configs/models directories to look in: the working directory's, and the
// source tree's when the executable sits in a build directory under it.
std::vector<fs::path> ModelDirs() {
  std::vector<fs::path> dirs = {fs::path("configs") / "models"};
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    for (fs::path p = exe.parent_path(); !p.empty() && p != p.root_path(); p = p.parent_path()) {
      const fs::path d = p / "configs" / "models";
      if (fs::is_directory(d, ec)) {
        dirs.push_back(d);
        break;
      }
    }
  }
  return dirs;
}

}  // namespace

Result<std::string> ResolveModelPath(std::string_view model) {
  std::error_code ec;
  const std::string m(model);
  if (fs::is_regular_file(m, ec)) return m;
  std::vector<std::string> names;
  for (const fs::path& dir : ModelDirs()) {
    const fs::path p = dir / (m + ".yaml");
    if (fs::is_regular_file(p, ec)) return p.string();
    for (const auto& e : fs::directory_iterator(dir, ec)) {
      if (e.path().extension() == ".yaml") names.push_back(e.path().stem().string());
    }
  }
  std::sort(names.begin(), names.end());
  names.erase(std::unique(names.begin(), names.end()), names.end());
  return Status::NotFound(fmt::format(
      "model '{}' is neither a file nor a name in configs/models/ (known: {})", m,
      names.empty() ? std::string("none found") : fmt::format("{}", fmt::join(names, ", "))));
}

Result<tiering::Config> LoadConfigOrDefaults(const std::string& path) {
  if (path.empty()) return tiering::LoadConfigText("{}", "defaults");
  return tiering::LoadConfigFile(path);
}

Result<double> ParseDurationSeconds(std::string_view text) {
  struct Unit {
    std::string_view suffix;
    double seconds;
  };
  static constexpr Unit kUnits[] = {{"ns", 1e-9}, {"us", 1e-6}, {"ms", 1e-3}, {"s", 1.0}};
  std::string_view num = text;
  double scale = 1.0;
  for (const Unit& u : kUnits) {
    if (num.size() > u.suffix.size() && num.substr(num.size() - u.suffix.size()) == u.suffix) {
      num = num.substr(0, num.size() - u.suffix.size());
      scale = u.seconds;
      break;
    }
  }
  const std::string s(num);
  char* end = nullptr;
  const double v = strtod(s.c_str(), &end);
  if (s.empty() || end != s.c_str() + s.size() || !(v >= 0)) {
    return Status::InvalidArgument(fmt::format(
        "'{}' is not a duration: use a number with ns, us, ms or s (e.g. 2ms)", text));
  }
  return v * scale;
}

tiering::ModelNumbers ModelNumbersOf(const coordinator::TraceFile& t,
                                     uint64_t persistence_threshold) {
  tiering::ModelNumbers m;
  m.name = t.model;
  std::map<uint64_t, uint64_t> numel;
  for (const auto& p : t.params) {
    numel[p.id] = p.numel;
    m.params += p.numel;
    m.largest_param = std::max(m.largest_param, p.numel);
    ++m.param_tensors;
    if (p.persist || p.numel <= persistence_threshold) m.persistent_params += p.numel;
  }
  std::map<uint64_t, const coordinator::TraceModule*> modules;
  for (const auto& mod : t.modules) {
    modules[mod.id] = &mod;
    uint64_t n = 0;
    for (uint64_t id : mod.params) n += numel[id];
    m.largest_module = std::max(m.largest_module, n);
  }
  if (!t.steps.empty()) {
    for (const auto& e : t.steps.front()) {
      if (e.op != coordinator::TraceOp::kFetch) continue;
      auto it = modules.find(e.module);
      if (it == modules.end()) continue;
      m.flops_per_step += static_cast<double>(it->second->flops) * (e.forward ? 1.0 : 2.0);
    }
  }
  return m;
}

Progress::Progress(std::string label, uint64_t total, bool enabled)
    : label_(std::move(label)), total_(total), enabled_(enabled), tty_(isatty(STDERR_FILENO)) {}

Progress::~Progress() { Finish(); }

void Progress::Update(uint64_t done, std::string_view note) {
  if (!enabled_) return;
  if (tty_) {
    constexpr int kWidth = 30;  // characters of bar
    const int filled =
        total_ ? static_cast<int>(kWidth * std::min(done, total_) / total_) : 0;
    fmt::print(stderr, "\r{} [{}{}] {}/{} {}\x1b[K", label_, std::string(filled, '#'),
               std::string(kWidth - filled, ' '), done, total_, note);
    shown_ = true;
  } else {
    fmt::print(stderr, "{} {}/{} {}\n", label_, done, total_, note);
  }
  fflush(stderr);
}

void Progress::Finish() {
  if (shown_) {
    fmt::print(stderr, "\n");
    fflush(stderr);
    shown_ = false;
  }
}

}  // namespace ztier::cli
