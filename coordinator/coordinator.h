// Coordinator: the trace-driven engine behind the module hooks. One per rank.
//
// A recorded module trace drives one pipeline per parameter, in trace order:
//
//   NVMe partition --read--> swap buffer --H2D (copy stream)--> device partition
//     --all-gather (collective stream)--> full parameter on device
//
// Each stage starts as soon as its input is ready and its resource is free
// (swap buffers, live-parameter budget, fetch-event throttle). The rules are
// DeepSpeed ZeRO-3's (docs/design.md "Coordinator rules"): demand fetch,
// prefetch bucket, max live parameters, max reuse distance, persistence,
// fetch-event throttle. Where ztier does better (the device prefetch does not
// stop at a parameter still on NVMe; reads run ahead as far as buffers allow;
// a swap buffer goes back as soon as its copy is done) docs/impl.md says so.
//
// The trace: with the adaptive policy (default) every step is learned into a
// TraceBook of module orders with choice slots; a step follows one order,
// switches to another that fits what ran so far, re-synchronises at the next
// module that matches, and predicts choice slots from mirrors, the trainer's
// hints (Hint) or the most frequent module (speculation). The single policy
// is DeepSpeed's: one order, RECORD / COMPLETE / INVALID, dropped at the
// first deviation and re-recorded (docs/design.md "Dynamic traces").
//
// Threads: Fetch/Release/ResetStep/ReleaseAll/ParamData are called from the
// training thread (one at a time). A pipeline thread issues all device work
// (copies, collectives: every rank issues collectives in the same order),
// the engine's I/O thread completes reads. Counters may be read any time.
//
// Ownership: the coordinator borrows the device, collective and swapper
// (they must outlive it) and owns device memory of full parameters and
// partitions, and host copies of host-tier partitions.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "base/status.h"
#include "coordinator/collective.h"
#include "coordinator/event_log.h"
#include "coordinator/timeline_sink.h"
#include "coordinator/trace_book.h"
#include "coordinator/trace_file.h"
#include "swapper/param_swapper.h"
#include "tiering/config.h"
#include "tiering/device.h"

namespace ztier::coordinator {

// The config's trace policy (tiering/config.h): adaptive or single.
using TracePolicy = tiering::TracePolicy;

struct CoordinatorOptions {
  // All counts are elements (numel), as DeepSpeed's stage3_* keys.
  uint64_t max_live_parameters = 1'000'000'000;
  uint64_t prefetch_bucket_size = 50'000'000;
  uint64_t max_reuse_distance = 1'000'000'000;
  uint64_t param_persistence_threshold = 100'000;
  uint64_t model_persistence_threshold = UINT64_MAX;
  uint32_t max_ongoing_fetch_events = 2;  // all-gathers queued at once
  // Elements of the trace ahead of the prefetch frontier whose NVMe reads may
  // start; 0 = auto (max_live_parameters).
  uint64_t nvme_lookahead = 0;
  // Bookkeeping only: no device work, no NVMe I/O (replay --null-io and the
  // overhead benchmark); decisions and events are the same.
  bool null_io = false;
  TracePolicy trace_policy = TracePolicy::kAdaptive;
  uint32_t trace_orders = 8;  // adaptive: module orders kept at once
};

enum class TraceMode : uint8_t { kRecord, kComplete, kInvalid };
std::string_view TraceModeName(TraceMode m);

enum class ParamStatus : uint8_t { kNotAvailable, kInflight, kAvailable };

struct CoordinatorStats {
  uint64_t steps = 0;
  uint64_t fetch_calls = 0;
  uint64_t fetch_calls_with_demand = 0;  // a module fetch that issued a demand gather
  uint64_t params_fetched = 0;           // params a module fetch needed
  uint64_t demand_gathers = 0;           // params gathered on demand
  uint64_t prefetch_gathers = 0;         // params gathered ahead of use
  uint64_t prefetch_hits = 0;            // needed params already in flight/available
  uint64_t waits = 0;                    // needed params not yet available
  uint64_t releases = 0;
  uint64_t nvme_reads = 0;               // partitions swapped in
  uint64_t nvme_read_reclaims = 0;       // read-ahead buffers given back unused
  // Bytes of the NVMe partitions each step's fetches used, each once per
  // pass (forward, backward) of a step, persistent ones only until they stay
  // gathered: what a layout that packs by use reads when nothing stays in
  // memory from forward to backward (a model larger than the buffers). The
  // swapper's bytes_read over this is the read overhead; below 1 when the
  // coordinator keeps parameters from forward to backward.
  uint64_t nvme_bytes_needed = 0;
  uint64_t trace_invalidations = 0;     // single policy: orders dropped
  // Adaptive policy (docs/design.md "Dynamic traces").
  uint64_t trace_orders = 0;            // module orders known now
  uint64_t trace_switches = 0;          // a step moved to another known order
  uint64_t trace_resyncs = 0;           // skipped ahead to the next matching slot
  uint64_t trace_off = 0;               // fetches no known order had a place for
  uint64_t steps_on_order = 0;          // steps that ran one known order exactly
  uint64_t hints = 0;                   // modules named by Hint()
  uint64_t hint_gathers = 0;            // params gathered ahead because of a hint
  uint64_t speculative_gathers = 0;     // params gathered for a guessed choice
  uint64_t speculation_hits = 0;        // choice slots guessed right
  uint64_t speculation_misses = 0;      // choice slots guessed wrong
  uint64_t speculation_wasted = 0;      // params gathered for a wrong guess, released unused
  uint64_t repacks = 0;                 // NVMe packs laid out again in trace order
  uint64_t peak_live_numel = 0;          // elements of full params on device
  uint32_t peak_swap_buffers = 0;        // swap buffers in use at once
  double stall_nvme_s = 0;       // fetch waited for a read to finish
  double stall_device_s = 0;     // fetch waited for copy + gather
  uint64_t live_numel = 0;       // now
};

// Per-step counters of the fetches after the first step, for the benchmarks.
struct StepRecord {
  uint64_t step = 0;
  double seconds = 0;
  uint64_t fetch_calls = 0, fetch_calls_with_demand = 0;
  double stall_nvme_s = 0, stall_device_s = 0;
};

struct CoordinatorDeps {
  tiering::DeviceBackend* device = nullptr;  // not needed with null_io
  Collective* collective = nullptr;          // not needed with null_io
  swapper::ParamSwapper* swapper = nullptr;  // needed when a param is on NVMe
  tiering::PinnedPool* pool = nullptr;       // optional: for peak buffer stats
  EventSink* events = nullptr;               // optional
  TimelineSink* timeline = nullptr;          // optional: stage spans for a timeline
};

class Coordinator {
 public:
  static Result<std::unique_ptr<Coordinator>> Create(const CoordinatorOptions& options,
                                                     const CoordinatorDeps& deps);
  ~Coordinator();  // drains the pipeline, frees device memory

  // ---- set-up (before Finalize) ----
  // `numel` elements of `dtype`; the rank keeps elements [rank x p, (rank+1)
  // x p) of the flattened parameter, p = ceil(numel / world) (zero padded).
  // NVMe-tier partitions are added to the swapper here.
  Status RegisterParam(uint64_t id, uint64_t numel, DType dtype, ParamTier tier,
                       bool persist = false, std::string name = {});
  Status RegisterModule(uint64_t id, std::string name, std::vector<uint64_t> params);
  // Decides persistence, seals the swapper (lays out the store).
  Status Finalize();
  // Stores the parameter's initial full data (numel x dtype bytes, host
  // memory): this rank's slice goes to the parameter's tier.
  Status SetParamData(uint64_t id, const void* full_host_data);

  // ---- the hooks ----
  Status Fetch(uint64_t module, bool forward = true);
  Status Release(uint64_t module, bool backward = false);
  Status ResetStep();
  // The trainer knows which modules come next (the experts a router chose):
  // their choice slots ahead in the followed order take them, and their
  // params are prefetched now, within the usual budgets. Modules with no
  // choice slot ahead are ignored. Like fetches, hints must be the same on
  // every rank. A hint with no order to follow yet does nothing.
  Status Hint(std::span<const uint64_t> modules);
  // Frees every non-persistent full parameter (and, with `persistent`, those too).
  Status ReleaseAll(bool persistent = false);

  // Device pointer of an AVAILABLE parameter (numel x dtype bytes, then
  // padding); an error naming its status otherwise.
  Result<void*> ParamData(uint64_t id);
  ParamStatus param_status(uint64_t id) const;
  // OK when no module holds a parameter (between steps); else
  // FailedPrecondition naming the first parameter in use, its module and
  // `what` cannot run until it is released.
  Status CheckNoneActive(std::string_view what) const;
  TraceMode trace_mode() const;
  uint64_t step_id() const;
  CoordinatorStats stats() const;
  // Partition elements (p) of `id`, 0 if unknown.
  uint64_t partition_numel(uint64_t id) const;

  // ---- optimizer access (training thread, like the hooks) ----
  // Reduce-scatters a parameter's full gradient (`full_grad`: numel elements
  // of its dtype, device memory, complete before the call) averaged over the
  // ranks; this rank's partition of the mean (partition_numel elements,
  // padding included) lands in host memory at `part_grad_host`. Issued on the
  // collective stream after every gather already requested, so each rank
  // issues it at the same place in its collective order; blocks until done.
  Status ReduceScatterGradient(uint64_t id, const void* full_grad, void* part_grad_host);
  // Exchanges one value with every rank (a collective, ordered after every
  // gather requested so far, as ReduceScatterGradient): result[r] is rank
  // r's. For small agreements between ranks, e.g. which parameters have a
  // gradient this step.
  Result<std::vector<uint64_t>> ExchangeHost(uint64_t value);
  // Copies this rank's partition (partition_numel elements) from its tier to
  // host memory, or from host memory to its tier. The parameter must not be
  // used by an active module; a prefetch in flight is waited for.
  // WritePartition frees a full parameter kept AVAILABLE (persistent, reused
  // soon, prefetched): the next fetch gathers the new data.
  Status ReadPartition(uint64_t id, void* out_host);
  Status WritePartition(uint64_t id, const void* in_host);
  // WritePartition for many parameters (`in_host[i]` for `ids[i]`): NVMe
  // partitions are written together (ParamSwapper::WriteMany: each packed
  // extent once, several in flight).
  Status WritePartitions(std::span<const uint64_t> ids, std::span<const void* const> in_host);
  // The background-thread error (a failed read or gather) that the next
  // Fetch will return, without taking it; OK if none.
  Status PendingAsyncError() const;

 private:
  struct Param;
  struct Module;
  struct QueueEntry {
    uint32_t param;  // index into params_
    uint64_t slot;   // slot of the followed order (module position) that uses it
  };
  // Where a slot's predicted module comes from.
  enum class SlotSource : uint8_t { kFixed, kMirror, kHint, kSpeculation, kNone };
  enum class ReadState : uint8_t { kNone, kReading, kInHost };

  Coordinator(const CoordinatorOptions& options, const CoordinatorDeps& deps);
  Result<Param*> FindParam(uint64_t id);
  // ReduceScatterGradient at world size 1: the gradient copied into the
  // partition, padding zeroed. Without mu_.
  Status CopyGradientOut(const Param& p, const void* full_grad, void* part_grad_host,
                         uint64_t grad_bytes);
  // ReadPartition's swapper part (NVMe), without mu_.
  Status ReadPartitionUnlocked(const Param& p, void* out_host);
  Result<Module*> FindModule(uint64_t id);

  // --- trace (all need mu_) ---
  // Places the fetch of module `mi` in the followed order: match, switch,
  // re-synchronise or off the trace. Params a wrong prediction gathered go
  // to `wasted`.
  void FollowFetch(std::unique_lock<std::mutex>& lock, uint32_t mi, uint64_t module,
                   std::vector<uint32_t>* wasted);
  // Module `mi` ran at slot `j`: records it, re-predicts after a wrong guess
  // and pops the queue up to j.
  void MatchSlot(size_t j, uint32_t mi, std::vector<uint32_t>* wasted);
  // The params of module `guessed` that module `actual` does not use (what
  // a wrong prediction gathered for nothing) go to `wasted`.
  void AddWasted(uint32_t guessed, uint32_t actual, std::vector<uint32_t>* wasted) const;
  // Another known order whose slots accept this step's sequence so far.
  const TraceBook::Order* FindSwitch() const;
  // The nearest slot accepting `mi` after pos_ in the followed order, or
  // (order, slot) in another one; false if none.
  bool FindResync(uint32_t mi, const TraceBook::Order** order, size_t* slot) const;
  // Starts following `order` at `slot` (step start, switch, resync).
  void Follow(const TraceBook::Order* order, size_t slot);
  // Re-predicts slots [s, end) and rebuilds their queue entries and uses.
  void RebuildFrom(size_t s);
  // Releases (or, unissued at world size 1, cancels) live params no longer
  // used in the followed order from pos_, as a wrong guess or a jump made
  // them useless. `only`: restrict to these params.
  void ReleaseUnneeded(std::unique_lock<std::mutex>& lock, int64_t module,
                       const std::vector<uint32_t>* only, bool speculation);
  // Gathers the next params of the queue within the bucket and budget.
  void Prefetch(int64_t module);
  // End of a step: learn its sequence, check ranks agree, repack.
  Status LearnStep(std::unique_lock<std::mutex>& lock);
  // Lays the NVMe packs out in the most followed order (when it changed).
  Status RepackToTrace(std::unique_lock<std::mutex>& lock);
  void InvalidateTrace(std::unique_lock<std::mutex>& lock, uint64_t module);
  // True if `p` is used again within max_reuse_distance elements of the
  // followed order from slot `from`.
  bool ReusedSoon(const Param& p, uint64_t from) const;
  // Waits until nothing is requested, enqueued or read; all requested
  // params end AVAILABLE and read-ahead buffers are given back.
  Status Drain(std::unique_lock<std::mutex>& lock);
  // --- gathers ---
  void RequestGather(Param& p);                                  // needs mu_
  Status WaitAvailable(std::unique_lock<std::mutex>& lock, Param& p, uint64_t module);
  void ReleaseParam(Param& p);                                   // needs mu_
  // --- reads ---
  void IssueReads();                                             // needs mu_
  bool TryStartRead(Param& p);                                   // needs mu_
  // Gives back the swap buffers of one holder: unrequested read-ahead first,
  // else a request queued behind gather_queue_[queue_pos]. False if none.
  bool ReclaimOne(size_t queue_pos);                             // needs mu_
  void OnReadDone(uint64_t partition_id, const Status& status);  // I/O thread
  void OnCopyDone(uint32_t param_index);                         // copy stream
  // --- pipeline thread ---
  void PipelineLoop();
  bool HeadReady() const;                                        // needs mu_
  Status EnqueueGather(Param& p);                                // needs mu_
  // Queues the host functions that report p's copy/gather spans.
  Status TimelineSpans(const Param& p, std::chrono::steady_clock::time_point enqueued);
  // The next decision's event (step, seq, module, kind set); nullopt when
  // no sink listens. Needs mu_.
  std::optional<CoordEvent> NextEvent(EventKind kind, int64_t module);
  void Emit(EventKind kind, int64_t module, const std::vector<uint64_t>& params);  // needs mu_
  void EmitTrace(EventKind kind, int64_t module, uint32_t order, int64_t slot,
                 std::string note);                                             // needs mu_
  bool OnNvme(const Param& p) const;

  CoordinatorOptions options_;
  CoordinatorDeps deps_;
  uint32_t rank_ = 0, world_ = 1;
  bool finalized_ = false;

  mutable std::mutex mu_;
  std::condition_variable cv_;  // any pipeline progress
  std::vector<std::unique_ptr<Param>> params_;
  std::unordered_map<uint64_t, uint32_t> param_index_;
  std::vector<std::unique_ptr<Module>> modules_;
  std::unordered_map<uint64_t, uint32_t> module_index_;

  // Trace.
  TraceMode mode_ = TraceMode::kRecord;
  uint64_t step_id_ = 0;  // module fetches so far in this step
  uint64_t step_ = 0;     // ResetStep count
  TraceBook book_;
  std::vector<uint32_t> step_seq_;  // modules fetched in this step, in order
  // The order followed (in book_: valid until the next Learn; null when
  // none is) and the slot expected next.
  const TraceBook::Order* follow_ = nullptr;
  size_t pos_ = 0;
  bool aligned_ = true;         // step_seq_[k] ran at slot k so far (no resync)
  bool step_deviated_ = false;  // switched, re-synchronised or off the trace
  bool lost_reported_ = false;  // a trace_off event was logged this step
  int64_t substituted_ = -1;    // slot an unknown module took at the last fetch
  std::vector<uint32_t> slot_module_;   // per slot: predicted (or seen) module
  std::vector<SlotSource> slot_source_;
  std::vector<int64_t> matched_;        // per slot: module that ran there, or -1
  std::vector<int64_t> hinted_;         // per slot: module a hint put there, or -1
  std::vector<uint64_t> module_prefix_;  // elements of slots [0, k)
  std::vector<QueueEntry> param_order_;  // params in slot order
  size_t queue_head_ = 0;   // param_order_[queue_head_..] is left to prefetch
  size_t read_cursor_ = 0;  // param_order_ entries below were read-ahead candidates
  std::vector<uint64_t> param_prefix_;   // elements of param_order_[0, k)
  uint64_t packed_for_ = 0;  // hash of the pack groups last laid out

  // Pipeline.
  std::deque<uint32_t> gather_queue_;  // requested, not yet enqueued, in order
  std::deque<uint32_t> ongoing_;       // enqueued gathers, oldest first
  uint64_t live_numel_ = 0;            // full params INFLIGHT or AVAILABLE
  uint32_t reads_in_flight_ = 0;
  // Partition reads/writes running without mu_ (Read/WritePartition[s]):
  // while > 0, no read-ahead starts.
  uint32_t partition_io_ = 0;
  Status async_error_;                 // a failed read, reported by Fetch
  bool stop_ = false;
  std::thread pipeline_;
  tiering::StreamHandle copy_stream_, coll_stream_;

  uint64_t seq_ = 0;
  CoordinatorStats stats_;
  uint64_t persistent_numel_ = 0;
};

}  // namespace ztier::coordinator
