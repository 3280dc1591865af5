// OptimizerSwapper: this rank's optimizer state (fp32 master weights and
// Adam's two moments, 12 bytes per element) in an NvmeStore, and the
// pipelined optimizer step that streams it: for each sub-group in order, read
// its state into a host buffer, run the Adam/AdamW update, write it back, and
// hand the updated low-precision parameter partitions to a sink; the reads of
// the next sub-groups and the writes of the previous ones are in flight while
// a sub-group is updated.
//
// Layout. The parameter partitions ("segments", in the order given) are laid
// end to end in one flat range of elements, cut into sub-groups of
// `sub_group_size` elements (a segment may straddle two sub-groups). Each
// sub-group has two slots on NVMe (docs/swap_format.md):
//
//   slot := header (4096 bytes: magic, run id, sub-group, step, elements,
//           chunk CRC32Cs, header CRC) | master[n] | exp_avg[n] | exp_avg_sq[n]
//
// A step writes each sub-group into the slot that does not hold the last
// committed step and commits (flips every sub-group's slot, step += 1) only
// after every write of the step has completed. So a step that fails (a read
// error, ENOSPC, a torn write, a failing parameter sink) leaves the previous
// step's state intact and readable; the same step can be run again with the
// same gradients and gives the same result. Every read checks the slot's
// header (sub-group, step, size) and each chunk's CRC32C: a torn or stale
// slot is reported as corruption naming the sub-group, file and offset, and
// its data is never used.
//
// Buffers. The swapper owns `buffer_count` host buffers of one slot each
// (pageable: optimizer state never goes to the GPU, so no memlock is needed).
// A sub-group's buffer is taken before its read and given back when its write
// completes (on the I/O thread), never later; reads ahead take only buffers
// that are free, so the step never waits on a buffer that only it could free.
//
// Ownership: the swapper owns its store and buffers; the AsyncEngine is
// borrowed and must outlive it. Thread-safety: Initialize, Step and ReadState
// must not run concurrently with each other (one caller, the training
// thread); stats() and step() may be called from any thread.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "base/status.h"
#include "io/async_engine.h"
#include "optim/adam.h"
#include "optim/worker_pool.h"
#include "swapper/grad_store.h"
#include "swapper/nvme_store.h"
#include "tiering/pinned_pool.h"

namespace ztier::swapper {

// One parameter partition the optimizer updates: `numel` elements whose
// parameter (and gradient) has type `dtype`.
struct OptimizerSegment {
  uint64_t id = 0;
  uint64_t numel = 0;
  optim::DType dtype = optim::DType::kF32;
  // Its parameter group (torch's param_groups): the index of the
  // hyperparameters Step() updates it with.
  uint32_t group = 0;
};

struct OptimizerSwapperOptions {
  StoreOptions store;  // tag "optimizer"
  uint32_t buffer_count = 4;
  uint64_t sub_group_size = 100'000'000;  // elements per sub-group
  uint32_t threads = 0;                   // update/checksum threads; 0: all cores
  optim::Isa isa = optim::Isa::kScalar;   // must be available on this CPU
  // Gradient partitions on NVMe (tiers.gradients: nvme): the swapper owns a
  // GradStore laid out in its segment order, the trainer's hand-ins go to
  // it (grad_store()), and each sub-group's gradients are read with its
  // state, into the same buffer. `grad_staging_bytes` bounds the hand-ins'
  // staging (GradStore).
  bool grads_on_store = false;
  StoreOptions grad_store;  // its files (tag "grad")
  uint64_t grad_staging_bytes = 16ull << 20;
};

// The three arrays of the state.
enum class StateArray : uint8_t { kMaster = 0, kExpAvg = 1, kExpAvgSq = 2 };

// Figures of the last Step() (seconds of wall time on the calling thread).
struct OptimizerStepStats {
  uint64_t step = 0;            // the step number this Step() produced
  uint32_t sub_groups = 0;
  uint64_t elements = 0;        // elements updated (segments with a gradient)
  uint64_t bytes_read = 0;      // state bytes read (slots, headers included), and
                                // gradient bytes read from a gradient store
  uint64_t bytes_written = 0;   // state bytes written
  uint64_t param_bytes = 0;     // parameter bytes handed to the sink
  double seconds = 0;           // the whole step
  double read_wait_s = 0;       // waiting for a sub-group's read
  double grad_wait_s = 0;       // waiting for gradients (a step begun during backward)
  double buffer_wait_s = 0;     // waiting for a free buffer
  double verify_s = 0;          // checking headers and CRCs of reads
  double update_s = 0;          // the Adam update
  double checksum_s = 0;        // CRCs of what is written
  double param_wait_s = 0;      // waiting for the parameter thread (queue full)
  double drain_s = 0;           // waiting for the last writes and params
  uint32_t peak_buffers = 0;    // most buffers in use at once
};

class OptimizerSwapper {
 public:
  // Parameter groups (hyperparameter sets) one optimizer takes at most.
  static constexpr uint32_t kMaxGroups = 1u << 16;

  // The gradient partition of segment `id` (numel elements of its dtype, in
  // host memory, valid for the whole Step), or nullptr: the segment has no
  // gradient this step and is left as it is (state and parameter). With a
  // gradient store (grads_on_store) any non-null pointer means "its
  // gradient is in the store" and is not read. Asked
  // once per segment, just before the first sub-group holding it is
  // updated, on the thread running Step: it may block until the gradient
  // is known (a step begun during backward). An error fails the step.
  using GradSource = std::function<Result<const void*>(uint64_t id)>;
  // Receives updated parameter partitions, `data[i]` for segment `ids[i]`
  // (numel elements of its dtype), each once per step, in layout order,
  // batched (whatever has finished since the last call), from the swapper's
  // parameter thread (one call at a time). An error fails the step.
  using ParamSink =
      std::function<Status(std::span<const uint64_t> ids, std::span<const void* const> data)>;
  // Fills `out` with segment `id`'s current parameter partition (numel
  // elements of its dtype): the initial master weights.
  using ParamSource = std::function<Status(uint64_t id, void* out)>;

  // Lays out the sub-groups and creates the store (two slots per sub-group,
  // reserved in full) and the buffers. `engine` must outlive the swapper.
  static Result<std::unique_ptr<OptimizerSwapper>> Create(
      const OptimizerSwapperOptions& options, std::vector<OptimizerSegment> segments,
      io::AsyncEngine* engine);
  // Nothing is in flight between calls (each drains its own transfers).
  ~OptimizerSwapper();

  // Writes step 0: master = the parameters from `params` (converted to
  // fp32), both moments zero. Needed once, before the first Step().
  Status Initialize(const ParamSource& params);

  // How Step runs: `reverse` updates the sub-groups last to first (the order
  // backward produces gradients in); `defer_commit` leaves a successful
  // step uncommitted until Commit() (or Discard()): until then step() and
  // the state read are the previous step's, and no other Step, ReadState or
  // Initialize may run.
  struct StepPlan {
    bool reverse = false;
    bool defer_commit = false;
  };

  // One optimizer step (number step() + 1) over every sub-group, pipelined.
  // `hypers[g]` updates the segments of group g: one per group (group_count()).
  // A segment's bias correction counts the steps that updated it (it had a
  // gradient), as torch's per-parameter step does; step() counts all.
  // On success the new state is committed and every segment with a gradient
  // has been handed to `sink`. On failure nothing is committed: step() and
  // the state are those of the previous step (see the file comment).
  Status Step(std::span<const optim::AdamHyper> hypers, const GradSource& grads,
              const ParamSink& sink, const StepPlan& plan);
  Status Step(std::span<const optim::AdamHyper> hypers, const GradSource& grads,
              const ParamSink& sink) {
    return Step(hypers, grads, sink, StepPlan{});
  }
  // The one-group case.
  Status Step(const optim::AdamHyper& hyper, const GradSource& grads, const ParamSink& sink) {
    return Step(std::span<const optim::AdamHyper>(&hyper, 1), grads, sink, StepPlan{});
  }
  // Commits the step a Step with defer_commit left pending (flips its
  // slots; step() += 1); Discard() drops it (the previous state stays).
  // FailedPrecondition when none is pending.
  Status Commit();
  Status Discard();
  bool commit_pending() const { return pending_.has_value(); }

  // Copies segment `id`'s `array` as of the last committed step into `out`
  // (numel floats), reading and verifying the sub-groups it spans.
  Status ReadState(uint64_t id, StateArray array, float* out);

  // One run of a segment's state inside a sub-group's buffer, for
  // checkpoints: elements [seg_offset, seg_offset + count) of segment
  // `segment` (an index into segments()), its three arrays at `master`,
  // `exp_avg`, `exp_avg_sq` (count floats each).
  template <typename F>
  struct StateRun {
    uint32_t segment = 0;
    uint64_t seg_offset = 0, count = 0;
    F* master = nullptr;
    F* exp_avg = nullptr;
    F* exp_avg_sq = nullptr;
  };
  // Reads every sub-group's committed state once, in layout order, through
  // one of the swapper's buffers (verified as a step's read), and hands each
  // run to `fn` (valid during the call). Stops at the first error.
  Status ExportState(const std::function<Status(const StateRun<const float>&)>& fn);
  // Replaces the whole state: for each sub-group in layout order, `fill`
  // writes every run (the buffer is zeroed first), the sub-group is stamped
  // with `step` and written to its uncommitted slot; only when every write
  // has completed is it committed, with step() = `step` and segment k's
  // update count (its bias-correction step) = `updates[k]`. On failure the
  // previous state stays committed.
  Status ImportState(uint64_t step, std::span<const uint64_t> updates,
                     const std::function<Status(const StateRun<float>&)>& fill);
  // Committed steps that updated segment k (its bias-correction step).
  uint64_t updates(uint32_t k) const { return updates_[k]; }

  uint64_t step() const { return step_.load(std::memory_order_acquire); }
  uint32_t sub_group_count() const { return static_cast<uint32_t>(groups_.size()); }
  // Parameter groups: 1 + the largest segment group.
  uint32_t group_count() const { return group_count_; }
  uint64_t total_elements() const { return total_elements_; }
  const std::vector<OptimizerSegment>& segments() const { return segments_; }
  uint64_t slot_bytes() const { return slot_bytes_; }
  const NvmeStore& store() const { return *store_; }
  // The gradient store (grads_on_store), else nullptr. Segment k of the
  // store is segments()[k].
  GradStore* grad_store() { return grad_store_.get(); }
  optim::Isa isa() const { return options_.isa; }
  uint32_t threads() const { return workers_->threads(); }
  OptimizerStepStats last_step_stats() const;
  // Buffers taken now (0 between calls: none is kept past its write).
  uint32_t buffers_in_use() const { return pool_->stats().buffers_in_use; }
  const OptimizerSwapperOptions& options() const { return options_; }

 private:
  // A run of one segment's elements inside a sub-group.
  struct Piece {
    uint32_t segment = 0;     // index into segments_
    uint64_t seg_offset = 0;  // first element within the segment
    uint64_t group_offset = 0;  // first element within the sub-group
    uint64_t count = 0;       // elements
  };
  struct Group {
    uint64_t first = 0;  // flat index of its first element
    uint64_t numel = 0;
    std::vector<Piece> pieces;
    uint64_t slot_offset[2] = {0, 0};  // logical store offsets of its slots
    uint8_t committed = 0;             // slot holding the last committed step
    // With a gradient store: the aligned byte range of its pieces' gradients.
    uint64_t grad_begin = 0, grad_bytes = 0;
  };
  struct StepRun;  // one Step()'s in-flight bookkeeping (.cc)

  OptimizerSwapper(const OptimizerSwapperOptions& options,
                   std::vector<OptimizerSegment> segments, io::AsyncEngine* engine);
  Status Layout();
  uint64_t SlotBytes(uint64_t numel) const;
  uint64_t ChunkBytes(uint64_t numel) const;

  // A synchronous slot transfer (set-up, ReadState) through the engine.
  Status SlotSync(io::Op op, uint32_t g, uint8_t slot, uint8_t* buf);
  // The same, started: `t` is waited for by the caller (checkpoint paths).
  struct AsyncSlot;  // (.cc)
  Status SlotAsync(io::Op op, uint32_t g, uint8_t slot, uint8_t* buf, AsyncSlot* t);
  // Two buffers (one if the pool has one) for the checkpoint paths.
  Result<std::vector<tiering::BufferSpan>> AcquireTwo();
  // "read|write optimizer state of sub-group g at <file, offset>".
  std::string TransferWhat(io::Op op, uint32_t g, uint8_t slot) const;
  // Header + chunk CRCs of a slot in `buf` for sub-group `g` at `step`.
  void Stamp(uint32_t g, uint64_t step, uint8_t* buf);
  // Checks a slot read into `buf` against sub-group `g` and `step`.
  Status Check(uint32_t g, uint8_t slot, uint64_t step, const uint8_t* buf);
  std::string Where(uint32_t g, uint8_t slot) const;

  // The pieces of the step (Step() helpers, .cc).
  Status RunStep(StepRun& run);
  Status StartRead(StepRun& run, uint32_t g, const tiering::BufferSpan& span);
  // The read of sub-group g's gradients into `region` (a gradient store).
  Status StartGradRead(StepRun& run, uint32_t g, uint8_t* region);
  // Creates the gradient store and each sub-group's gradient range.
  Status LayoutGrads();
  // Reads ahead in the run's order; `pos` is the position (in that order)
  // of the sub-group being worked on.
  Status IssueReads(StepRun& run, size_t pos, bool must);
  Status WaitRead(StepRun& run, uint32_t g);
  // Asks for the gradients of g's segments not asked for yet.
  Status ResolveGrads(StepRun& run, uint32_t g);
  void Update(StepRun& run, uint32_t g, uint8_t* buf);
  Status StartWrite(StepRun& run, uint32_t g);
  void Drain(StepRun& run);

  OptimizerSwapperOptions options_;
  std::vector<OptimizerSegment> segments_;
  std::vector<uint64_t> segment_first_;  // flat index of each segment's first element
  // Per segment: committed steps that updated it (it had a gradient), the
  // step number of its bias correction, as torch keeps one per parameter.
  std::vector<uint64_t> updates_;
  // A successful step left uncommitted (StepPlan::defer_commit): its number
  // and which segments it updated.
  struct Pending {
    uint64_t step = 0;
    std::vector<uint8_t> updated;  // per segment
  };
  std::optional<Pending> pending_;
  std::vector<Group> groups_;
  uint64_t total_elements_ = 0;
  uint32_t group_count_ = 1;
  uint64_t slot_bytes_ = 0;  // bytes of the largest slot = one buffer
  io::AsyncEngine* engine_;
  std::unique_ptr<NvmeStore> store_;
  std::unique_ptr<GradStore> grad_store_;  // grads_on_store only
  std::unique_ptr<tiering::PinnedPool> pool_;
  std::unique_ptr<optim::WorkerPool> workers_;
  bool initialized_ = false;
  std::atomic<uint64_t> step_{0};

  mutable std::mutex stats_mu_;
  OptimizerStepStats last_stats_;
};

}  // namespace ztier::swapper
