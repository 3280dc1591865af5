// Memory planner: how many bytes one rank needs on each tier (device, host,
// NVMe) to train a model with ZeRO-3 style partitioning under a ztier
// config, whether that fits, the swap-buffer and prefetch settings that keep
// the drive busy, and the step time the bandwidths allow.
//
// Model-state figures use the ZeRO paper's mixed-precision Adam accounting
// (Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion
// Parameter Models", section 3.1: 2 bytes/param fp16 parameters, 2 bytes
// fp16 gradients, K = 12 bytes fp32 master weights, momentum and variance),
// the figures DeepSpeed's ZeRO-3 estimator starts from. With
// `fp32_gradients` a 4-byte fp32 gradient copy is added (20 bytes/param), the
// accounting of the ZeRO-Infinity paper's memory table.
//
// The planner knows nothing of traces or model files: callers pass the
// model as plain numbers (ModelNumbers). Pure functions; thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/status.h"
#include "tiering/config.h"

namespace ztier::tiering {

// Bytes per parameter of each model state (mixed-precision Adam).
inline constexpr uint64_t kFp16ParamBytes = 2;
inline constexpr uint64_t kFp16GradBytes = 2;
inline constexpr uint64_t kAdamStateBytes = 12;  // fp32 master, momentum, variance
inline constexpr uint64_t kFp32GradBytes = 4;    // only with fp32_gradients

struct ModelNumbers {
  std::string name;
  uint64_t params = 0;           // elements of all parameters
  uint64_t largest_param = 0;    // elements of the largest parameter
  uint64_t largest_module = 0;   // elements of the parameters one module uses
  uint64_t param_tensors = 0;    // number of parameter tensors
  uint64_t persistent_params = 0;  // elements kept gathered (persistence threshold)
  double flops_per_step = 0;     // forward + backward FLOPs of one rank's step
};

enum class StateTier : uint8_t { kDevice = 0, kHost, kNvme };
std::string_view StateTierName(StateTier t);  // "device", "host", "nvme"
Result<StateTier> ParseStateTier(std::string_view name);

struct PlanInput {
  ModelNumbers model;
  uint32_t world_size = 1;
  Config config;
  // Where the optimizer state (fp32 master, momentum, variance) and the
  // gradients live; parameters follow config.tiers.params.
  StateTier optimizer_tier = StateTier::kNvme;
  bool fp32_gradients = false;
  // Capacities per rank for the fits verdict (bytes); 0: not checked.
  uint64_t device_capacity = 0;
  uint64_t host_capacity = 0;
  uint64_t nvme_capacity = 0;
  // Bandwidths for the step-time prediction (bytes/s), shared by all ranks of
  // the node for NVMe, per rank for PCIe; 0: that term is left out.
  double nvme_read_bw = 0;
  double nvme_write_bw = 0;
  double pcie_bw = 0;
  double tflops = 0;  // per rank, for the compute term; 0: left out
};

// One row of the per-tier table, bytes per rank.
struct TierBytes {
  uint64_t params = 0;      // fp16 parameter partitions (+ gathered params on device)
  uint64_t gradients = 0;
  uint64_t optimizer = 0;   // fp32 master weights, momentum, variance
  uint64_t buffers = 0;     // swap buffers (host, pinned) / working set (device)
  uint64_t total() const { return params + gradients + optimizer + buffers; }
};

struct PlanRecommendation {
  uint64_t buffer_size = 0;       // elements per swap buffer
  uint32_t buffer_count = 0;
  uint64_t prefetch_bucket_size = 0;  // elements
  uint64_t max_live_parameters = 0;   // elements
  std::vector<std::string> reasons;   // one line per setting: why
};

struct Plan {
  TierBytes device, host, nvme;
  uint64_t pinned_bytes = 0;          // swap buffers under the config
  uint64_t model_state_bytes = 0;     // all ranks, all states (bytes per model)
  double bytes_per_param = 0;         // model states
  uint64_t largest_partition = 0;     // elements of one rank's largest partition
  bool fits = true;
  std::vector<std::string> problems;  // why it does not fit / config issues
  PlanRecommendation recommend;
  // Per step, all ranks together (bytes) and the predicted time (seconds).
  uint64_t nvme_read_bytes = 0, nvme_write_bytes = 0;
  uint64_t param_read_bytes = 0;      // parameter swap-ins alone (bench step)
  uint64_t pcie_bytes_per_rank = 0;
  double io_seconds = 0, param_io_seconds = 0, pcie_seconds = 0, compute_seconds = 0;
  double step_seconds = 0;            // max of the terms
};

// ZeRO paper model-state bytes of `params` elements over `world` ranks:
// (2 + 2 + 12) x params / world, plus 4 x params / world with fp32 gradients.
uint64_t ModelStateBytesPerRank(uint64_t params, uint32_t world, bool fp32_gradients = false);

// Elements of one rank's partition of a `numel`-element parameter.
inline uint64_t PartitionElements(uint64_t numel, uint32_t world) {
  return world == 0 ? numel : (numel + world - 1) / world;
}

Result<Plan> MakePlan(const PlanInput& input);

}  // namespace ztier::tiering
