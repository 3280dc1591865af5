// Runs the built `ztier` command (ZTIER_CLI, set by tests/cli/CMakeLists.txt)
// through the shell and collects what it printed and how it ended: the one
// way every CLI test starts the binary.
#pragma once

#include <sys/wait.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>

namespace ztier::testing {

struct CliRun {
  int status = -1;       // exit status; 128 + signal when killed
  std::string out;       // stdout (with stderr when no stderr_file was given)
  std::string err;       // stderr, when it went to stderr_file
  double seconds = 0;    // wall time of the command
};

// `args` is appended to the binary's path as shell words. With an empty
// `stderr_file`, stderr is merged into `out`; otherwise it is written to
// that file and read back into `err` ("/dev/null" drops it).
inline CliRun RunZtier(const std::string& args, const std::string& stderr_file = "") {
  CliRun r;
  const std::string redirect = stderr_file.empty() ? " 2>&1" : " 2>" + stderr_file;
  const auto t0 = std::chrono::steady_clock::now();
  FILE* p = popen((std::string(ZTIER_CLI) + " " + args + redirect).c_str(), "r");
  if (p == nullptr) return r;
  char buf[4096];
  size_t n = 0;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) r.out.append(buf, n);
  const int st = pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (!stderr_file.empty()) {
    std::ifstream e(stderr_file);
    r.err.assign(std::istreambuf_iterator<char>(e), std::istreambuf_iterator<char>());
  }
  return r;
}

}  // namespace ztier::testing
