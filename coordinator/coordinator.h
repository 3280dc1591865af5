// Coordinator: the trace-driven engine behind the module hooks. One per rank.
//
// A recorded module trace drives one pipeline per parameter, in trace order:
//
//   NVMe partition --read--> swap buffer --H2D (copy stream)--> device partition
//     --all-gather (collective stream)--> full parameter on device
//
// Each stage starts as soon as its input is ready and its resource is free
// (swap buffers, live-parameter budget, fetch-event throttle). The rules are
// DeepSpeed ZeRO-3's (docs/design.md "Coordinator rules"): trace RECORD / COMPLETE
// / INVALID, demand fetch, prefetch bucket, max live parameters, max reuse
// distance, persistence, fetch-event throttle. Where ztier does better (the
// device prefetch does not stop at a parameter still on NVMe; reads run ahead
// as far as buffers allow; a swap buffer goes back as soon as its copy is
// done) docs/impl.md says so.
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
#include <span>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "base/status.h"
#include "coordinator/collective.h"
#include "coordinator/event_log.h"
#include "coordinator/timeline_sink.h"
#include "coordinator/trace_file.h"
#include "swapper/param_swapper.h"
#include "tiering/device.h"

namespace ztier::coordinator {

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
  uint64_t trace_invalidations = 0;
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
    uint32_t param;    // index into params_
    uint64_t step_id;  // fetch index (module position) at which it is used
  };
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

  // --- trace ---
  void RecordFetch(uint32_t module_index);  // needs mu_
  void InvalidateTrace(std::unique_lock<std::mutex>& lock, uint64_t module);
  void BuildParamQueue();                   // needs mu_
  // True if `p` is used again within max_reuse_distance elements of the
  // module trace from position `from`.
  bool ReusedSoon(const Param& p, uint64_t from) const;  // needs mu_
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
  void Emit(EventKind kind, int64_t module, const std::vector<uint64_t>& params);  // needs mu_
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
  std::vector<uint32_t> module_order_;   // recorded module sequence
  std::vector<uint64_t> module_prefix_;  // elements of modules [0, k) of it
  std::vector<QueueEntry> param_order_;  // params in trace order, with step ids
  size_t queue_head_ = 0;   // param_order_[queue_head_..] is left to prefetch
  size_t read_cursor_ = 0;  // param_order_ entries below were read-ahead candidates
  std::vector<uint64_t> param_prefix_;   // elements of param_order_[0, k)

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
