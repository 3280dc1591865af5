// Where the `ztier` command finds the files shipped with it (configs/:
// default.yaml, examples, model shapes, traces), so that an installed copy
// works from any directory and a build-tree copy works in the source tree.
//
// Places, in order, each holding a configs/ folder:
//   1. <exe dir>/<ZTIER_CLI_DATA_FROM_BIN>: <prefix>/share/ztier once
//      installed (`cmake --install`), found from the executable's own path;
//   2. the working directory;
//   3. the source tree the executable was built from.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"

namespace ztier::cli {

// The roots above that the executable knows of, in search order (whether or
// not they exist; the caller reports the missing ones).
std::vector<std::string> DataRoots();

// A shipped file by name: `name` itself when it is an existing file (a
// path), else <root>/<subdir>/<name><ext> in the first root that has it.
// `what` names the kind in errors ("model", "trace"). The NotFound error
// lists every folder looked in, why each failed, and the names found.
Result<std::string> ResolveDataFile(std::string_view what, std::string_view subdir,
                                    std::string_view name, std::string_view ext);

// The kinds of shipped file the commands take by name:
//   model shapes: configs/models/<name>.yaml (bench step, plan, trace gen, ...)
//   traces:       configs/traces/<name>.json (replay)
//   configs:      configs/<name>.yaml ("default", "examples/one_nvme")
Result<std::string> ResolveModelPath(std::string_view model);
Result<std::string> ResolveTracePath(std::string_view trace);
Result<std::string> ResolveConfigPath(std::string_view config);

}  // namespace ztier::cli
