#include "coordinator/runtime.h"

#include <unistd.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "base/log.h"

namespace ztier::coordinator {

CoordinatorOptions RankRuntime::CoordinatorOptionsFrom(const tiering::Config& c) {
  CoordinatorOptions o;
  o.max_live_parameters = c.tiers.device.max_live_parameters;
  o.prefetch_bucket_size = c.coordinator.prefetch_bucket_size;
  o.max_reuse_distance = c.coordinator.max_reuse_distance;
  o.param_persistence_threshold = c.coordinator.param_persistence_threshold;
  o.model_persistence_threshold = c.coordinator.model_persistence_threshold;
  o.max_ongoing_fetch_events = c.coordinator.max_ongoing_fetch_events;
  o.nvme_lookahead = c.coordinator.nvme_lookahead.value_or(0);
  o.trace_policy = c.coordinator.trace_policy;
  o.trace_orders = c.coordinator.trace_orders;
  return o;
}

RankRuntime::~RankRuntime() {
  optimizer_.reset();
  optimizer_engine_.reset();
  coordinator_.reset();
  swapper_.reset();
  engine_.reset();
  pool_.reset();
  collective_.reset();
  device_.reset();
}

namespace {

bool UsesGlooStore(const RuntimeOptions& o) {
  return !o.gloo.store_path.empty() || (o.gloo.store.set && o.gloo.store.get);
}

Result<std::unique_ptr<Collective>> MakeGlooCollective(const RuntimeOptions& o,
                                                       tiering::DeviceBackend* device) {
  if (!UsesGlooStore(o)) {
    return Status::InvalidArgument(fmt::format(
        "world size {} with the gloo collective needs a store through which the ranks "
        "find each other (a directory every rank sees, or store callbacks)",
        o.world_size));
  }
  GlooOptions g = o.gloo;
  g.rank = o.rank;
  g.world_size = o.world_size;
  g.timeout = std::chrono::seconds(o.config.comm.timeout);
  return CreateGlooCollective(g, device);
}

Result<std::unique_ptr<tiering::DeviceBackend>> MakeDevice(const RuntimeOptions& o) {
  // Ranks over host memory: local (threads) and gloo (processes).
  const auto backend = o.config.comm.backend;
  const bool local = backend == tiering::CommBackend::kLocal ||
                     backend == tiering::CommBackend::kGloo ||
                     (backend == tiering::CommBackend::kAuto && o.world_size > 1 &&
                      (o.local_group != nullptr || UsesGlooStore(o)));
  DeviceKind kind = o.device;
  if (kind == DeviceKind::kAuto) {
    std::string why;
    kind = (!local && tiering::CudaDeviceAvailable(&why)) ? DeviceKind::kCuda : DeviceKind::kHost;
    if (kind == DeviceKind::kHost) {
      Log(LogLevel::kDebug, "device: host emulation ({})",
          local ? "ranks over host memory" : why);
    }
  }
  if (kind == DeviceKind::kCuda) return tiering::CreateCudaDeviceBackend(o.cuda_device);
  // Freed blocks kept for reuse: at most a quarter of the live window's
  // bytes (what can be gathered at once), so the emulated device's memory is
  // bounded by the config, not by the model's size, and a model smaller
  // than window + cache does not look cheaper than one that fills them.
  tiering::HostDeviceOptions ho;
  const tiering::Config& c = o.config;
  const uint64_t window = c.tiers.device.max_live_parameters;
  const uint64_t eb = std::max<uint64_t>(c.tiers.nvme.buffer_element_bytes, 1);
  if (window != tiering::kInfinite && window / 4 <= ho.cache_bytes / eb) {
    ho.cache_bytes = window / 4 * eb;
  }
  return tiering::CreateHostDeviceBackend(ho);
}

Result<std::unique_ptr<Collective>> MakeCollective(const RuntimeOptions& o,
                                                   tiering::DeviceBackend* device) {
  if (o.nccl_comm != nullptr) {
    // The trainer's communicator decides rank and world size: check them.
    ZTIER_ASSIGN_OR_RETURN(auto c, WrapNcclCommunicator(o.nccl_comm, device));
    if (c->rank() != o.rank || c->world_size() != o.world_size) {
      return Status::InvalidArgument(fmt::format(
          "the ncclComm_t is rank {} of {}, but rank {} of {} was asked for", c->rank(),
          c->world_size(), o.rank, o.world_size));
    }
    return c;
  }
  if (o.world_size == 1) return CreateSelfCollective(device);
  const bool cuda = device->name() == "cuda";
  const auto backend = o.config.comm.backend;
  if (backend == tiering::CommBackend::kNccl || (backend == tiering::CommBackend::kAuto && cuda)) {
    if (o.nccl_unique_id.empty()) {
      return Status::InvalidArgument(
          "comm backend nccl needs rank 0's ncclUniqueId (pass it to every rank)");
    }
    return CreateNcclCollective(o.nccl_unique_id.data(), o.nccl_unique_id.size(), o.rank,
                                o.world_size, device);
  }
  if (backend == tiering::CommBackend::kGloo ||
      (backend == tiering::CommBackend::kAuto && o.local_group == nullptr && UsesGlooStore(o))) {
    return MakeGlooCollective(o, device);
  }
  if (o.local_group == nullptr) {
    return Status::InvalidArgument(fmt::format(
        "world size {} with the local collective needs a LocalGroup shared by the ranks "
        "(ranks in separate processes: comm.backend gloo, with a store)",
        o.world_size));
  }
  return o.local_group->Join(o.rank, device);
}

}  // namespace

Result<std::unique_ptr<RankRuntime>> RankRuntime::Create(const RuntimeOptions& options) {
  std::unique_ptr<RankRuntime> rt(new RankRuntime());
  rt->options_ = options;
  const tiering::Config& c = options.config;
  CoordinatorDeps deps;
  deps.events = options.events;
  deps.timeline = options.timeline;
  CoordinatorOptions co = CoordinatorOptionsFrom(c);
  co.null_io = options.null_io;
  if (!options.null_io) {
    ZTIER_ASSIGN_OR_RETURN(rt->device_, MakeDevice(options));
    ZTIER_ASSIGN_OR_RETURN(rt->collective_, MakeCollective(options, rt->device_.get()));
    deps.device = rt->device_.get();
    deps.collective = rt->collective_.get();
  }
  if (!options.null_io && c.tiers.params == tiering::ParamTier::kNvme) {
    tiering::PoolOptions po;
    po.buffer_count = c.tiers.nvme.buffer_count;
    const uint64_t elements = options.buffer_elements_override ? options.buffer_elements_override
                                                               : c.tiers.nvme.buffer_size;
    po.buffer_bytes = elements * c.tiers.nvme.buffer_element_bytes;
    po.alignment = 4096;
    po.pin = c.tiers.host.pin_memory ? tiering::PinMode::kAuto : tiering::PinMode::kNone;
    po.allow_unpinned = c.tiers.host.allow_unpinned;
    ZTIER_ASSIGN_OR_RETURN(rt->pool_, tiering::PinnedPool::Create(po, rt->device_.get()));

    io::BackendOptions bo;
    bo.queue_depth = c.io.queue_depth;
    bo.sqpoll = c.io.sqpoll;
    ZTIER_ASSIGN_OR_RETURN(auto backend, io::CreateBackend(c.io.backend, bo));
    rt->backend_name_ = std::string(backend->name());
    io::EngineOptions eo;
    eo.block_size = c.io.block_size;
    eo.queue_depth = c.io.queue_depth;
    ZTIER_ASSIGN_OR_RETURN(auto engine, io::Engine::Create(std::move(backend), eo));
    ZTIER_ASSIGN_OR_RETURN(rt->engine_, io::AsyncEngine::Create(std::move(engine)));
    if (c.io.register_buffers) {
      const auto regions = rt->pool_->IoRegions();
      Status s = rt->engine_->RegisterBuffers(regions);
      if (!s.ok()) Log(LogLevel::kWarning, "{} (continuing without fixed buffers)", s.ToString());
    }
    swapper::SwapperOptions so;
    so.store.paths = c.tiers.nvme.paths;
    so.store.rank = options.rank;
    so.store.world_size = options.world_size;
    so.store.stripe_bytes = c.io.block_size;
    so.store.direct = c.io.direct;
    so.checksum = c.integrity.checksum == tiering::Checksum::kCrc32c;
    ZTIER_ASSIGN_OR_RETURN(rt->swapper_,
                           swapper::ParamSwapper::Create(so, rt->pool_.get(), rt->engine_.get()));
    deps.swapper = rt->swapper_.get();
    deps.pool = rt->pool_.get();
  }
  ZTIER_ASSIGN_OR_RETURN(rt->coordinator_, Coordinator::Create(co, deps));
  return rt;
}

std::string RankRuntime::Describe() const {
  std::string s = fmt::format("rank {}/{}", options_.rank, options_.world_size);
  if (device_) s += fmt::format(", device {}", device_->description());
  if (collective_) s += fmt::format(", comm {}", collective_->name());
  if (pool_) {
    s += fmt::format(", swap buffers {} x {} bytes ({})", pool_->buffer_count(),
                     pool_->buffer_bytes(), pool_->stats().pin_method);
  }
  if (!backend_name_.empty()) s += fmt::format(", io {}", backend_name_);
  if (options_.null_io) s += ", null io";
  return s;
}

Result<swapper::OptimizerSwapperOptions> RankRuntime::OptimizerOptionsFrom(
    const tiering::Config& c, uint32_t rank, uint32_t world_size) {
  const tiering::OptimizerConfig& oc = c.optimizer;
  swapper::OptimizerSwapperOptions o;
  o.store.tag = "optimizer";
  o.store.rank = rank;
  o.store.world_size = world_size;
  o.store.stripe_bytes = c.io.block_size;
  if (oc.tier == tiering::OptimizerTier::kHost) {
    // Host memory through the memory filesystem: the same slots and
    // commit rule as on NVMe (two slots per sub-group), no drive.
    // Files named per process (two trainers on one host never meet) and
    // deleted with the store (they hold host memory).
    o.store.paths = {std::string(kHostOptimizerPath)};
    o.store.tag = fmt::format("optimizer-{}", getpid());
    o.store.direct = false;
    o.store.remove_on_close = true;
  } else {
    o.store.paths = tiering::OptimizerPaths(c);
    o.store.direct = c.io.direct;
    if (o.store.paths.empty()) {
      return Status::InvalidArgument(
          "optimizer.tier is nvme but no directory is configured: set optimizer.paths (or "
          "tiers.nvme.paths), or optimizer.tier: host");
    }
  }
  if (c.tiers.gradients == tiering::GradTier::kNvme) {
    o.grads_on_store = true;
    o.grad_store.tag = "grad";
    o.grad_store.rank = rank;
    o.grad_store.world_size = world_size;
    o.grad_store.stripe_bytes = c.io.block_size;
    o.grad_store.direct = c.io.direct;
    o.grad_store.paths = tiering::OptimizerPaths(c);
    if (o.grad_store.paths.empty()) {
      return Status::InvalidArgument(
          "tiers.gradients is nvme but no directory is configured: set optimizer.paths (or "
          "tiers.nvme.paths), or tiers.gradients: host");
    }
  }
  o.buffer_count = oc.buffer_count;
  o.sub_group_size = oc.sub_group_size;
  o.threads = oc.threads;
  switch (oc.isa) {
    case tiering::OptimizerIsa::kAuto: o.isa = optim::BestIsa(); break;
    case tiering::OptimizerIsa::kAvx512: o.isa = optim::Isa::kAvx512; break;
    case tiering::OptimizerIsa::kAvx2: o.isa = optim::Isa::kAvx2; break;
    case tiering::OptimizerIsa::kScalar: o.isa = optim::Isa::kScalar; break;
  }
  return o;
}

Status RankRuntime::CreateOptimizer(std::vector<swapper::OptimizerSegment> segments) {
  if (optimizer_ != nullptr) {
    return Status::FailedPrecondition("this engine already has an optimizer");
  }
  if (options_.null_io) {
    return Status::FailedPrecondition("the optimizer needs real I/O (not --null-io)");
  }
  const tiering::Config& c = options_.config;
  ZTIER_ASSIGN_OR_RETURN(auto so, OptimizerOptionsFrom(c, options_.rank, options_.world_size));
  // Its own I/O thread and queue: the parameter writes of the step go
  // through the parameter engine and never wait behind state transfers.
  io::BackendOptions bo;
  bo.queue_depth = c.io.queue_depth;
  bo.sqpoll = c.io.sqpoll;
  ZTIER_ASSIGN_OR_RETURN(auto backend, io::CreateBackend(c.io.backend, bo));
  io::EngineOptions eo;
  eo.block_size = c.io.block_size;
  eo.queue_depth = c.io.queue_depth;
  ZTIER_ASSIGN_OR_RETURN(auto engine, io::Engine::Create(std::move(backend), eo));
  ZTIER_ASSIGN_OR_RETURN(auto async, io::AsyncEngine::Create(std::move(engine)));
  ZTIER_ASSIGN_OR_RETURN(auto opt,
                         swapper::OptimizerSwapper::Create(so, std::move(segments), async.get()));
  Status s = opt->Initialize(
      [this](uint64_t id, void* out) { return coordinator_->ReadPartition(id, out); });
  if (!s.ok()) {
    opt.reset();  // before its engine
    return s;
  }
  optimizer_engine_ = std::move(async);
  optimizer_ = std::move(opt);
  Log(LogLevel::kInfo,
      "rank {}: optimizer state {} elements in {} sub-groups of <= {} elements, {} buffers of "
      "{:.1f} MiB, {} threads, {} update, at {}",
      options_.rank, optimizer_->total_elements(), optimizer_->sub_group_count(),
      so.sub_group_size, std::min<uint64_t>(so.buffer_count, optimizer_->sub_group_count()),
      optimizer_->slot_bytes() / 1048576.0, optimizer_->threads(),
      optim::IsaName(so.isa), fmt::join(so.store.paths, ", "));
  return Status::Ok();
}

Status RankRuntime::OptimizerStep(std::span<const optim::AdamHyper> hypers,
                                  const swapper::OptimizerSwapper::GradSource& grads) {
  if (optimizer_ == nullptr) {
    return Status::FailedPrecondition("no optimizer: create one first");
  }
  return optimizer_->Step(
      hypers, grads, [this](std::span<const uint64_t> ids, std::span<const void* const> data) {
        return coordinator_->WritePartitions(ids, data);
      });
}

}  // namespace ztier::coordinator
