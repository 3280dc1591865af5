// RankRuntime: everything one rank of ztier runs on, assembled from a config:
// the device backend, the collective, the pinned swap-buffer pool, the I/O
// engine (on its own thread), the parameter swapper and the coordinator.
// `ztier replay`, `ztier bench step` and the C API build ranks through it, so
// the config means the same everywhere.
//
// Ownership: the runtime owns all of the above and destroys them in the
// right order (coordinator first). Thread-safety: as the coordinator.
#pragma once

#include <memory>
#include <span>
#include <string>

#include "base/status.h"
#include "coordinator/collective.h"
#include "coordinator/coordinator.h"
#include "io/async_engine.h"
#include "swapper/optimizer_swapper.h"
#include "swapper/param_swapper.h"
#include "tiering/config.h"
#include "tiering/device.h"
#include "tiering/pinned_pool.h"

namespace ztier::coordinator {

enum class DeviceKind : uint8_t { kAuto = 0, kHost, kCuda };

// Where optimizer.tier: host keeps the optimizer state (a memory filesystem).
inline constexpr std::string_view kHostOptimizerPath = "/dev/shm";

struct RuntimeOptions {
  tiering::Config config;
  uint32_t rank = 0;
  uint32_t world_size = 1;
  // world_size > 1 with the local collective: the group the ranks share.
  LocalGroup* local_group = nullptr;
  // world_size > 1 with NCCL: rank 0's ncclUniqueId (128 bytes), or an
  // existing ncclComm_t (not owned; it must outlive the runtime).
  std::vector<uint8_t> nccl_unique_id;
  void* nccl_comm = nullptr;
  // world_size > 1 with gloo (ranks as processes): how they find each other
  // (GlooOptions: a store directory, or store callbacks, and a key prefix).
  // Rank, world size and timeout come from the fields above and the config.
  GlooOptions gloo;
  // auto: CUDA when a device is present and the comm backend is not local.
  DeviceKind device = DeviceKind::kAuto;
  int cuda_device = 0;
  EventSink* events = nullptr;
  // Optional: stage spans of the coordinator's pipeline (bench step timeline).
  TimelineSink* timeline = nullptr;
  // Bookkeeping only: no device, no NVMe (replay --null-io).
  bool null_io = false;
  // Elements per swap buffer override (0: from config), for tests and scaled
  // benchmarks that must not pin the default 1e8-element buffers.
  uint64_t buffer_elements_override = 0;
};

class RankRuntime {
 public:
  static Result<std::unique_ptr<RankRuntime>> Create(const RuntimeOptions& options);
  ~RankRuntime();

  Coordinator& coordinator() { return *coordinator_; }
  tiering::DeviceBackend* device() { return device_.get(); }
  Collective* collective() { return collective_.get(); }
  tiering::PinnedPool* pool() { return pool_.get(); }
  swapper::ParamSwapper* swapper() { return swapper_.get(); }
  io::AsyncEngine* engine() { return engine_.get(); }
  const RuntimeOptions& options() const { return options_; }
  // One line: backend, device, pool shape, paths.
  std::string Describe() const;

  // ---- optimizer state (config.optimizer) ----
  // Builds this rank's optimizer-state swapper over `segments` (parameter
  // partitions, in the order their state is laid out) with its own I/O
  // engine, and writes the step-0 state from the current partitions
  // (Coordinator::ReadPartition). Once per runtime, after the parameters
  // have their data.
  Status CreateOptimizer(std::vector<swapper::OptimizerSegment> segments);
  swapper::OptimizerSwapper* optimizer() { return optimizer_.get(); }
  // One pipelined optimizer step: gradient partitions from `grads`, updated
  // parameter partitions written back with Coordinator::WritePartition;
  // `hypers[g]` for the segments of parameter group g.
  Status OptimizerStep(std::span<const optim::AdamHyper> hypers,
                       const swapper::OptimizerSwapper::GradSource& grads);
  Status OptimizerStep(const optim::AdamHyper& hyper,
                       const swapper::OptimizerSwapper::GradSource& grads) {
    return OptimizerStep(std::span<const optim::AdamHyper>(&hyper, 1), grads);
  }
  // The swapper options config.optimizer gives for this rank (the ISA
  // resolved: auto is the best this CPU has).
  static Result<swapper::OptimizerSwapperOptions> OptimizerOptionsFrom(
      const tiering::Config& c, uint32_t rank, uint32_t world_size);

  // Coordinator options from the config's coordinator and device sections.
  static CoordinatorOptions CoordinatorOptionsFrom(const tiering::Config& c);

 private:
  RankRuntime() = default;
  RuntimeOptions options_;
  std::unique_ptr<tiering::DeviceBackend> device_;
  std::unique_ptr<Collective> collective_;
  std::unique_ptr<tiering::PinnedPool> pool_;
  std::unique_ptr<io::AsyncEngine> engine_;
  std::unique_ptr<swapper::ParamSwapper> swapper_;
  std::unique_ptr<Coordinator> coordinator_;
  std::unique_ptr<io::AsyncEngine> optimizer_engine_;
  std::unique_ptr<swapper::OptimizerSwapper> optimizer_;
  std::string backend_name_;
};

}  // namespace ztier::coordinator
