#include "coordinator/coordinator.h"

#include <algorithm>
#include <atomic>
#include <cstring>

#include <fmt/format.h>

#include "base/log.h"

namespace ztier::coordinator {

using Clock = std::chrono::steady_clock;

namespace {
// A choice slot's module, when none is predicted.
constexpr uint32_t kNoModule = UINT32_MAX;
// Speculation guesses a choice slot's most frequent module only when it ran
// there in at least this share of the steps, and at least this many times (a
// module that ran in 2 of 3 steps is no evidence of a favourite: under
// uniform top-2-of-8 routing that happens often by chance).
constexpr double kSpeculateShare = 0.5;
constexpr uint64_t kSpeculateMinRuns = 4;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}
// 64-bit FNV-1a over a sequence of ids: what ranks compare, and what tells
// a pack layout already laid out from a new one.
struct Fnv1a {
  uint64_t h = 1469598103934665603ull;
  void Mix(uint64_t v) { h = (h ^ v) * 1099511628211ull; }
};
// Sorted-unique copy, for comparing sets of param indices.
std::vector<uint32_t> SortedUnique(std::vector<uint32_t> v) {
  std::sort(v.begin(), v.end());
  v.erase(std::unique(v.begin(), v.end()), v.end());
  return v;
}
}  // namespace

struct Coordinator::Param {
  uint64_t id = 0;
  uint32_t index = 0;
  std::string name;
  uint64_t numel = 0;        // elements of the full parameter
  DType dtype = DType::kFloat16;
  ParamTier tier = ParamTier::kNvme;
  bool persist_hint = false;
  bool persistent = false;
  uint64_t part_numel = 0;   // elements of this rank's partition
  uint64_t part_bytes = 0;   // bytes of this rank's partition
  uint64_t full_bytes = 0;   // world x part_bytes
  bool has_data = false;

  ParamStatus status = ParamStatus::kNotAvailable;
  ReadState read = ReadState::kNone;
  bool enqueued = false;      // gather (or copy) enqueued on the device
  bool gather_failed = false;
  void* full = nullptr;       // device: full parameter while INFLIGHT/AVAILABLE
  void* part_dev = nullptr;   // device: the partition (permanent for device tier)
  std::vector<uint8_t> host_part;  // host tier: the partition
  tiering::EventHandle copied, ready;
  std::vector<uint64_t> active;    // ids of active modules using it
  int64_t fetched_for = -1;        // slot of the followed order it was last fetched for
  // Last use counted in nvme_bytes_needed: step x 2 + (0 forward, 1 backward).
  uint64_t used_in_step = UINT64_MAX;
  std::vector<uint64_t> uses;      // slots of the followed order using it, ascending
  Clock::time_point read_started;  // for the timeline (deps_.timeline set)
};

struct Coordinator::Module {
  uint64_t id = 0;
  std::string name;
  std::vector<uint32_t> params;  // param indices, in registration order, unique
  uint64_t numel = 0;            // elements of its params
};

std::string_view TraceModeName(TraceMode m) {
  switch (m) {
    case TraceMode::kRecord: return "RECORD";
    case TraceMode::kComplete: return "COMPLETE";
    case TraceMode::kInvalid: return "INVALID";
  }
  return "?";
}

Coordinator::Coordinator(const CoordinatorOptions& options, const CoordinatorDeps& deps)
    : options_(options),
      deps_(deps),
      book_(options.trace_policy == TracePolicy::kSingle ? 1 : options.trace_orders,
            options.trace_policy != TracePolicy::kSingle) {
  if (deps.collective) {
    rank_ = deps.collective->rank();
    world_ = deps.collective->world_size();
  }
}

Result<std::unique_ptr<Coordinator>> Coordinator::Create(const CoordinatorOptions& options,
                                                         const CoordinatorDeps& deps) {
  if (!options.null_io && (deps.device == nullptr || deps.collective == nullptr)) {
    return Status::InvalidArgument(
        "the coordinator needs a device backend and a collective (or null_io)");
  }
  std::unique_ptr<Coordinator> c(new Coordinator(options, deps));
  if (deps.swapper && !options.null_io) {
    Coordinator* self = c.get();
    deps.swapper->SetReadCallback(
        [self](uint64_t id, const Status& s) { self->OnReadDone(id, s); });
  }
  return c;
}

Coordinator::~Coordinator() {
  std::unique_lock<std::mutex> lock(mu_);
  Status drained = Drain(lock);
  (void)drained;  // errors were reported by the calls that hit them
  stop_ = true;
  cv_.notify_all();
  lock.unlock();
  if (pipeline_.joinable()) pipeline_.join();
  if (deps_.swapper && !options_.null_io) {
    deps_.swapper->SetReadCallback(nullptr);
    (void)deps_.swapper->WaitAll();
  }
  if (options_.null_io || deps_.device == nullptr) return;
  (void)deps_.device->DeviceSynchronize();
  for (auto& p : params_) {
    if (p->read == ReadState::kInHost) (void)deps_.swapper->ReleaseBuffer(p->id, true);
    if (p->full && p->full != p->part_dev) (void)deps_.device->Free(p->full, {});
    if (p->part_dev) (void)deps_.device->Free(p->part_dev, {});
    if (p->copied) (void)deps_.device->DestroyEvent(p->copied);
    if (p->ready) (void)deps_.device->DestroyEvent(p->ready);
  }
  if (copy_stream_) (void)deps_.device->DestroyStream(copy_stream_);
  if (coll_stream_) (void)deps_.device->DestroyStream(coll_stream_);
}

// ---------------------------------------------------------------- set-up

Status Coordinator::RegisterParam(uint64_t id, uint64_t numel, DType dtype, ParamTier tier,
                                  bool persist, std::string name) {
  std::lock_guard<std::mutex> lock(mu_);
  if (finalized_) return Status::FailedPrecondition("register parameters before Finalize()");
  if (numel == 0) return Status::InvalidArgument(fmt::format("parameter {} has numel 0", id));
  if (param_index_.count(id)) {
    return Status::InvalidArgument(fmt::format("parameter {} is registered twice", id));
  }
  auto p = std::make_unique<Param>();
  p->id = id;
  p->index = static_cast<uint32_t>(params_.size());
  p->name = std::move(name);
  p->numel = numel;
  p->dtype = dtype;
  p->tier = tier;
  p->persist_hint = persist;
  p->part_numel = (numel + world_ - 1) / world_;
  p->part_bytes = p->part_numel * DTypeBytes(dtype);
  p->full_bytes = p->part_bytes * world_;
  if (tier == ParamTier::kNvme && !options_.null_io) {
    if (deps_.swapper == nullptr) {
      return Status::InvalidArgument(fmt::format(
          "parameter {} is on the nvme tier but no NVMe swapper is configured "
          "(tiers.nvme.paths)", id));
    }
    ZTIER_RETURN_IF_ERROR(deps_.swapper->Add(id, p->part_bytes));
  }
  param_index_[id] = p->index;
  params_.push_back(std::move(p));
  return Status::Ok();
}

Status Coordinator::RegisterModule(uint64_t id, std::string name, std::vector<uint64_t> params) {
  std::lock_guard<std::mutex> lock(mu_);
  if (module_index_.count(id)) {
    return Status::InvalidArgument(fmt::format("module {} is registered twice", id));
  }
  auto m = std::make_unique<Module>();
  m->id = id;
  m->name = std::move(name);
  for (uint64_t pid : params) {
    auto it = param_index_.find(pid);
    if (it == param_index_.end()) {
      return Status::NotFound(fmt::format("module {} ({}) names unknown parameter {}", id,
                                          m->name, pid));
    }
    if (std::find(m->params.begin(), m->params.end(), it->second) == m->params.end()) {
      m->params.push_back(it->second);
      m->numel += params_[it->second]->numel;
    }
  }
  module_index_[id] = static_cast<uint32_t>(modules_.size());
  modules_.push_back(std::move(m));
  return Status::Ok();
}

Status Coordinator::Finalize() {
  std::lock_guard<std::mutex> lock(mu_);
  if (finalized_) return Status::FailedPrecondition("Finalize() was already called");
  // Persistence in registration order, as the thresholds allow (elements).
  for (auto& p : params_) {
    const bool small = p->numel <= options_.param_persistence_threshold;
    if (p->persist_hint ||
        (small && persistent_numel_ + p->numel <= options_.model_persistence_threshold)) {
      p->persistent = true;
      persistent_numel_ += p->numel;
    }
  }
  if (!options_.null_io) {
    if (deps_.swapper) ZTIER_RETURN_IF_ERROR(deps_.swapper->Seal());
    tiering::DeviceBackend& d = *deps_.device;
    ZTIER_ASSIGN_OR_RETURN(copy_stream_, d.CreateStream());
    ZTIER_ASSIGN_OR_RETURN(coll_stream_, d.CreateStream());
    for (auto& p : params_) {
      ZTIER_ASSIGN_OR_RETURN(p->copied, d.CreateEvent());
      ZTIER_ASSIGN_OR_RETURN(p->ready, d.CreateEvent());
    }
    pipeline_ = std::thread([this] { PipelineLoop(); });
  }
  finalized_ = true;
  return Status::Ok();
}

Status Coordinator::SetParamData(uint64_t id, const void* full_host_data) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!finalized_) return Status::FailedPrecondition("call Finalize() before SetParamData()");
  ZTIER_ASSIGN_OR_RETURN(Param * p, FindParam(id));
  if (p->status != ParamStatus::kNotAvailable || p->read != ReadState::kNone) {
    return Status::FailedPrecondition(fmt::format(
        "parameter {} is in use; set its data while it is released", id));
  }
  p->has_data = true;
  if (options_.null_io) return Status::Ok();
  // This rank's slice of the flattened parameter, zero-padded to part_bytes.
  const uint64_t esize = DTypeBytes(p->dtype);
  const uint64_t begin = std::min<uint64_t>(uint64_t{rank_} * p->part_numel, p->numel);
  const uint64_t end = std::min<uint64_t>(begin + p->part_numel, p->numel);
  std::vector<uint8_t> slice(p->part_bytes, 0);
  if (end > begin) {
    memcpy(slice.data(), static_cast<const uint8_t*>(full_host_data) + begin * esize,
           (end - begin) * esize);
  }
  switch (p->tier) {
    case ParamTier::kNvme:
      lock.unlock();
      return deps_.swapper->Write(id, slice.data());
    case ParamTier::kHost:
      p->host_part = std::move(slice);
      return Status::Ok();
    case ParamTier::kDevice: {
      tiering::DeviceBackend& d = *deps_.device;
      if (p->part_dev == nullptr) {
        ZTIER_ASSIGN_OR_RETURN(p->part_dev, d.Alloc(p->part_bytes, {}));
      }
      ZTIER_RETURN_IF_ERROR(d.MemcpyH2DAsync(p->part_dev, slice.data(), p->part_bytes,
                                             copy_stream_));
      return d.StreamSynchronize(copy_stream_);
    }
  }
  return Status::Internal("unknown tier");
}

Result<Coordinator::Param*> Coordinator::FindParam(uint64_t id) {
  auto it = param_index_.find(id);
  if (it == param_index_.end()) {
    return Status::NotFound(fmt::format("parameter {} is not registered", id));
  }
  return params_[it->second].get();
}

Result<Coordinator::Module*> Coordinator::FindModule(uint64_t id) {
  auto it = module_index_.find(id);
  if (it == module_index_.end()) {
    return Status::NotFound(fmt::format("module {} is not registered", id));
  }
  return modules_[it->second].get();
}

bool Coordinator::OnNvme(const Param& p) const {
  return p.tier == ParamTier::kNvme && !options_.null_io;
}

std::optional<CoordEvent> Coordinator::NextEvent(EventKind kind, int64_t module) {
  const uint64_t seq = seq_++;  // numbered whether or not a sink listens
  if (deps_.events == nullptr) return std::nullopt;
  CoordEvent e;
  e.step = step_;
  e.seq = seq;
  e.module = module;
  e.kind = kind;
  return e;
}

void Coordinator::Emit(EventKind kind, int64_t module, const std::vector<uint64_t>& ids) {
  std::optional<CoordEvent> e = NextEvent(kind, module);
  if (!e) return;
  e->params = ids;
  for (uint64_t id : ids) e->numel += params_[param_index_.at(id)]->numel;
  deps_.events->OnEvent(*e);
}

// ---------------------------------------------------------------- hooks

Status Coordinator::Fetch(uint64_t module, bool forward) {
  // The gather rules are the same for both passes; `forward` only tells
  // nvme_bytes_needed which use this is.
  std::unique_lock<std::mutex> lock(mu_);
  if (!finalized_) return Status::FailedPrecondition("call Finalize() before the first fetch");
  if (!async_error_.ok()) {
    Status e = async_error_;
    async_error_ = Status::Ok();
    return e.WithContext(fmt::format("fetch of module {}", module));
  }
  ZTIER_ASSIGN_OR_RETURN(Module * m, FindModule(module));
  const uint32_t mi = module_index_.at(module);
  ++stats_.fetch_calls;
  for (uint32_t pi : m->params) {
    Param& p = *params_[pi];
    if (!p.has_data) {
      return Status::FailedPrecondition(fmt::format(
          "parameter {} of module {} has no data (call SetParamData first)", p.id, module));
    }
    p.active.push_back(module);
  }

  // Trace: place the fetch in the followed order (or record it).
  std::vector<uint32_t> wasted;  // params a wrong guess gathered
  FollowFetch(lock, mi, module, &wasted);

  // Demand fetch: gathers for the module's params not yet requested.
  std::vector<uint64_t> demand;
  const uint64_t use = step_ * 2 + (forward ? 0 : 1);  // this pass of this step
  for (uint32_t pi : m->params) {
    Param& p = *params_[pi];
    ++stats_.params_fetched;
    if (p.used_in_step != use) {
      p.used_in_step = use;
      const bool kept = p.persistent && p.status == ParamStatus::kAvailable;
      if (p.tier == ParamTier::kNvme && !kept) stats_.nvme_bytes_needed += p.part_bytes;
    }
    if (p.status != ParamStatus::kNotAvailable) {
      ++stats_.prefetch_hits;
      continue;
    }
    RequestGather(p);
    demand.push_back(p.id);
  }
  if (!demand.empty()) {
    ++stats_.fetch_calls_with_demand;
    stats_.demand_gathers += demand.size();
    Emit(EventKind::kFetch, static_cast<int64_t>(module), demand);
    IssueReads();
    cv_.notify_all();
  }

  // Wait for the module's params.
  for (uint32_t pi : m->params) {
    Status s = WaitAvailable(lock, *params_[pi], module);
    if (!s.ok()) return s.WithContext(fmt::format("fetch of module {} ({})", module, m->name));
  }
  // A wrong guess: what it gathered goes, after the demand gathers queued
  // behind it (a gather cannot be taken back once issued).
  if (!wasted.empty()) ReleaseUnneeded(lock, static_cast<int64_t>(module), &wasted, true);
  Prefetch(static_cast<int64_t>(module));
  ++step_id_;
  return Status::Ok();
}

Status Coordinator::Release(uint64_t module, bool backward) {
  (void)backward;
  std::unique_lock<std::mutex> lock(mu_);
  ZTIER_ASSIGN_OR_RETURN(Module * m, FindModule(module));
  bool was_active = false;
  for (uint32_t pi : m->params) {
    auto& act = params_[pi]->active;
    auto it = std::find(act.begin(), act.end(), module);
    if (it != act.end()) {
      act.erase(it);
      was_active = true;
    }
  }
  if (!was_active && !m->params.empty()) {
    return Status::FailedPrecondition(fmt::format(
        "release of module {} ({}) without a matching fetch", module, m->name));
  }
  std::vector<uint64_t> released;
  for (uint32_t pi : m->params) {
    Param& p = *params_[pi];
    if (p.persistent || p.status != ParamStatus::kAvailable || !p.active.empty()) continue;
    if (mode_ == TraceMode::kComplete && follow_ != nullptr) {
      // Prefetched for a later use, or used again soon: keep it.
      if (p.fetched_for > static_cast<int64_t>(pos_)) continue;
      if (ReusedSoon(p, pos_)) continue;
    }
    ReleaseParam(p);
    released.push_back(p.id);
  }
  if (!released.empty()) Emit(EventKind::kRelease, static_cast<int64_t>(module), released);
  return Status::Ok();
}

bool Coordinator::ReusedSoon(const Param& p, uint64_t from) const {
  // First use of p at slot >= from; kept if the elements of the slots
  // before it (from `from`) are below max_reuse_distance.
  auto it = std::lower_bound(p.uses.begin(), p.uses.end(), from);
  if (it == p.uses.end()) return false;
  return module_prefix_[*it] - module_prefix_[from] < options_.max_reuse_distance;
}

Status Coordinator::ResetStep() {
  std::unique_lock<std::mutex> lock(mu_);
  ZTIER_RETURN_IF_ERROR(Drain(lock));
  Status result;
  if (options_.trace_policy == TracePolicy::kSingle) {
    if (mode_ == TraceMode::kRecord) {
      result = LearnStep(lock);
      if (result.ok() && book_.size() > 0) {
        mode_ = TraceMode::kComplete;
        Emit(EventKind::kTraceComplete, -1, {});
      }
    } else if (mode_ == TraceMode::kInvalid) {
      mode_ = TraceMode::kRecord;  // DeepSpeed's rule: the next step records
    }
  } else {
    result = LearnStep(lock);
    if (mode_ == TraceMode::kRecord && book_.size() > 0) {
      mode_ = TraceMode::kComplete;
      Emit(EventKind::kTraceComplete, -1, {});
    }
  }
  // What a step that ended differently from its prediction left gathered.
  std::vector<uint64_t> released;
  for (auto& p : params_) {
    if (p->status == ParamStatus::kAvailable && !p->persistent && p->active.empty()) {
      ReleaseParam(*p);
      released.push_back(p->id);
    }
  }
  if (!released.empty()) Emit(EventKind::kRelease, -1, released);
  step_id_ = 0;
  ++step_;
  ++stats_.steps;
  for (auto& p : params_) p->fetched_for = -1;
  step_seq_.clear();
  substituted_ = -1;
  aligned_ = true;
  step_deviated_ = false;
  lost_reported_ = false;
  follow_ = nullptr;
  if (mode_ == TraceMode::kComplete) {
    if (const TraceBook::Order* o = book_.MostRecent()) {
      Follow(o, 0);
      EmitTrace(EventKind::kTraceFollow, -1, o->id, 0, {});
    }
  }
  return result;
}

Status Coordinator::ReleaseAll(bool persistent) {
  std::unique_lock<std::mutex> lock(mu_);
  ZTIER_RETURN_IF_ERROR(Drain(lock));
  std::vector<uint64_t> released;
  for (auto& p : params_) {
    p->active.clear();
    if (p->status == ParamStatus::kAvailable && (persistent || !p->persistent)) {
      ReleaseParam(*p);
      released.push_back(p->id);
    }
  }
  if (!released.empty()) Emit(EventKind::kRelease, -1, released);
  return Status::Ok();
}

Result<void*> Coordinator::ParamData(uint64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  ZTIER_ASSIGN_OR_RETURN(Param * p, FindParam(id));
  if (p->status != ParamStatus::kAvailable) {
    return Status::FailedPrecondition(fmt::format(
        "parameter {} is {}: its device data exists only while AVAILABLE (between "
        "the fetch and the release of a module that uses it)",
        id, p->status == ParamStatus::kInflight ? "INFLIGHT" : "NOT_AVAILABLE"));
  }
  return p->full;
}

ParamStatus Coordinator::param_status(uint64_t id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = param_index_.find(id);
  return it == param_index_.end() ? ParamStatus::kNotAvailable : params_[it->second]->status;
}

TraceMode Coordinator::trace_mode() const {
  std::lock_guard<std::mutex> lock(mu_);
  return mode_;
}

uint64_t Coordinator::step_id() const {
  std::lock_guard<std::mutex> lock(mu_);
  return step_id_;
}

uint64_t Coordinator::partition_numel(uint64_t id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = param_index_.find(id);
  return it == param_index_.end() ? 0 : params_[it->second]->part_numel;
}

// ---------------------------------------------------------------- optimizer access

Status Coordinator::ReduceScatterGradient(uint64_t id, const void* full_grad,
                                          void* part_grad_host) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!finalized_) return Status::FailedPrecondition("call Finalize() before gradients");
  ZTIER_ASSIGN_OR_RETURN(Param * p, FindParam(id));
  if (full_grad == nullptr || part_grad_host == nullptr) {
    return Status::InvalidArgument(fmt::format("gradient of parameter {}: null buffer", id));
  }
  if (options_.null_io) return Status::Unavailable("gradients need a device (null io)");
  tiering::DeviceBackend& d = *deps_.device;
  const uint64_t grad_bytes = p->numel * DTypeBytes(p->dtype);
  if (world_ == 1) {
    // One rank: the mean over ranks is the gradient itself and the
    // partition is all of it. No collective to order: copy it straight out.
    lock.unlock();
    return CopyGradientOut(*p, full_grad, part_grad_host, grad_bytes);
  }
  // Every gather requested so far is enqueued before this collective: the
  // ranks request the same gathers, so they number this one alike.
  cv_.wait(lock, [&] { return gather_queue_.empty() || stop_; });
  ZTIER_ASSIGN_OR_RETURN(void* full, d.Alloc(p->full_bytes, coll_stream_));
  auto part = d.Alloc(p->part_bytes, coll_stream_);
  if (!part.ok()) {
    (void)d.Free(full, coll_stream_);
    return part.status();
  }
  auto ev = d.CreateEvent();
  Status s = ev.status();
  if (s.ok()) {
    // On the host emulation the trainer's "device" gradient is host memory
    // that the emulation did not allocate: copy it in as host memory.
    s = d.name() == "host" ? d.MemcpyH2DAsync(full, full_grad, grad_bytes, coll_stream_)
                           : d.MemcpyD2DAsync(full, full_grad, grad_bytes, coll_stream_);
  }
  if (s.ok() && p->full_bytes > grad_bytes) {
    s = d.MemsetAsync(static_cast<uint8_t*>(full) + grad_bytes, 0, p->full_bytes - grad_bytes,
                      coll_stream_);
  }
  if (s.ok()) {
    s = deps_.collective->ReduceScatterMean(full, *part, p->part_numel, p->dtype, coll_stream_);
  }
  if (s.ok()) s = d.MemcpyD2HAsync(part_grad_host, *part, p->part_bytes, coll_stream_);
  (void)d.Free(full, coll_stream_);
  (void)d.Free(*part, coll_stream_);
  if (!ev.ok()) return s.WithContext(fmt::format("gradient of parameter {}", id));
  if (s.ok()) s = d.RecordEvent(*ev, coll_stream_);
  lock.unlock();
  // Waits outside the lock: copy-stream callbacks ahead of it take mu_.
  if (s.ok()) {
    s = d.EventSynchronize(*ev);
    if (s.ok() && deps_.collective) s = deps_.collective->Health();
  } else {
    (void)d.StreamSynchronize(coll_stream_);  // what was enqueued ends first
  }
  (void)d.DestroyEvent(*ev);
  if (!s.ok()) return s.WithContext(fmt::format("gradient of parameter {}", id));
  return Status::Ok();
}

Result<std::vector<uint64_t>> Coordinator::ExchangeHost(uint64_t value) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!finalized_) return Status::FailedPrecondition("call Finalize() before ExchangeHost()");
  if (options_.null_io || deps_.collective == nullptr || world_ == 1) {
    return std::vector<uint64_t>{value};
  }
  // Every gather requested so far goes first, in the same order on every rank.
  ZTIER_RETURN_IF_ERROR(Drain(lock));
  lock.unlock();
  return deps_.collective->AllGatherHost(value);
}

Status Coordinator::CopyGradientOut(const Param& p, const void* full_grad,
                                    void* part_grad_host, uint64_t grad_bytes) {
  tiering::DeviceBackend& d = *deps_.device;
  auto* out = static_cast<uint8_t*>(part_grad_host);
  if (d.name() == "host") {
    // The trainer's "device" gradient is host memory the emulation did not
    // allocate: a plain copy.
    memcpy(out, full_grad, grad_bytes);
  } else {
    Status s = d.MemcpyD2HAsync(out, full_grad, grad_bytes, coll_stream_);
    if (s.ok()) s = d.StreamSynchronize(coll_stream_);
    if (!s.ok()) return s.WithContext(fmt::format("gradient of parameter {}", p.id));
  }
  if (p.part_bytes > grad_bytes) memset(out + grad_bytes, 0, p.part_bytes - grad_bytes);
  return Status::Ok();
}

Status Coordinator::CheckNoneActive(std::string_view what) const {
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& p : params_) {
    if (!p->active.empty()) {
      return Status::FailedPrecondition(fmt::format(
          "parameter {} is in use by module {}: release every module before {}", p->id,
          p->active.front(), what));
    }
  }
  return Status::Ok();
}

Status Coordinator::ReadPartition(uint64_t id, void* out_host) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!finalized_) return Status::FailedPrecondition("call Finalize() before ReadPartition()");
  ZTIER_ASSIGN_OR_RETURN(Param * p, FindParam(id));
  if (out_host == nullptr) {
    return Status::InvalidArgument(fmt::format("partition of parameter {}: null buffer", id));
  }
  if (!p->has_data) {
    return Status::FailedPrecondition(fmt::format("parameter {} has no data yet", id));
  }
  if (!p->active.empty()) {
    return Status::FailedPrecondition(fmt::format(
        "parameter {} is in use by module {}; read its partition after the release", id,
        p->active.front()));
  }
  if (options_.null_io) return Status::Unavailable("partitions need a device (null io)");
  // A prefetch in flight (for a use that may not come) finishes first.
  if (p->status == ParamStatus::kInflight) ZTIER_RETURN_IF_ERROR(Drain(lock));
  switch (p->tier) {
    case ParamTier::kHost:
      memcpy(out_host, p->host_part.data(), p->part_bytes);
      return Status::Ok();
    case ParamTier::kDevice: {
      tiering::DeviceBackend& d = *deps_.device;
      ZTIER_RETURN_IF_ERROR(d.MemcpyD2HAsync(out_host, p->part_dev, p->part_bytes, copy_stream_));
      lock.unlock();
      return d.StreamSynchronize(copy_stream_);
    }
    case ParamTier::kNvme: break;
  }
  // Read-ahead holds swap buffers the read below may need: give them back.
  ZTIER_RETURN_IF_ERROR(Drain(lock));
  if (p->read != ReadState::kNone) {
    return Status::Internal(fmt::format("parameter {} holds a swap buffer after a drain", id));
  }
  // Nothing is in flight now, and no read-ahead may start until the read
  // below is done (it would share this partition's extent and buffer).
  // Afterwards read-ahead resumes at the next fetch, not here: an optimizer
  // reading partition after partition would otherwise read the window ahead
  // again after each one, only for the next drain to discard it.
  ++partition_io_;
  lock.unlock();
  Status s = ReadPartitionUnlocked(*p, out_host);
  lock.lock();
  if (--partition_io_ == 0 && !gather_queue_.empty()) IssueReads();
  return s;
}

Status Coordinator::ReadPartitionUnlocked(const Param& p, void* out_host) {
  // A private read: no hold on the partition's (possibly shared) extent, so
  // the swap-in path's holds and states are left exactly as they are.
  Status s = deps_.swapper->Read(p.id, out_host);
  if (!s.ok()) return s.WithContext(fmt::format("partition of parameter {}", p.id));
  return Status::Ok();
}

Status Coordinator::WritePartition(uint64_t id, const void* in_host) {
  const uint64_t ids[1] = {id};
  const void* const srcs[1] = {in_host};
  return WritePartitions(ids, srcs);
}

Status Coordinator::WritePartitions(std::span<const uint64_t> ids,
                                    std::span<const void* const> srcs) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!finalized_) return Status::FailedPrecondition("call Finalize() before WritePartition()");
  if (ids.size() != srcs.size()) {
    return Status::InvalidArgument(
        fmt::format("WritePartitions: {} ids but {} buffers", ids.size(), srcs.size()));
  }
  // NVMe partitions go to the swapper together, after the checks.
  std::vector<uint64_t> nvme_ids;
  std::vector<const void*> nvme_srcs;
  std::vector<Param*> nvme_params;
  for (size_t k = 0; k < ids.size(); ++k) {
    const uint64_t id = ids[k];
    ZTIER_ASSIGN_OR_RETURN(Param * p, FindParam(id));
    if (srcs[k] == nullptr) {
      return Status::InvalidArgument(fmt::format("partition of parameter {}: null buffer", id));
    }
    if (!p->active.empty()) {
      return Status::FailedPrecondition(fmt::format(
          "parameter {} is in use by module {}; write its partition after the release", id,
          p->active.front()));
    }
    if (options_.null_io) {
      p->has_data = true;
      continue;
    }
    // A prefetch in flight finishes first (then it is freed below); on NVMe
    // read-ahead also gives its buffers back, so the partition is ON_NVME.
    if (OnNvme(*p) || p->status == ParamStatus::kInflight) ZTIER_RETURN_IF_ERROR(Drain(lock));
    if (p->status == ParamStatus::kAvailable) {
      // The full parameter holds the old values: free it, the next fetch gathers.
      ReleaseParam(*p);
      Emit(EventKind::kRelease, -1, {p->id});
    }
    const auto* src = static_cast<const uint8_t*>(srcs[k]);
    switch (p->tier) {
      case ParamTier::kHost:
        p->host_part.assign(src, src + p->part_bytes);
        p->has_data = true;
        continue;
      case ParamTier::kDevice: {
        tiering::DeviceBackend& d = *deps_.device;
        if (p->part_dev == nullptr) {
          ZTIER_ASSIGN_OR_RETURN(p->part_dev, d.Alloc(p->part_bytes, {}));
        }
        ZTIER_RETURN_IF_ERROR(d.MemcpyH2DAsync(p->part_dev, src, p->part_bytes, copy_stream_));
        ZTIER_RETURN_IF_ERROR(d.StreamSynchronize(copy_stream_));
        p->has_data = true;
        continue;
      }
      case ParamTier::kNvme: break;
    }
    if (p->read != ReadState::kNone) {
      return Status::Internal(fmt::format("parameter {} holds a swap buffer after a drain", id));
    }
    nvme_ids.push_back(id);
    nvme_srcs.push_back(src);
    nvme_params.push_back(p);
  }
  if (nvme_ids.empty()) return Status::Ok();
  // Everything in flight has drained; no read-ahead may start while the
  // swapper writes (a read of a packed extent would take it from under the
  // write).
  ZTIER_RETURN_IF_ERROR(Drain(lock));
  ++partition_io_;
  lock.unlock();
  Status s = deps_.swapper->WriteMany(nvme_ids, nvme_srcs);
  lock.lock();
  if (--partition_io_ == 0 && !gather_queue_.empty()) IssueReads();
  ZTIER_RETURN_IF_ERROR(s);
  for (Param* p : nvme_params) p->has_data = true;
  return Status::Ok();
}

Status Coordinator::PendingAsyncError() const {
  std::lock_guard<std::mutex> lock(mu_);
  return async_error_;
}

CoordinatorStats Coordinator::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  CoordinatorStats s = stats_;
  s.live_numel = live_numel_;
  s.trace_orders = book_.size();
  if (deps_.pool) s.peak_swap_buffers = deps_.pool->stats().high_water_buffers;
  return s;
}

// ---------------------------------------------------------------- trace

void Coordinator::EmitTrace(EventKind kind, int64_t module, uint32_t order, int64_t slot,
                            std::string note) {
  std::optional<CoordEvent> e = NextEvent(kind, module);
  if (!e) return;
  e->order = order;
  e->slot = slot;
  e->note = std::move(note);
  deps_.events->OnEvent(*e);
}

void Coordinator::FollowFetch(std::unique_lock<std::mutex>& lock, uint32_t mi,
                              uint64_t module, std::vector<uint32_t>* wasted) {
  step_seq_.push_back(mi);
  if (mode_ != TraceMode::kComplete || follow_ == nullptr) return;
  const std::vector<TraceBook::Slot>& slots = follow_->slots;
  const int64_t substituted = substituted_;
  substituted_ = -1;
  if (pos_ < slots.size() && TraceBook::Accepts(slots[pos_], mi)) {
    MatchSlot(pos_, mi, wasted);
    return;
  }
  // The module before this one was unknown and took this module's slot:
  // it was an insertion, not a substitution. The slot is this module's.
  if (substituted >= 0 && TraceBook::Accepts(slots[static_cast<size_t>(substituted)], mi)) {
    MatchSlot(static_cast<size_t>(substituted), mi, wasted);
    return;
  }
  if (options_.trace_policy == TracePolicy::kSingle) {
    InvalidateTrace(lock, module);
    return;
  }
  step_deviated_ = true;
  // 1. Another known order that ran exactly this step so far: its slots
  //    line up with the fetches, so it takes over where this one left off.
  if (aligned_) {
    if (const TraceBook::Order* o = FindSwitch()) {
      ++stats_.trace_switches;
      const size_t at = step_seq_.size() - 1;
      Follow(o, at);
      EmitTrace(EventKind::kTraceSwitch, static_cast<int64_t>(module), o->id,
                static_cast<int64_t>(at), {});
      ReleaseUnneeded(lock, static_cast<int64_t>(module), nullptr, false);
      MatchSlot(at, mi, wasted);
      return;
    }
  }
  // 2. Re-synchronise at the next slot that accepts it. At a choice slot a
  //    module never seen there (a new expert) takes the slot, unless a
  //    fixed slot ahead names it (the choice was skipped).
  const TraceBook::Order* order = nullptr;
  size_t at = 0;
  const bool found = FindResync(mi, &order, &at);
  const bool at_choice = pos_ < slots.size() && slots[pos_].choice();
  if (at_choice && (!found || order != follow_ || order->slots[at].choice())) {
    MatchSlot(pos_, mi, wasted);
    return;
  }
  if (found) {
    ++stats_.trace_resyncs;
    aligned_ = false;
    if (order != follow_) {
      Follow(order, at);
    } else {
      pos_ = at;
    }
    EmitTrace(EventKind::kTraceResync, static_cast<int64_t>(module), order->id,
              static_cast<int64_t>(at), {});
    MatchSlot(at, mi, wasted);
    ReleaseUnneeded(lock, static_cast<int64_t>(module), nullptr, false);
    return;
  }
  // 3. No known order has a place for it: a demand fetch. It takes the
  //    expected slot (a module replaced by another keeps the positions
  //    after it in line); if the next module claims that slot back, it
  //    was an insertion instead (above).
  ++stats_.trace_off;
  if (!lost_reported_) {
    lost_reported_ = true;
    EmitTrace(EventKind::kTraceOff, static_cast<int64_t>(module), follow_->id,
              static_cast<int64_t>(pos_), {});
  }
  if (pos_ < slots.size()) {
    substituted_ = static_cast<int64_t>(pos_);
    MatchSlot(pos_, mi, wasted);
  }
}

void Coordinator::MatchSlot(size_t j, uint32_t mi, std::vector<uint32_t>* wasted) {
  const TraceBook::Slot& slot = follow_->slots[j];
  matched_[j] = mi;
  if (slot_module_[j] != mi) {
    // A wrong guess (nothing to undo when nothing was guessed).
    const uint32_t guessed = slot_module_[j];
    if (guessed != kNoModule) {
      if (slot_source_[j] == SlotSource::kSpeculation) ++stats_.speculation_misses;
      // The hint named the right modules in another order: the later slot
      // hinted with this one takes this slot's hint instead.
      if (hinted_[j] >= 0) {
        for (size_t k = j + 1; k < hinted_.size(); ++k) {
          if (hinted_[k] == static_cast<int64_t>(mi)) {
            hinted_[k] = hinted_[j];
            break;
          }
        }
      }
      AddWasted(guessed, mi, wasted);
    }
    RebuildFrom(j);
  } else if (slot.choice() && slot_source_[j] == SlotSource::kSpeculation) {
    ++stats_.speculation_hits;
  }
  pos_ = j + 1;
  while (queue_head_ < param_order_.size() && param_order_[queue_head_].slot <= j) {
    const QueueEntry& e = param_order_[queue_head_++];
    params_[e.param]->fetched_for = static_cast<int64_t>(e.slot);
  }
}

void Coordinator::AddWasted(uint32_t guessed, uint32_t actual,
                            std::vector<uint32_t>* wasted) const {
  const auto& real = modules_[actual]->params;
  for (uint32_t pi : modules_[guessed]->params) {
    if (std::find(real.begin(), real.end(), pi) == real.end()) wasted->push_back(pi);
  }
}

const TraceBook::Order* Coordinator::FindSwitch() const {
  const TraceBook::Order* best = nullptr;
  for (const TraceBook::Order& o : book_.orders()) {
    if (&o == follow_ || !TraceBook::AcceptsPrefix(o, step_seq_)) continue;
    if (best == nullptr || o.last_step > best->last_step) best = &o;
  }
  return best;
}

bool Coordinator::FindResync(uint32_t mi, const TraceBook::Order** order, size_t* slot) const {
  // The followed order first, forward from the expected slot.
  for (size_t k = pos_ + 1; k < follow_->slots.size(); ++k) {
    if (TraceBook::Accepts(follow_->slots[k], mi)) {
      *order = follow_;
      *slot = k;
      return true;
    }
  }
  // Else the slot of another order nearest to this step's position.
  const size_t here = step_seq_.size() - 1;
  bool found = false;
  size_t best_dist = SIZE_MAX;
  for (const TraceBook::Order& o : book_.orders()) {
    if (&o == follow_) continue;
    for (size_t k = 0; k < o.slots.size(); ++k) {
      if (!TraceBook::Accepts(o.slots[k], mi)) continue;
      const size_t dist = k > here ? k - here : here - k;
      if (dist < best_dist) {
        best_dist = dist;
        *order = &o;
        *slot = k;
        found = true;
      }
    }
  }
  return found;
}

void Coordinator::Follow(const TraceBook::Order* order, size_t slot) {
  follow_ = order;
  const size_t n = order->slots.size();
  slot_module_.assign(n, 0);
  slot_source_.assign(n, SlotSource::kFixed);
  matched_.assign(n, -1);
  hinted_.assign(n, -1);
  // Slots before `slot` ran what this step ran there when positions line
  // up (a switch), so mirrors of them are known.
  if (aligned_) {
    for (size_t k = 0; k < std::min(slot, step_seq_.size()); ++k) matched_[k] = step_seq_[k];
  }
  for (auto& p : params_) {
    p->uses.clear();
    p->fetched_for = -1;
  }
  param_order_.clear();
  param_prefix_.assign(1, 0);
  module_prefix_.assign(1, 0);
  queue_head_ = read_cursor_ = 0;
  RebuildFrom(0);
  pos_ = slot;
  while (queue_head_ < param_order_.size() && param_order_[queue_head_].slot < slot) {
    ++queue_head_;
  }
  read_cursor_ = queue_head_;
}

void Coordinator::RebuildFrom(size_t s) {
  const std::vector<TraceBook::Slot>& slots = follow_->slots;
  // Entries of slots >= s go, with their uses.
  const size_t first = static_cast<size_t>(
      std::lower_bound(param_order_.begin(), param_order_.end(), s,
                       [](const QueueEntry& e, size_t slot) { return e.slot < slot; }) -
      param_order_.begin());
  for (size_t e = first; e < param_order_.size(); ++e) {
    auto& uses = params_[param_order_[e].param]->uses;
    while (!uses.empty() && uses.back() >= s) uses.pop_back();
  }
  param_order_.resize(first);
  param_prefix_.resize(first + 1);
  module_prefix_.resize(std::min(s, module_prefix_.size() - 1) + 1);
  for (size_t k = s; k < slots.size(); ++k) {
    const TraceBook::Slot& sl = slots[k];
    uint32_t mi = sl.module;
    SlotSource src = SlotSource::kFixed;
    if (matched_[k] >= 0) {
      mi = static_cast<uint32_t>(matched_[k]);
      src = slot_source_[k];
    } else if (!sl.choice()) {
      // fixed
    } else if (sl.mirror >= 0 && matched_[sl.mirror] >= 0) {
      mi = static_cast<uint32_t>(matched_[sl.mirror]);
      src = SlotSource::kMirror;
    } else if (hinted_[k] >= 0) {
      mi = static_cast<uint32_t>(hinted_[k]);
      src = SlotSource::kHint;
    } else if (sl.mirror >= 0) {
      mi = slot_module_[sl.mirror];
      src = slot_source_[sl.mirror];
    } else {
      // Guess only a module that ran at least half the time here, over
      // enough steps: a wrong guess costs its reads, which an NVMe-bound
      // step pays in time.
      double share = 0;
      uint64_t runs = 0;
      mi = TraceBook::MostFrequent(sl, &share, &runs);
      src = SlotSource::kSpeculation;
      if (share < kSpeculateShare || runs < kSpeculateMinRuns) {
        mi = kNoModule;
        src = SlotSource::kNone;
      }
    }
    slot_module_[k] = mi;
    slot_source_[k] = src;
    if (mi == kNoModule) {
      module_prefix_.push_back(module_prefix_.back());
      continue;
    }
    const Module& m = *modules_[mi];
    module_prefix_.push_back(module_prefix_.back() + m.numel);
    for (uint32_t pi : m.params) {
      param_order_.push_back({pi, k});
      param_prefix_.push_back(param_prefix_.back() + params_[pi]->numel);
      params_[pi]->uses.push_back(k);
    }
  }
  queue_head_ = std::min(queue_head_, first);
  read_cursor_ = std::min(read_cursor_, first);
}

void Coordinator::ReleaseUnneeded(std::unique_lock<std::mutex>& lock, int64_t module,
                                  const std::vector<uint32_t>* only, bool speculation) {
  std::vector<uint32_t> candidates;
  if (only != nullptr) {
    candidates = SortedUnique(*only);
  } else {
    for (auto& p : params_) candidates.push_back(p->index);
  }
  std::vector<uint64_t> released;
  for (uint32_t pi : candidates) {
    Param& p = *params_[pi];
    if (p.status == ParamStatus::kNotAvailable || p.persistent || !p.active.empty()) continue;
    if (std::lower_bound(p.uses.begin(), p.uses.end(), pos_) != p.uses.end()) continue;
    if (p.status == ParamStatus::kInflight && !options_.null_io) {
      // Not yet issued, one rank: take the request back (with more ranks
      // the others may have issued it already, so it runs and is freed).
      auto it = std::find(gather_queue_.begin(), gather_queue_.end(), p.index);
      if (world_ == 1 && !p.enqueued && it != gather_queue_.end() &&
          it != gather_queue_.begin()) {
        gather_queue_.erase(it);
        p.status = ParamStatus::kNotAvailable;
        live_numel_ -= p.numel;
        ++stats_.releases;
        released.push_back(p.id);
        continue;
      }
      Status s = WaitAvailable(lock, p, UINT64_MAX);
      if (!s.ok()) {
        if (async_error_.ok()) async_error_ = s;
        continue;
      }
      if (p.status != ParamStatus::kAvailable || !p.active.empty()) continue;
    }
    ReleaseParam(p);
    released.push_back(p.id);
  }
  if (released.empty()) return;
  if (speculation) stats_.speculation_wasted += released.size();
  Emit(speculation ? EventKind::kSpeculationWasted : EventKind::kRelease, module, released);
}

void Coordinator::Prefetch(int64_t module) {
  if (mode_ != TraceMode::kComplete || follow_ == nullptr) return;
  const uint64_t budget = options_.max_live_parameters > live_numel_
                              ? options_.max_live_parameters - live_numel_
                              : 0;
  const uint64_t limit = std::min(budget, options_.prefetch_bucket_size);
  uint64_t prefetching = 0;
  std::vector<uint64_t> ahead, hinted, guessed;
  while (queue_head_ < param_order_.size() && prefetching < limit) {
    const QueueEntry& e = param_order_[queue_head_];
    Param& p = *params_[e.param];
    // Unlike a plain bucket check, never go past max_live_parameters.
    if (p.status == ParamStatus::kNotAvailable &&
        live_numel_ + p.numel > options_.max_live_parameters) {
      break;
    }
    ++queue_head_;
    p.fetched_for = static_cast<int64_t>(e.slot);
    if (p.status != ParamStatus::kNotAvailable) continue;
    RequestGather(p);
    prefetching += p.numel;
    switch (slot_source_[e.slot]) {
      case SlotSource::kHint: hinted.push_back(p.id); break;
      case SlotSource::kSpeculation: guessed.push_back(p.id); break;
      default: ahead.push_back(p.id); break;
    }
  }
  stats_.prefetch_gathers += ahead.size() + hinted.size() + guessed.size();
  stats_.hint_gathers += hinted.size();
  stats_.speculative_gathers += guessed.size();
  if (!ahead.empty()) Emit(EventKind::kPrefetch, module, ahead);
  if (!hinted.empty()) Emit(EventKind::kHintPrefetch, module, hinted);
  if (!guessed.empty()) Emit(EventKind::kSpeculate, module, guessed);
  if (prefetching > 0) cv_.notify_all();
  IssueReads();
}

Status Coordinator::Hint(std::span<const uint64_t> modules) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!finalized_) return Status::FailedPrecondition("call Finalize() before Hint()");
  std::vector<uint32_t> named;
  for (uint64_t id : modules) {
    auto it = module_index_.find(id);
    if (it == module_index_.end()) {
      return Status::NotFound(fmt::format("hint names module {}, which is not registered", id));
    }
    named.push_back(it->second);
  }
  stats_.hints += named.size();
  if (mode_ != TraceMode::kComplete || follow_ == nullptr ||
      options_.trace_policy == TracePolicy::kSingle) {
    return Status::Ok();
  }
  // Each named module takes the next open choice slot that no earlier slot
  // decides (a mirror's module comes from its source).
  const std::vector<TraceBook::Slot>& slots = follow_->slots;
  size_t from = pos_, first = SIZE_MAX;
  std::vector<uint32_t> wasted;
  for (uint32_t mi : named) {
    size_t k = from;
    while (k < slots.size() && !(slots[k].choice() && slots[k].mirror < 0 && matched_[k] < 0 &&
                                  hinted_[k] < 0)) {
      ++k;
    }
    if (k == slots.size()) break;  // no choice ahead: nothing to place
    hinted_[k] = mi;
    from = k + 1;
    if (slot_module_[k] == mi) {
      slot_source_[k] = SlotSource::kHint;
      continue;
    }
    if (slot_module_[k] != kNoModule) AddWasted(slot_module_[k], mi, &wasted);
    first = std::min(first, k);
  }
  if (first != SIZE_MAX) RebuildFrom(first);
  if (!wasted.empty()) ReleaseUnneeded(lock, -1, &wasted, true);
  Prefetch(-1);
  return Status::Ok();
}

Status Coordinator::LearnStep(std::unique_lock<std::mutex>& lock) {
  if (step_seq_.empty()) return Status::Ok();
  if (follow_ != nullptr && !step_deviated_ && pos_ == follow_->slots.size() &&
      step_seq_.size() == pos_) {
    ++stats_.steps_on_order;
  }
  follow_ = nullptr;  // Learn may move or drop the followed order
  // Every rank must have run the same modules in the same order: checked
  // whenever a step teaches something new (the same on every rank then).
  const TraceBook::LearnResult r = book_.Learn(step_seq_, step_);
  EmitTrace(EventKind::kTraceLearned, -1, r.order_id, -1,
            r.created ? "new" : r.changed ? "merged" : "same");
  // A step that taught nothing new needs no exchange, but may have made
  // another order the most followed one: the repack below decides.
  if (r.changed && deps_.collective && world_ > 1 && !options_.null_io) {
    Fnv1a fnv;
    for (uint32_t mi : step_seq_) fnv.Mix(modules_[mi]->id);
    const uint64_t h = fnv.h;
    lock.unlock();
    auto all = deps_.collective->AllGatherHost(h);
    lock.lock();
    if (!all.ok()) return all.status();
    for (uint32_t r2 = 0; r2 < all->size(); ++r2) {
      if ((*all)[r2] != h) {
        book_.Clear();
        return Status::FailedPrecondition(fmt::format(
            "trace of rank {} differs from rank {}'s (module order hash {:#x} vs {:#x}): "
            "every rank must run the same modules in the same order",
            rank_, r2, h, (*all)[r2]));
      }
    }
  }
  return RepackToTrace(lock);
}

Status Coordinator::RepackToTrace(std::unique_lock<std::mutex>& lock) {
  if (options_.null_io || deps_.swapper == nullptr ||
      options_.trace_policy == TracePolicy::kSingle) {
    return Status::Ok();
  }
  const TraceBook::Order* o = book_.MostFollowed();
  if (o == nullptr) return Status::Ok();
  // Persistent params first (read once, then they stay: they must not
  // share packs with params read every step); then one group per fixed
  // slot, in order; then every other module alone (the candidates of
  // choice slots, modules not run yet): reading one expert never reads
  // another's bytes, and an expert seen later does not move the others.
  std::vector<swapper::PackGroup> groups;
  std::vector<bool> placed(params_.size(), false);
  Fnv1a layout;
  auto add = [&](const std::vector<uint32_t>& params, bool alone, bool persistent) {
    swapper::PackGroup g;
    g.alone = alone;
    for (uint32_t pi : params) {
      const Param& p = *params_[pi];
      if (placed[pi] || !OnNvme(p) || p.persistent != persistent) continue;
      placed[pi] = true;
      g.ids.push_back(p.id);
      layout.Mix(p.id);
    }
    if (g.ids.empty()) return;
    layout.Mix(alone ? 2 : 1);
    groups.push_back(std::move(g));
  };
  std::vector<uint32_t> persistent;
  for (const TraceBook::Slot& sl : o->slots) {
    for (uint32_t pi : modules_[sl.module]->params) persistent.push_back(pi);
  }
  for (const auto& p : params_) persistent.push_back(p->index);
  add(persistent, true, true);
  for (const TraceBook::Slot& sl : o->slots) {
    if (!sl.choice()) add(modules_[sl.module]->params, false, false);
  }
  for (const auto& m : modules_) add(m->params, true, false);
  if (layout.h == packed_for_) return Status::Ok();
  const uint64_t before = deps_.swapper->stats().repacks;
  ++partition_io_;  // no read-ahead while the packs move
  lock.unlock();
  // Completions the coordinator has seen may still be finishing in the
  // swapper; their errors were reported through the read callback.
  (void)deps_.swapper->WaitAll();
  Status s = deps_.swapper->Repack(groups);
  lock.lock();
  --partition_io_;
  if (s.code() == StatusCode::kFailedPrecondition) {
    // The swapper was not quiet (a partition held, a Read() beside the
    // hooks): the layout in force stays, and the next step end tries again.
    Log(LogLevel::kInfo, "packs keep their layout for now: {}", s.message());
    return Status::Ok();
  }
  if (!s.ok()) return s.WithContext("lay the NVMe packs out in trace order");
  packed_for_ = layout.h;  // laid out: not again until the order changes
  stats_.repacks += deps_.swapper->stats().repacks - before;
  return Status::Ok();
}

void Coordinator::InvalidateTrace(std::unique_lock<std::mutex>& lock, uint64_t module) {
  mode_ = TraceMode::kInvalid;
  ++stats_.trace_invalidations;
  Emit(EventKind::kTraceInvalidated, static_cast<int64_t>(module), {});
  // Stop prefetching, finish what is in flight (every rank issues the same
  // collectives), then free what was fetched for an order that did not come.
  follow_ = nullptr;
  Status drained = Drain(lock);
  if (!drained.ok() && async_error_.ok()) async_error_ = drained;
  std::vector<uint64_t> released;
  for (auto& p : params_) {
    if (p->status == ParamStatus::kAvailable && !p->persistent && p->active.empty()) {
      ReleaseParam(*p);
      released.push_back(p->id);
    }
  }
  if (!released.empty()) Emit(EventKind::kRelease, static_cast<int64_t>(module), released);
  book_.Clear();
  param_order_.clear();
  queue_head_ = read_cursor_ = 0;
}

Status Coordinator::Drain(std::unique_lock<std::mutex>& lock) {
  Status first;
  for (auto& p : params_) {
    if (p->status != ParamStatus::kInflight) continue;
    Status s = WaitAvailable(lock, *p, UINT64_MAX);
    if (first.ok() && !s.ok()) first = s;
  }
  // Read-ahead that no gather asked for: wait for it, give the buffers back.
  cv_.wait(lock, [&] { return reads_in_flight_ == 0; });
  if (!options_.null_io && deps_.swapper) {
    for (auto& p : params_) {
      if (p->read == ReadState::kInHost && p->status == ParamStatus::kNotAvailable) {
        (void)deps_.swapper->ReleaseBuffer(p->id, true);
        p->read = ReadState::kNone;
      }
    }
  }
  return first;
}

// ---------------------------------------------------------------- gathers

void Coordinator::RequestGather(Param& p) {
  p.status = ParamStatus::kInflight;
  p.gather_failed = false;
  live_numel_ += p.numel;
  stats_.peak_live_numel = std::max(stats_.peak_live_numel, live_numel_);
  if (options_.null_io) {
    p.enqueued = true;
    return;
  }
  p.enqueued = false;
  gather_queue_.push_back(p.index);
}

Status Coordinator::WaitAvailable(std::unique_lock<std::mutex>& lock, Param& p,
                                  uint64_t module) {
  if (p.status == ParamStatus::kAvailable) return Status::Ok();
  if (p.status == ParamStatus::kNotAvailable) {
    return Status::Internal(fmt::format("parameter {} was never requested", p.id));
  }
  if (options_.null_io) {
    p.status = ParamStatus::kAvailable;
    return Status::Ok();
  }
  bool blocked = !p.enqueued;
  if (!blocked) {
    auto done = deps_.device->EventQuery(p.ready);
    blocked = !done.ok() || !*done;
  }
  if (blocked && module != UINT64_MAX) {
    ++stats_.waits;
    Emit(EventKind::kWait, static_cast<int64_t>(module), {p.id});
  }
  const auto t0 = Clock::now();
  cv_.wait(lock, [&] { return p.enqueued || p.gather_failed || stop_; });
  const auto t1 = Clock::now();
  stats_.stall_nvme_s += Seconds(t0, t1);
  if (p.gather_failed || !p.enqueued) {
    if (p.gather_failed) {
      // Its queue entry may still wait for the pipeline thread: drop it now,
      // or a new request for the same parameter (a retry) would find the
      // stale entry first and gather it twice (one entry then never leaves
      // the queue). The pipeline only leaves a failed entry alone.
      auto it = std::find(gather_queue_.begin(), gather_queue_.end(), p.index);
      if (it != gather_queue_.end()) gather_queue_.erase(it);
    }
    p.status = ParamStatus::kNotAvailable;
    live_numel_ -= p.numel;
    Status e = async_error_.ok() ? Status::IoError("the pipeline stopped") : async_error_;
    async_error_ = Status::Ok();
    return e.WithContext(fmt::format("parameter {}", p.id));
  }
  tiering::EventHandle ready = p.ready;
  lock.unlock();
  Status s = deps_.device->EventSynchronize(ready);
  // The gather's event completes even when the collective failed.
  if (s.ok() && deps_.collective) s = deps_.collective->Health();
  lock.lock();
  stats_.stall_device_s += Seconds(t1, Clock::now());
  if (!s.ok()) return s.WithContext(fmt::format("gather of parameter {}", p.id));
  if (p.status == ParamStatus::kInflight) p.status = ParamStatus::kAvailable;
  return Status::Ok();
}

void Coordinator::ReleaseParam(Param& p) {
  if (!options_.null_io && p.full != nullptr && p.full != p.part_dev) {
    // Stream-ordered after the gather that filled it.
    (void)deps_.device->Free(p.full, world_ > 1 ? coll_stream_ : copy_stream_);
  }
  p.full = nullptr;
  p.enqueued = false;
  p.status = ParamStatus::kNotAvailable;
  live_numel_ -= p.numel;
  ++stats_.releases;
}

// ---------------------------------------------------------------- reads

void Coordinator::IssueReads() {
  if (options_.null_io || deps_.swapper == nullptr) return;
  if (partition_io_ > 0) return;  // a partition read/write owns the swapper now
  // 1. Requested gathers, in order. The first one without a read may take
  //    buffers from read-ahead and from requests queued behind it (they read
  //    again later), so the queue head can always make progress.
  for (size_t q = 0; q < gather_queue_.size(); ++q) {
    Param& p = *params_[gather_queue_[q]];
    if (!OnNvme(p) || p.read != ReadState::kNone) continue;
    bool started = TryStartRead(p);
    while (!started && ReclaimOne(q)) started = TryStartRead(p);
    if (!started) return;  // keep trace order
  }
  // 2. Read-ahead in trace order, while free buffers last, within the window.
  if (mode_ != TraceMode::kComplete || follow_ == nullptr) return;
  const uint64_t window = options_.nvme_lookahead ? options_.nvme_lookahead
                                                  : options_.max_live_parameters;
  read_cursor_ = std::max(read_cursor_, queue_head_);
  while (read_cursor_ < param_order_.size() &&
         param_prefix_[read_cursor_] - param_prefix_[queue_head_] < window) {
    Param& p = *params_[param_order_[read_cursor_].param];
    if (OnNvme(p) && p.status == ParamStatus::kNotAvailable && p.read == ReadState::kNone) {
      if (!TryStartRead(p)) return;
    }
    ++read_cursor_;
  }
}

bool Coordinator::TryStartRead(Param& p) {
  swapper::ParamSwapper& sw = *deps_.swapper;
  if (sw.BuffersNeeded(p.id) > sw.available_swap_in_buffers()) return false;
  const uint64_t id = p.id;
  swapper::PartitionState observed = swapper::PartitionState::kOnNvme;
  auto got = sw.SwapIn(std::span<const uint64_t>(&id, 1),
                       std::span<swapper::PartitionState>(&observed, 1));
  if (!got.ok()) {
    if (async_error_.ok()) async_error_ = got.status();
    if (p.status == ParamStatus::kInflight) p.gather_failed = true;
    cv_.notify_all();
    return false;
  }
  if (*got == 0) return false;  // free buffers, but no adjacent run of them
  ++stats_.nvme_reads;
  Emit(EventKind::kNvmeRead, -1, {p.id});
  if (deps_.timeline) p.read_started = Clock::now();
  // The state SwapIn saw, not sw.state(p.id) now: a read that completed
  // since would still have its callback to come, and that late callback
  // would be taken for the end of the next read of this parameter.
  if (observed == swapper::PartitionState::kInHost) {
    p.read = ReadState::kInHost;  // its pack was already in a buffer
    cv_.notify_all();
  } else {
    p.read = ReadState::kReading;
    ++reads_in_flight_;
  }
  return true;
}

bool Coordinator::ReclaimOne(size_t queue_pos) {
  swapper::ParamSwapper& sw = *deps_.swapper;
  auto give_back = [&](Param& p) {
    (void)sw.ReleaseBuffer(p.id, true);
    p.read = ReadState::kNone;
    ++stats_.nvme_read_reclaims;
    read_cursor_ = queue_head_;  // consider it for read-ahead again later
    return true;
  };
  // Read-ahead that no gather asked for, the furthest param first.
  for (size_t k = params_.size(); k-- > 0;) {
    Param& p = *params_[k];
    if (p.read == ReadState::kInHost && p.status == ParamStatus::kNotAvailable) {
      return give_back(p);
    }
  }
  // Requests queued behind `queue_pos`, the last first.
  for (size_t q = gather_queue_.size(); q-- > queue_pos + 1;) {
    Param& p = *params_[gather_queue_[q]];
    if (p.read == ReadState::kInHost) return give_back(p);
  }
  return false;
}

void Coordinator::OnReadDone(uint64_t partition_id, const Status& status) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = param_index_.find(partition_id);
  if (it == param_index_.end()) return;
  Param& p = *params_[it->second];
  if (p.read != ReadState::kReading) return;
  --reads_in_flight_;
  if (status.ok()) {
    p.read = ReadState::kInHost;
    if (deps_.timeline) {
      deps_.timeline->Span(rank_, TimelineStage::kNvmeRead, p.id, p.read_started, Clock::now());
    }
  } else {
    p.read = ReadState::kNone;
    if (async_error_.ok()) async_error_ = status;
    if (p.status == ParamStatus::kInflight) p.gather_failed = true;
  }
  IssueReads();
  cv_.notify_all();
}

void Coordinator::OnCopyDone(uint32_t param_index) {
  std::lock_guard<std::mutex> lock(mu_);
  Param& p = *params_[param_index];
  if (p.read == ReadState::kInHost) {
    // The device has its copy: the swap buffer goes back now, not at release.
    (void)deps_.swapper->ReleaseBuffer(p.id, true);
    p.read = ReadState::kNone;
    IssueReads();
  }
  cv_.notify_all();
}

// ---------------------------------------------------------------- pipeline

bool Coordinator::HeadReady() const {
  if (gather_queue_.empty()) return false;
  const Param& p = *params_[gather_queue_.front()];
  return !OnNvme(p) || p.read == ReadState::kInHost || p.gather_failed;
}

void Coordinator::PipelineLoop() {
  tiering::DeviceBackend& d = *deps_.device;
  std::unique_lock<std::mutex> lock(mu_);
  const size_t max_ongoing = std::max<uint32_t>(1, options_.max_ongoing_fetch_events);
  for (;;) {
    cv_.wait(lock, [&] { return stop_ || HeadReady(); });
    if (stop_ && !HeadReady()) return;
    // Retire finished gathers; throttle to max_ongoing_fetch_events.
    while (!ongoing_.empty()) {
      auto done = d.EventQuery(params_[ongoing_.front()]->ready);
      if (!done.ok() || !*done) break;
      ongoing_.pop_front();
    }
    if (ongoing_.size() >= max_ongoing) {
      tiering::EventHandle oldest = params_[ongoing_.front()]->ready;
      lock.unlock();
      (void)d.EventSynchronize(oldest);
      lock.lock();
      ongoing_.pop_front();
      continue;
    }
    Param& p = *params_[gather_queue_.front()];
    if (OnNvme(p) && !p.gather_failed) {
      // Check the partition's checksum outside the lock (it is the queue
      // head and holds its buffer: nothing else moves it meanwhile).
      lock.unlock();
      Status v = deps_.swapper->Verify(p.id);
      lock.lock();
      if (!v.ok()) {
        p.read = ReadState::kNone;  // the swapper dropped the buffer
        p.gather_failed = true;
        if (async_error_.ok()) async_error_ = v;
      }
    }
    gather_queue_.pop_front();
    if (p.gather_failed) {
      cv_.notify_all();
      continue;
    }
    Status s = EnqueueGather(p);
    if (!s.ok()) {
      p.gather_failed = true;
      if (async_error_.ok()) async_error_ = s;
    } else {
      ongoing_.push_back(p.index);
    }
    cv_.notify_all();
  }
}

Status Coordinator::EnqueueGather(Param& p) {
  tiering::DeviceBackend& d = *deps_.device;
  const auto enqueued_at = deps_.timeline ? Clock::now() : Clock::time_point();
  const void* src = nullptr;
  switch (p.tier) {
    case ParamTier::kNvme: {
      ZTIER_ASSIGN_OR_RETURN(uint8_t * host, deps_.swapper->Data(p.id));
      src = host;
      break;
    }
    case ParamTier::kHost: src = p.host_part.data(); break;
    case ParamTier::kDevice: src = nullptr; break;
  }
  if (world_ == 1) {
    if (p.tier == ParamTier::kDevice) {
      p.full = p.part_dev;
    } else {
      ZTIER_ASSIGN_OR_RETURN(p.full, d.Alloc(p.full_bytes, copy_stream_));
      ZTIER_RETURN_IF_ERROR(d.MemcpyH2DAsync(p.full, src, p.part_bytes, copy_stream_));
    }
    if (OnNvme(p)) {
      const uint32_t idx = p.index;
      ZTIER_RETURN_IF_ERROR(d.LaunchHostFunc(copy_stream_, [this, idx] { OnCopyDone(idx); }));
    }
    ZTIER_RETURN_IF_ERROR(d.RecordEvent(p.ready, copy_stream_));
  } else {
    void* part = p.part_dev;
    if (p.tier != ParamTier::kDevice) {
      ZTIER_ASSIGN_OR_RETURN(part, d.Alloc(p.part_bytes, copy_stream_));
      ZTIER_RETURN_IF_ERROR(d.MemcpyH2DAsync(part, src, p.part_bytes, copy_stream_));
      if (OnNvme(p)) {
        const uint32_t idx = p.index;
        ZTIER_RETURN_IF_ERROR(
            d.LaunchHostFunc(copy_stream_, [this, idx] { OnCopyDone(idx); }));
      }
    }
    ZTIER_RETURN_IF_ERROR(d.RecordEvent(p.copied, copy_stream_));
    ZTIER_RETURN_IF_ERROR(d.StreamWaitEvent(coll_stream_, p.copied));
    ZTIER_ASSIGN_OR_RETURN(p.full, d.Alloc(p.full_bytes, coll_stream_));
    ZTIER_RETURN_IF_ERROR(deps_.collective->AllGather(part, p.full, p.part_bytes, coll_stream_));
    if (p.tier != ParamTier::kDevice) ZTIER_RETURN_IF_ERROR(d.Free(part, coll_stream_));
    ZTIER_RETURN_IF_ERROR(d.RecordEvent(p.ready, coll_stream_));
  }
  if (deps_.timeline) ZTIER_RETURN_IF_ERROR(TimelineSpans(p, enqueued_at));
  p.enqueued = true;
  return Status::Ok();
}

Status Coordinator::TimelineSpans(const Param& p, Clock::time_point enqueued) {
  // Host functions queued behind the copy (and the gather) stamp the time
  // their stream reaches them: the copy and gather completion times.
  tiering::DeviceBackend& d = *deps_.device;
  TimelineSink* sink = deps_.timeline;
  const uint32_t rank = rank_;
  const uint64_t id = p.id;
  if (world_ == 1) {
    return d.LaunchHostFunc(copy_stream_, [sink, rank, id, enqueued] {
      sink->Span(rank, TimelineStage::kH2d, id, enqueued, Clock::now());
    });
  }
  auto copied = std::make_shared<std::atomic<int64_t>>(enqueued.time_since_epoch().count());
  if (p.tier != ParamTier::kDevice) {
    ZTIER_RETURN_IF_ERROR(d.LaunchHostFunc(copy_stream_, [sink, rank, id, enqueued, copied] {
      const auto now = Clock::now();
      copied->store(now.time_since_epoch().count());
      sink->Span(rank, TimelineStage::kH2d, id, enqueued, now);
    }));
  }
  return d.LaunchHostFunc(coll_stream_, [sink, rank, id, copied] {
    const Clock::time_point begin{Clock::duration(copied->load())};
    sink->Span(rank, TimelineStage::kCollective, id, begin, Clock::now());
  });
}

}  // namespace ztier::coordinator
