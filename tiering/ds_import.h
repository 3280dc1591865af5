// DeepSpeed import: turns the offload-related part of a DeepSpeed JSON
// config into a ztier Config, reading each key as DeepSpeed's own config
// code reads it (docs/config.md has the full table).
//
// Placement. Parameters: offload_param.device nvme -> tiers.params nvme, cpu
// -> host. DeepSpeed keeps parameters on the GPU when offload_param is
// absent, its device is none, or the stage is below 3 (it ignores
// offload_param there); ztier always offloads them, so those import as
// tiers.params host, the nearest, as an issue. Optimizer state:
// offload_optimizer.device nvme -> optimizer.tier nvme (and tiers.gradients
// nvme, which DeepSpeed swaps with it), cpu -> host; absent, none or stage 0
// keep the state on the GPU: optimizer.tier host, as an issue. Below stage 3
// DeepSpeed offloads to the CPU whatever the device, so nvme there imports as
// host (an issue). A device other than none, cpu or nvme is an error, as it
// is for DeepSpeed.
//
// The stage is DeepSpeed's: 0 (ZeRO off) when not given.
//
// Old spellings: zero_optimization.cpu_offload (true: offload_optimizer
// {device: cpu}) and cpu_offload_param (true: offload_param {device: cpu});
// given together with the new key they are an error. cpu_offload_use_pin_memory
// has no effect in DeepSpeed and is listed as not mapped. "auto" (a value the
// HF Trainer fills in) is read as not given, as DeepSpeed's ZeRO config does,
// and is an issue. aio: block_size, queue_depth, intra_op_parallelism;
// single_submit, overlap_events and use_gds are taken when they match what
// ztier always does.
//
// Three kinds of output, so that a caller can refuse a config whose
// placement would silently change (ImportOptions::strict) and still read why.
// unmapped_keys: keys with no ztier equivalent. issues: one line per key whose
// DeepSpeed meaning the ztier config does not reproduce ("KEY.PATH: why; how to
// fix"), unmapped keys included; the same text is also a note. notes:
// everything said about the import, for a reader. zero_optimization keys about
// communication or checkpointing, and top-level keys other than
// zero_optimization and aio, are outside the import and named in one note each.
//
// Thread-safety: a pure function. The library never prints.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"
#include "tiering/config.h"

namespace ztier::tiering {

struct ImportOptions {
  // Fail (InvalidArgument listing every issue, one per line) instead of
  // returning a config that does not reproduce the DeepSpeed one.
  bool strict = false;
};

struct ImportResult {
  // The imported config. tiers.nvme.paths is empty when the JSON named no
  // NVMe path: ConfigToYaml then leaves the key out and the loader's default
  // path (kDefaultNvmePath) applies. optimizer.paths is empty when
  // offload_optimizer named no path: the state goes to tiers.nvme.paths.
  Config config;
  std::vector<std::string> unmapped_keys;  // full key paths, in JSON order
  std::vector<std::string> issues;         // "KEY.PATH: why; how to fix"
  std::vector<std::string> notes;          // one sentence each
};

// Parses `json_text` (a DeepSpeed config). Errors (InvalidArgument, one line
// per problem): JSON syntax (with line and column), a root that is not an
// object, values DeepSpeed itself rejects (an unknown offload device or
// stage, a deprecated key given with its replacement, an offload section that
// is not an object), and with options.strict every issue.
Result<ImportResult> ImportDeepSpeedJson(std::string_view json_text,
                                         const ImportOptions& options = {});

}  // namespace ztier::tiering
