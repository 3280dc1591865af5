// Helpers shared by `ztier bench step`, `ztier bench sweep` and `ztier plan`:
// finding a model shape by name, loading a config (or the defaults), the
// planner's model numbers from a generated trace, durations ("2ms"), a
// progress bar on stderr, and running ranks as child processes.
//
// Plain functions and a single-threaded Progress object.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"
#include "cli/data_files.h"  // ResolveModelPath
#include "coordinator/trace_file.h"
#include "tiering/config.h"
#include "tiering/plan.h"

namespace ztier::cli {

// LoadConfigFile(path), or the built-in defaults when `path` is empty. A
// `path` that is no file is a shipped config's name ("examples/one_nvme").
Result<tiering::Config> LoadConfigOrDefaults(const std::string& path);

// Parses "2ms", "500us", "1.5s", "0.25" (seconds). Errors name the text.
Result<double> ParseDurationSeconds(std::string_view text);

// The planner's numbers of a model from its trace (rank partitions are
// computed by the planner). Parameters of at most `persistence_threshold`
// elements count as persistent (kept gathered), as the coordinator decides.
tiering::ModelNumbers ModelNumbersOf(const coordinator::TraceFile& trace,
                                     uint64_t persistence_threshold);

// A progress bar on stderr: rewritten in place on a terminal, one line per
// update otherwise. Disabled: prints nothing.
class Progress {
 public:
  Progress(std::string label, uint64_t total, bool enabled);
  ~Progress();
  // `done` of `total` units; `note` follows the bar ("step 2: 0.41 s").
  void Update(uint64_t done, std::string_view note);
  void Finish();

 private:
  std::string label_;
  uint64_t total_;
  bool enabled_;
  bool tty_;
  bool shown_ = false;
};

// Runs `fn(rank)` for rank 0 .. n-1, each in a child process forked from
// this one, and returns their payloads in rank order. Fork before this
// process starts threads (the children get only the calling thread); the
// function refuses with FailedPrecondition when it has more than one.
// Each child writes its payload (or its error) to a file in `dir` (an
// existing, empty directory) and leaves with _exit, so no destructor or
// atexit handler of the parent's state runs twice; a child dies with the
// parent (PR_SET_PDEATHSIG). Stdio is flushed before forking.
//
// Fails when any child fails: with the error of the first child to fail
// (in the order they exited), the others' after it. Once one child failed,
// the others get `grace` to exit on their own (they should fail too, a lost
// peer being an error) and are killed (SIGKILL) after it: never a hang.
Result<std::vector<std::string>> RunInChildProcesses(
    uint32_t n, const std::string& dir, std::chrono::milliseconds grace,
    const std::function<Result<std::string>(uint32_t rank)>& fn);

// Threads of this process (/proc/self/task), 0 when unknown.
uint32_t ThreadCount();

}  // namespace ztier::cli
