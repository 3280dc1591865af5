// Checkpoints of a training run's offloaded state (docs/checkpoint.md):
// every rank's parameter partitions, pending gradient partitions and
// optimizer state, the optimizer's hyperparameters and step, the config and
// an opaque user blob, in a directory that appears whole or not at all.
//
// Save (every rank calls it, collectively):
//   1. rank 0 creates DIR's sibling `.NAME.tmp-<nonce>` and tells the others;
//   2. each rank streams its state from the tiers into rank-R.bin through a
//      few 16 MiB buffers (the optimizer state one sub-group at a time through
//      the swapper's own buffer), with a CRC32C per 4 MiB chunk, fsyncs it,
//      and writes its index rank-R.json (fsynced);
//   3. the ranks agree that every shard is durable; rank 0 writes user.bin,
//      config.yaml and manifest.json (fsynced), fsyncs the directory and
//      publishes it: rename to DIR (or, if DIR holds an older checkpoint, an
//      atomic exchange, after which the old one is removed), then fsyncs the
//      parent;
//   4. the ranks learn whether the publish succeeded.
// A crash or error at any point leaves DIR as it was (the previous
// checkpoint, or nothing); the temporary directory is removed on error and
// by the next save after a crash.
//
// Load (each rank, independently): reads and checks the manifest and every
// index (CRC32C, ranges), checks that the engine holds the same parameters
// (id, numel, dtype) and optimizer layout, then reads, for each of its
// partitions, the overlap with every saved extent, whatever the world size
// of the save: a checkpoint of N ranks loads at M. Optimizer state is
// written to the swapper's uncommitted slots and committed at the end; a
// damaged chunk found while loading stops the load with Corruption naming
// the file and offset (the caller must not use the engine then).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "base/status.h"
#include "checkpoint/format.h"
#include "checkpoint/fs.h"
#include "coordinator/runtime.h"
#include "swapper/optimizer_swapper.h"

namespace ztier::checkpoint {

// One parameter as this rank's engine holds it.
struct RankParam {
  uint64_t id = 0;
  std::string name;
  std::optional<std::vector<uint64_t>> shape;  // as ParamMeta::shape
  uint64_t numel = 0;
  coordinator::DType dtype = coordinator::DType::kFloat32;
  uint64_t part_numel = 0;  // ceil(numel / world): rank r holds [r*p, r*p + p)
  bool has_grad = false;    // a gradient partition is pending
  int64_t segment = -1;     // its index among the optimizer's segments, or -1
};

// What Save and Load need of one rank's engine.
struct RankAccess {
  uint32_t rank = 0, world = 1;
  std::vector<RankParam> params;  // registration order
  // Copy this rank's partition (part_numel elements of the dtype).
  std::function<Status(uint64_t id, void* out)> read_param, read_grad;
  std::function<Status(uint64_t id, const void* in)> write_param, write_grad;
  // Load only: called once the checkpoint is known to fit, before the first
  // write (the caller drops its pending gradients there). May be empty.
  std::function<void()> before_load;
  swapper::OptimizerSwapper* optimizer = nullptr;  // may be null
  std::vector<optim::AdamHyper> hypers;            // its groups
  // All-gather of one value (a collective: every rank calls it in order).
  std::function<Result<std::vector<uint64_t>>(uint64_t)> exchange;
  std::string config_yaml;
  std::string library_version;
};

// Fills what `rt` provides: rank, world, parameter partitions (through the
// coordinator), the optimizer and its state, the exchange, the config. The
// caller adds `params` (names, gradients) and `hypers`.
void BindRuntime(coordinator::RankRuntime& rt, RankAccess* a);

// Writes a checkpoint of every rank to `dir` (see the file comment). The
// user blob of rank 0 is stored. `refused` is this rank's own reason not to
// save (a module in use, a bad argument): the ranks agree on it first, so a
// refusal on one rank fails the save on all rather than leaving the others
// waiting. `fs` is the file seam (tests inject faults).
Status Save(const RankAccess& a, const std::string& dir, std::span<const uint8_t> user,
            Fs& fs = Fs::Posix(), const Status& refused = Status::Ok());

// A save in three parts, so that most of it runs while training goes on:
//   Begin (collective, on the training thread): the ranks agree, rank 0
//     makes the temporary directory, and each rank writes its parameter and
//     gradient partitions (after Begin, training may change them);
//   WriteState (any one thread; nothing else may use the optimizer until
//     Finish): the optimizer state, the data file made durable, the index;
//   Finish (collective, on the training thread; runs WriteState first if it
//     has not run): the ranks agree every shard is durable, rank 0
//     publishes, every rank learns the outcome.
// Save() is the three in a row. A job destroyed without Finish publishes
// nothing (its temporary directory goes with the next save).
class SaveJob {
 public:
  static Result<std::unique_ptr<SaveJob>> Begin(const RankAccess& a, const std::string& dir,
                                                std::span<const uint8_t> user,
                                                Fs& fs = Fs::Posix(),
                                                const Status& refused = Status::Ok());
  ~SaveJob();
  Status WriteState();
  Status Finish();

 private:
  SaveJob();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Loads `dir` into this rank's engine (see the file comment). The pending
// gradients saved are written with write_grad; the caller clears its own
// first. `*wrote` (if given) says whether anything was written to the engine
// before a failure (nothing is, for a missing, damaged or incompatible
// manifest or index: those are checked first).
// Returns the manifest loaded (its `groups`: the optimizer's hyperparameters
// as saved).
Result<Manifest> Load(const RankAccess& a, const std::string& dir, bool* wrote = nullptr);

// Reads and checks the manifest only.
Result<Manifest> ReadManifest(const std::string& dir);
// Rank 0's user blob (or `rank`'s, of the saving run), checked against the
// manifest and the rank's index.
Result<std::string> ReadUserData(const std::string& dir);
Result<std::string> ReadUserData(const std::string& dir, uint32_t rank);

// Everything a reader checks, and every chunk of every file: the first
// problem found, or OK with a one-line summary in `*summary`.
Status Verify(const std::string& dir, std::string* summary);

// Writes the consolidated weights (the fp32 master where the optimizer kept
// one, else the parameter converted to float32; uint8 parameters as they
// are) as a file torch.load reads, keyed by the registered names (else
// "param.<id>"), streamed: memory is a few read windows, whatever the size.
Status ExportTorch(const std::string& dir, const std::string& out_path);

}  // namespace ztier::checkpoint
