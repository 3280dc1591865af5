#include "cli/step_util.h"

#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

namespace ztier::cli {

namespace fs = std::filesystem;

Result<tiering::Config> LoadConfigOrDefaults(const std::string& path) {
  if (path.empty()) return tiering::LoadConfigText("{}", "defaults");
  ZTIER_ASSIGN_OR_RETURN(std::string file, ResolveConfigPath(path));
  return tiering::LoadConfigFile(file);
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

uint32_t ThreadCount() {
  std::error_code ec;
  uint32_t n = 0;
  for (const auto& e : fs::directory_iterator("/proc/self/task", ec)) {
    (void)e;
    ++n;
  }
  return ec ? 0 : n;
}

namespace {

// Writes `text` to `path` through a temporary name, so that the parent never
// reads half a file.
bool WriteWhole(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) return false;
    f.write(text.data(), static_cast<std::streamsize>(text.size()));
    f.flush();
    if (!f) return false;
  }
  return std::rename(tmp.c_str(), path.c_str()) == 0;
}

std::string ReadWhole(const std::string& path, bool* found) {
  std::ifstream f(path, std::ios::binary);
  *found = static_cast<bool>(f);
  if (!f) return {};
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

[[noreturn]] void ChildMain(uint32_t rank, pid_t parent, const std::string& dir,
                            const std::function<Result<std::string>(uint32_t)>& fn) {
  // Die with the parent; it may have died before the prctl.
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() != parent) _exit(125);
  const std::string base = fmt::format("{}/rank{}", dir, rank);
  int code = 0;
  try {
    Result<std::string> r = fn(rank);
    if (r.ok()) {
      if (!WriteWhole(base + ".out", *r)) {
        WriteWhole(base + ".err", fmt::format("writing {}.out: {}", base, strerror(errno)));
        code = 1;
      }
    } else {
      WriteWhole(base + ".err", r.status().ToString());
      code = 1;
    }
  } catch (const std::exception& e) {
    WriteWhole(base + ".err", fmt::format("exception: {}", e.what()));
    code = 1;
  }
  fflush(stdout);
  fflush(stderr);
  _exit(code);
}

}  // namespace

Result<std::vector<std::string>> RunInChildProcesses(
    uint32_t n, const std::string& dir, std::chrono::milliseconds grace,
    const std::function<Result<std::string>(uint32_t)>& fn) {
  if (const uint32_t threads = ThreadCount(); threads > 1) {
    return Status::FailedPrecondition(fmt::format(
        "cannot fork ranks: this process already runs {} threads (fork before starting "
        "any)",
        threads));
  }
  fflush(stdout);
  fflush(stderr);
  const pid_t self = getpid();
  std::vector<pid_t> pids(n, -1);
  for (uint32_t r = 0; r < n; ++r) {
    const pid_t pid = fork();
    if (pid == 0) ChildMain(r, self, dir, fn);
    if (pid < 0) {
      const int err = errno;
      for (uint32_t k = 0; k < r; ++k) kill(pids[k], SIGKILL);
      for (uint32_t k = 0; k < r; ++k) waitpid(pids[k], nullptr, 0);
      return Status::IoError(fmt::format("fork for rank {}: {}", r, strerror(err)));
    }
    pids[r] = pid;
  }

  using Clock = std::chrono::steady_clock;
  std::vector<uint8_t> done(n, 0);
  std::vector<std::string> failures;  // in the order the children exited
  std::vector<uint8_t> killed(n, 0);
  uint32_t left = n;
  Clock::time_point deadline = Clock::time_point::max();
  while (left > 0) {
    bool reaped = false;
    for (uint32_t r = 0; r < n; ++r) {
      if (done[r]) continue;
      int st = 0;
      const pid_t got = waitpid(pids[r], &st, WNOHANG);
      if (got == 0) continue;
      done[r] = 1;
      --left;
      reaped = true;
      if (got < 0) {
        failures.push_back(fmt::format("rank {} (pid {}): waitpid: {}", r, pids[r],
                                       strerror(errno)));
      } else if (WIFEXITED(st) && WEXITSTATUS(st) == 0) {
        continue;
      } else {
        bool found = false;
        std::string err = ReadWhole(fmt::format("{}/rank{}.err", dir, r), &found);
        if (WIFSIGNALED(st)) {
          const int sig = WTERMSIG(st);
          err = killed[r] ? fmt::format("killed (SIGKILL) {} ms after another rank failed",
                                        grace.count())
                          : fmt::format("killed by signal {} ({})", sig, strsignal(sig));
        } else if (!found) {
          err = fmt::format("exited with status {} without a result", WEXITSTATUS(st));
        }
        failures.push_back(fmt::format("rank {} (pid {}): {}", r, pids[r], err));
      }
      if (!failures.empty() && deadline == Clock::time_point::max()) {
        deadline = Clock::now() + grace;
      }
    }
    if (left == 0) break;
    if (Clock::now() >= deadline) {
      for (uint32_t r = 0; r < n; ++r) {
        if (!done[r] && !killed[r]) {
          kill(pids[r], SIGKILL);
          killed[r] = 1;
        }
      }
    }
    if (!reaped) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  if (!failures.empty()) {
    std::string msg = failures.front();
    for (size_t i = 1; i < failures.size(); ++i) msg += "; then " + failures[i];
    return Status::Internal(msg);
  }
  std::vector<std::string> out(n);
  for (uint32_t r = 0; r < n; ++r) {
    bool found = false;
    out[r] = ReadWhole(fmt::format("{}/rank{}.out", dir, r), &found);
    if (!found) {
      return Status::Internal(fmt::format("rank {} exited 0 but left no result in {}", r, dir));
    }
  }
  return out;
}

}  // namespace ztier::cli
