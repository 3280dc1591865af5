#include "tiering/plan.h"

#include <gtest/gtest.h>

namespace ztier::tiering {
namespace {

constexpr double kTiB = 1099511627776.0;  // bytes

PlanInput Input(uint64_t params, uint32_t world, StateTier optimizer) {
  PlanInput in;
  in.model.name = "test";
  in.model.params = params;
  in.model.largest_param = params / 100;
  in.model.largest_module = params / 50;
  in.world_size = world;
  in.optimizer_tier = optimizer;
  in.config.tiers.nvme.buffer_size = params;  // large enough: fits
  return in;
}

// ZeRO paper, section 3.1 (mixed-precision Adam): 2 bytes/param fp16
// parameters + 2 bytes fp16 gradients + K = 12 bytes fp32 master weights,
// momentum and variance = 16 bytes/param, divided over the ranks by ZeRO-3.
// Parameters and optimizer state offloaded to NVMe (ZeRO-Infinity): all 16
// bytes/param of a rank's partition are on NVMe.
TEST(PlanTest, ZeroThreeModelStatesOnNvme) {
  struct Case {
    uint64_t params;
    uint32_t world;
    uint64_t nvme_bytes_per_rank;
  };
  const Case cases[] = {
      {1'500'000'000, 1, 24'000'000'000},      // GPT-2 XL size: 16 x 1.5e9
      {7'000'000'000, 1, 112'000'000'000},     // 7B: 16 x 7e9
      {13'000'000'000, 1, 208'000'000'000},    // 13B: 16 x 13e9
      {70'000'000'000, 1, 1'120'000'000'000},  // 70B: 16 x 70e9
      {70'000'000'000, 8, 140'000'000'000},    // 70B over 8 ranks: 16 x 70e9 / 8
  };
  for (const Case& c : cases) {
    auto plan = MakePlan(Input(c.params, c.world, StateTier::kNvme));
    ASSERT_TRUE(plan.ok()) << plan.status().ToString();
    EXPECT_EQ(plan->nvme.total(), c.nvme_bytes_per_rank) << c.params << " / " << c.world;
    EXPECT_EQ(plan->nvme.params, 2 * c.params / c.world);
    EXPECT_EQ(plan->nvme.gradients, 2 * c.params / c.world);
    EXPECT_EQ(plan->nvme.optimizer, 12 * c.params / c.world);
    EXPECT_EQ(plan->model_state_bytes, 16 * c.params);
    EXPECT_EQ(ModelStateBytesPerRank(c.params, c.world), c.nvme_bytes_per_rank);
  }
}

// Optimizer (and gradients) on the host, parameters on NVMe (ZeRO-Offload
// of the optimizer plus ZeRO-Infinity parameter offload): 2 + 12 bytes/param
// of the partition on the host besides the swap buffers, 2 on NVMe.
TEST(PlanTest, OptimizerOnHost) {
  PlanInput in = Input(7'000'000'000, 1, StateTier::kHost);
  in.config.tiers.nvme.buffer_size = uint64_t{1} << 27;  // elements
  auto plan = MakePlan(in);
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->nvme.total(), 14'000'000'000u);
  EXPECT_EQ(plan->host.gradients + plan->host.optimizer, 98'000'000'000u);  // 14 x 7e9
  // 5 swap buffers (the default count) of 2^27 elements x 2 bytes, pinned.
  EXPECT_EQ(plan->pinned_bytes, 5 * (uint64_t{1} << 28));
  EXPECT_EQ(plan->host.total(), 98'000'000'000u + 5 * (uint64_t{1} << 28));
}

// The ZeRO-Infinity paper's memory table (Rajbhandari et al. 2021, table 1,
// "model states, TB per model") counts 20 bytes/param (the 16 above plus an
// fp32 gradient copy) with 12 x layers x hidden^2 parameters, in TiB.
TEST(PlanTest, ZeroInfinityTable) {
  struct Row {
    uint64_t layers, hidden;
    double model_states_tib;
  };
  const Row rows[] = {
      {80, 10 * 1024, 1.83},         // 0.10 trillion parameters
      {128, 25 * 1024, 18.31},       // 1.01 T
      {195, 64 * 1024, 182.81},      // 10.05 T
      {315, 160 * 1024, 1845.70},    // 101.47 T
  };
  for (const Row& r : rows) {
    PlanInput in = Input(12 * r.layers * r.hidden * r.hidden, 1, StateTier::kNvme);
    in.fp32_gradients = true;
    auto plan = MakePlan(in);
    ASSERT_TRUE(plan.ok());
    EXPECT_NEAR(static_cast<double>(plan->model_state_bytes) / kTiB, r.model_states_tib, 0.01)
        << r.layers << " layers, hidden " << r.hidden;
  }
}

TEST(PlanTest, PartitionLargerThanAllBuffersDoesNotFit) {
  PlanInput in = Input(1'000'000'000, 1, StateTier::kNvme);
  in.model.largest_param = 200'000'000;
  in.config.tiers.nvme.buffer_size = 100'000'000;
  // Two adjacent buffers hold it, as the swapper does: fits with 5 buffers.
  auto fits = MakePlan(in);
  ASSERT_TRUE(fits.ok());
  EXPECT_TRUE(fits->problems.empty() ||
              fits->problems[0].find("swap buffers") == std::string::npos);
  // One buffer cannot.
  in.config.tiers.nvme.buffer_count = 1;
  auto plan = MakePlan(in);
  ASSERT_TRUE(plan.ok());
  EXPECT_FALSE(plan->fits);
  ASSERT_EQ(plan->problems.size(), 1u);
  EXPECT_NE(plan->problems[0].find("buffer_count"), std::string::npos);
  EXPECT_GE(plan->recommend.buffer_size, 200'000'000u);
}

TEST(PlanTest, RecommendsBuffersCoveringTheQueue) {
  PlanInput in = Input(100'000'000, 1, StateTier::kNvme);
  in.model.largest_param = 1 << 20;  // 2 MiB fp16 partitions
  auto plan = MakePlan(in);
  ASSERT_TRUE(plan.ok());
  // queue_depth 32 x 1 MiB blocks = 32 MiB = 16 buffers of 2 MiB, plus 2.
  EXPECT_EQ(plan->recommend.buffer_size, uint64_t{1} << 20);
  EXPECT_EQ(plan->recommend.buffer_count, 18u);
}

TEST(PlanTest, PredictsStepTimeFromBandwidth) {
  PlanInput in = Input(1'000'000'000, 1, StateTier::kHost);
  in.nvme_read_bw = 2e9;  // bytes/s
  auto plan = MakePlan(in);
  ASSERT_TRUE(plan.ok());
  // Forward and backward each read the 2e9 bytes of fp16 parameters.
  EXPECT_EQ(plan->param_read_bytes, 4'000'000'000u);
  EXPECT_DOUBLE_EQ(plan->step_seconds, 2.0);
}

TEST(PlanTest, RejectsEmptyModel) {
  PlanInput in;
  EXPECT_FALSE(MakePlan(in).ok());
}

}  // namespace
}  // namespace ztier::tiering
