// How every `ztier` command ends, and what its machine-readable output
// carries.
//
// Exit codes (docs/cli.md):
//   0  success
//   1  run-time failure: an I/O error, a full disk, damaged data, a device
//      that failed; running again may succeed once the cause is fixed
//   2  usage or bad input: an unknown option, a bad option value, a missing
//      or invalid file (config, trace, model shape); the command line or the
//      file must change
//
// Every `--json` document is an object that also records which ztier wrote
// it, when and where ("ztier_version", "time", "host"), so that figures kept
// for later can be told apart.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

#include "base/status.h"

namespace ztier::cli {

inline constexpr int kExitOk = 0;
inline constexpr int kExitFailure = 1;
inline constexpr int kExitUsage = 2;

// kExitUsage for what the caller got wrong (InvalidArgument, NotFound),
// kExitFailure for everything else; kExitOk for OK.
int ExitCodeFor(const Status& s);

// "ztier 0.2.0": the CLI's version line (`ztier --version`).
std::string VersionLine();

// Adds "ztier_version", "time" (UTC, ISO 8601 with seconds) and "host" to
// `doc`, an object, and returns it.
nlohmann::json WithRunInfo(nlohmann::json doc);

}  // namespace ztier::cli
