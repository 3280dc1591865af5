// Helpers shared by `ztier bench step`, `ztier bench sweep` and `ztier plan`:
// finding a model shape by name, loading a config (or the defaults), the
// planner's model numbers from a generated trace, durations ("2ms"), and a
// progress bar on stderr.
//
// Plain functions and a single-threaded Progress object.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>

#include "base/status.h"
#include "coordinator/trace_file.h"
#include "tiering/config.h"
#include "tiering/plan.h"

namespace ztier::cli {

// A model shape file: `model` as a path, else configs/models/<model>.yaml
// under the working directory or next to the executable's source tree.
// The error lists the names found in configs/models/.
Result<std::string> ResolveModelPath(std::string_view model);

// LoadConfigFile(path), or the built-in defaults when `path` is empty.
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

}  // namespace ztier::cli
