#include "tiering/plan.h"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>

namespace ztier::tiering {

std::string_view StateTierName(StateTier t) {
  switch (t) {
    case StateTier::kDevice: return "device";
    case StateTier::kHost: return "host";
    case StateTier::kNvme: return "nvme";
  }
  return "?";
}

Result<StateTier> ParseStateTier(std::string_view name) {
  if (name == "device") return StateTier::kDevice;
  if (name == "host") return StateTier::kHost;
  if (name == "nvme") return StateTier::kNvme;
  return Status::InvalidArgument(
      fmt::format("'{}' is not a tier: use device, host or nvme", name));
}

uint64_t ModelStateBytesPerRank(uint64_t params, uint32_t world, bool fp32_gradients) {
  const uint64_t per_param = kFp16ParamBytes + kFp16GradBytes + kAdamStateBytes +
                             (fp32_gradients ? kFp32GradBytes : 0);
  return per_param * PartitionElements(params, std::max<uint32_t>(1, world));
}

namespace {

uint64_t RoundUp(uint64_t v, uint64_t m) { return m == 0 ? v : (v + m - 1) / m * m; }

}  // namespace

Result<Plan> MakePlan(const PlanInput& in) {
  const ModelNumbers& m = in.model;
  if (m.params == 0) return Status::InvalidArgument("the model has no parameters");
  if (in.world_size == 0) return Status::InvalidArgument("world size must be at least 1");
  const uint32_t w = in.world_size;
  const Config& c = in.config;
  const uint64_t elem = c.tiers.nvme.buffer_element_bytes;  // bytes per element
  const uint64_t part = PartitionElements(m.params, w);     // elements per rank
  const uint64_t grad_bytes = in.fp32_gradients ? kFp32GradBytes : kFp16GradBytes;
  const bool params_on_nvme = c.tiers.params == ParamTier::kNvme;

  Plan p;
  p.bytes_per_param = static_cast<double>(kFp16ParamBytes + kFp16GradBytes + kAdamStateBytes +
                                          (in.fp32_gradients ? kFp32GradBytes : 0));
  p.model_state_bytes = static_cast<uint64_t>(p.bytes_per_param) * m.params;
  p.largest_partition = PartitionElements(m.largest_param, w);

  // Device: the gathered working set, never whole partitions (ZeRO-3): the
  // module being computed plus the prefetch bucket and the persistent
  // parameters, as fp16, and the fp16 gradients of the largest module.
  const uint64_t gathered =
      std::min(m.params, std::min(c.tiers.device.max_live_parameters,
                                  m.largest_module + c.coordinator.prefetch_bucket_size) +
                             m.persistent_params);
  p.device.params = kFp16ParamBytes * gathered;
  p.device.gradients = kFp16GradBytes * m.largest_module;
  // Parameter partitions between uses.
  (params_on_nvme ? p.nvme : p.host).params += kFp16ParamBytes * part;
  if (params_on_nvme) {
    p.pinned_bytes = uint64_t{c.tiers.nvme.buffer_count} *
                     RoundUp(c.tiers.nvme.buffer_size * elem, 4096);
    p.host.buffers = p.pinned_bytes;
  }
  // Gradients (reduced and partitioned) live with the optimizer state.
  TierBytes& opt = in.optimizer_tier == StateTier::kDevice ? p.device
                   : in.optimizer_tier == StateTier::kHost ? p.host
                                                           : p.nvme;
  opt.optimizer += kAdamStateBytes * part;
  opt.gradients += grad_bytes * part;

  // Fits?
  auto check = [&](const char* tier, uint64_t need, uint64_t have, const char* flag) {
    if (have != 0 && need > have) {
      p.fits = false;
      p.problems.push_back(fmt::format("{} needs {} per rank but has {} ({})", tier,
                                       HumanBytes(need), HumanBytes(have), flag));
    }
  };
  check("device", p.device.total(), in.device_capacity, "--device-memory");
  check("host", p.host.total(), in.host_capacity, "--host-memory");
  check("nvme", p.nvme.total(), in.nvme_capacity, "--nvme-capacity");
  // A partition larger than one buffer takes several adjacent ones (the
  // swapper's rule); it cannot run only when it needs more than the pool.
  const uint64_t config_buffer_bytes = RoundUp(c.tiers.nvme.buffer_size * elem, 4096);
  const uint64_t buffers_needed =
      (RoundUp(p.largest_partition * elem, 4096) + config_buffer_bytes - 1) /
      config_buffer_bytes;
  if (params_on_nvme && buffers_needed > c.tiers.nvme.buffer_count) {
    p.fits = false;
    p.problems.push_back(fmt::format(
        "the largest partition ({} elements) needs {} swap buffers of {} elements but "
        "tiers.nvme.buffer_count is {}: raise buffer_count to {} or buffer_size to at least {}",
        p.largest_partition, buffers_needed, FormatElementCount(c.tiers.nvme.buffer_size),
        c.tiers.nvme.buffer_count, buffers_needed, FormatElementCount(p.largest_partition)));
  }

  // Recommendations.
  PlanRecommendation& r = p.recommend;
  const uint64_t block_elems = std::max<uint64_t>(1, c.io.block_size / elem);
  r.buffer_size = RoundUp(std::max<uint64_t>(1, p.largest_partition), block_elems);
  r.reasons.push_back(fmt::format(
      "buffer_size {}: the largest partition ({} elements) rounded up to whole {} I/O blocks",
      FormatElementCount(r.buffer_size), p.largest_partition, HumanBytes(c.io.block_size)));
  // Reads in flight must cover the drive's queue (queue_depth x block_size
  // bytes); one more buffer is being copied to the device and one filled.
  const uint64_t buffer_bytes = r.buffer_size * elem;
  const uint64_t queue_bytes = uint64_t{c.io.queue_depth} * c.io.block_size;
  const uint64_t for_queue = (queue_bytes + buffer_bytes - 1) / buffer_bytes;
  r.buffer_count = static_cast<uint32_t>(std::clamp<uint64_t>(for_queue + 2, 5, 4096));
  r.reasons.push_back(fmt::format(
      "buffer_count {}: reads in flight cover the drive queue (queue_depth {} x block_size "
      "{} = {}) plus one buffer copying and one filling; {} pinned",
      r.buffer_count, c.io.queue_depth, HumanBytes(c.io.block_size), HumanBytes(queue_bytes),
      HumanBytes(uint64_t{r.buffer_count} * buffer_bytes)));
  r.prefetch_bucket_size = std::max(c.coordinator.prefetch_bucket_size, 2 * m.largest_module);
  r.reasons.push_back(fmt::format(
      "prefetch_bucket_size {}: at least two of the largest module ({} elements) so the "
      "next module is gathered while one computes",
      FormatElementCount(r.prefetch_bucket_size), m.largest_module));
  r.max_live_parameters = std::max(c.tiers.device.max_live_parameters,
                                   m.largest_module + r.prefetch_bucket_size);
  r.reasons.push_back(fmt::format(
      "max_live_parameters {}: the module in use plus the prefetch bucket",
      FormatElementCount(r.max_live_parameters)));

  // Traffic of one step, all ranks: parameters are read for the forward and
  // again for the backward pass (persistent ones stay gathered).
  const uint64_t swapped = m.params > m.persistent_params ? m.params - m.persistent_params : 0;
  if (params_on_nvme) p.param_read_bytes = 2 * kFp16ParamBytes * swapped;
  p.nvme_read_bytes = p.param_read_bytes;
  if (in.optimizer_tier == StateTier::kNvme) {
    // The optimizer reads its state and the gradients, writes the state and
    // the updated fp16 parameters back; the gradients were written first.
    p.nvme_read_bytes += (kAdamStateBytes + grad_bytes) * m.params;
    p.nvme_write_bytes += (grad_bytes + kAdamStateBytes) * m.params;
    if (params_on_nvme) p.nvme_write_bytes += kFp16ParamBytes * m.params;
  }
  p.pcie_bytes_per_rank = 2 * kFp16ParamBytes * part;  // partitions up, twice
  if (in.optimizer_tier != StateTier::kDevice) p.pcie_bytes_per_rank += kFp16GradBytes * part;
  auto secs = [](double bytes, double bw) { return bw > 0 ? bytes / bw : 0.0; };
  p.param_io_seconds = secs(static_cast<double>(p.param_read_bytes), in.nvme_read_bw);
  p.io_seconds = secs(static_cast<double>(p.nvme_read_bytes), in.nvme_read_bw) +
                 secs(static_cast<double>(p.nvme_write_bytes),
                      in.nvme_write_bw > 0 ? in.nvme_write_bw : in.nvme_read_bw);
  p.pcie_seconds = secs(static_cast<double>(p.pcie_bytes_per_rank), in.pcie_bw);
  p.compute_seconds = in.tflops > 0 ? m.flops_per_step / (in.tflops * 1e12) : 0;
  p.step_seconds = std::max({p.io_seconds, p.pcie_seconds, p.compute_seconds});
  return p;
}

}  // namespace ztier::tiering
