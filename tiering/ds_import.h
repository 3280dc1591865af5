// DeepSpeed import: turns the offload-related part of a DeepSpeed JSON
// config into a ztier Config.
//
// Read: zero_optimization.offload_param (device, nvme_path, buffer_count,
// buffer_size, max_in_cpu, pin_memory), zero_optimization.offload_optimizer
// (device, nvme_path, buffer_count; pin_memory, pipeline_read,
// pipeline_write and fast_init are accepted with a note) and
// zero_optimization.sub_group_size, the stage3_* coordinator knobs
// (prefetch_bucket_size, max_live_parameters, max_reuse_distance,
// param_persistence_threshold, model_persistence_threshold, with or without
// the stage3_ prefix) and aio (block_size, queue_depth, and the parallelism
// under any of its names: intra_op_parallelism, thread_count, num_threads).
// Keys not given keep ztier's defaults (docs/config.md has the table).
//
// Every key under zero_optimization or aio that has no ztier equivalent is
// listed in unmapped_keys by its full path ("aio.use_gds"); notes say what
// was done with values that could not be taken as they are ("auto", out of
// range) and where DeepSpeed's default differs from ztier's.
//
// Thread-safety: a pure function. The library never prints.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"
#include "tiering/config.h"

namespace ztier::tiering {

struct ImportResult {
  // The imported config. tiers.nvme.paths is empty when the JSON named no
  // NVMe path: ConfigToYaml then leaves the key out and the loader's default
  // path (kDefaultNvmePath) applies. optimizer.paths is empty when
  // offload_optimizer named no path: the state goes to tiers.nvme.paths.
  Config config;
  std::vector<std::string> unmapped_keys;  // full key paths, in JSON order
  std::vector<std::string> notes;          // one sentence each
};

// Parses `json_text` (a DeepSpeed config). Errors: JSON syntax (with line and
// column) or a root that is not an object (InvalidArgument). Values ztier
// cannot take are notes, not errors.
Result<ImportResult> ImportDeepSpeedJson(std::string_view json_text);

}  // namespace ztier::tiering
