// Tests of the DeepSpeed JSON import: what maps where, the three names of the
// aio parallelism, unmapped keys, notes, and that the output loads back.
#include "tiering/ds_import.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "tiering/config.h"

namespace ztier::tiering {
namespace {

ImportResult MustImport(const std::string& json) {
  Result<ImportResult> r = ImportDeepSpeedJson(json);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return r.ok() ? r.value() : ImportResult{};
}

bool HasNote(const ImportResult& r, std::string_view part) {
  return std::any_of(r.notes.begin(), r.notes.end(), [&](const std::string& n) {
    return n.find(part) != std::string::npos;
  });
}

std::string AllNotes(const ImportResult& r) {
  std::string s;
  for (const std::string& n : r.notes) s += n + "\n";
  return s;
}

// A typical ZeRO-Infinity config, as the DeepSpeed docs and HF examples
// write them.
constexpr const char* kSample = R"({
  "train_batch_size": 16,
  "fp16": {"enabled": true},
  "zero_optimization": {
    "stage": 3,
    "contiguous_gradients": true,
    "overlap_comm": true,
    "stage3_max_live_parameters": 2e9,
    "stage3_max_reuse_distance": 5e8,
    "stage3_prefetch_bucket_size": 2e7,
    "stage3_param_persistence_threshold": 1e4,
    "stage3_model_persistence_threshold": 9223372036854775807,
    "stage3_gather_16bit_weights_on_model_save": false,
    "sub_group_size": 1e9,
    "offload_param": {
      "device": "nvme",
      "nvme_path": "/local_nvme",
      "buffer_count": 6,
      "buffer_size": 2e8,
      "max_in_cpu": 1e9,
      "pin_memory": true
    },
    "offload_optimizer": {
      "device": "nvme",
      "nvme_path": "/local_nvme",
      "pipeline_read": false,
      "buffer_count": 4
    }
  },
  "aio": {
    "block_size": 1048576,
    "queue_depth": 16,
    "intra_op_parallelism": 4,
    "single_submit": false,
    "overlap_events": true,
    "use_gds": false
  }
})";

TEST(DsImport, SampleMapsEveryOffloadKey) {
  ImportResult r = MustImport(kSample);
  const Config& c = r.config;
  EXPECT_EQ(c.tiers.params, ParamTier::kNvme);
  EXPECT_EQ(c.tiers.nvme.paths, std::vector<std::string>{"/local_nvme"});
  EXPECT_EQ(c.tiers.nvme.buffer_count, 6u);
  EXPECT_EQ(c.tiers.nvme.buffer_size, 200'000'000u);
  EXPECT_EQ(c.tiers.host.max_in_cpu, 1'000'000'000u);
  EXPECT_TRUE(c.tiers.host.pin_memory);
  EXPECT_EQ(c.tiers.device.max_live_parameters, 2'000'000'000u);
  EXPECT_EQ(c.coordinator.max_reuse_distance, 500'000'000u);
  EXPECT_EQ(c.coordinator.prefetch_bucket_size, 20'000'000u);
  EXPECT_EQ(c.coordinator.param_persistence_threshold, 10'000u);
  EXPECT_EQ(c.coordinator.model_persistence_threshold,
            kInfinite);  // sys.maxsize
  EXPECT_EQ(c.io.block_size, 1u << 20);
  EXPECT_EQ(c.io.queue_depth, 16u);
  EXPECT_EQ(c.io.threads, 4u);
  EXPECT_EQ(c.optimizer.tier, OptimizerTier::kNvme);
  EXPECT_EQ(c.tiers.gradients, GradTier::kNvme);  // swapped out with the state, as DeepSpeed does
  EXPECT_EQ(c.optimizer.paths, std::vector<std::string>{"/local_nvme"});
  EXPECT_EQ(c.optimizer.buffer_count, 4u);
  EXPECT_EQ(c.optimizer.sub_group_size, 1'000'000'000u);

  EXPECT_EQ(r.unmapped_keys,
            (std::vector<std::string>{
                "zero_optimization.contiguous_gradients",
                "zero_optimization.overlap_comm",
                "zero_optimization.stage3_gather_16bit_weights_on_model_save",
                "aio.single_submit",
                "aio.overlap_events",
                "aio.use_gds",
            }));
  EXPECT_TRUE(HasNote(r, "aio.use_gds (GPUDirect Storage) is not supported"))
      << AllNotes(r);
  EXPECT_TRUE(
      HasNote(r,
              "zero_optimization.offload_optimizer.pipeline_read is false: "
              "accepted; ztier always pipelines optimizer-state reads and "
              "writes"))
      << AllNotes(r);
  EXPECT_FALSE(HasNote(r, "is not mapped")) << AllNotes(r);
  EXPECT_FALSE(HasNote(r, "sub_group_size not given")) << AllNotes(r);
  EXPECT_TRUE(HasNote(
      r, "top-level keys not about offload, ignored: train_batch_size, fp16"))
      << AllNotes(r);
  EXPECT_TRUE(ValidateConfig(c, LoadOptions{.check_paths = false}).ok());
}

TEST(DsImport, OutputLoadsBackAsTheSameConfig) {
  ImportResult r = MustImport(kSample);
  std::string yaml = ConfigToYaml(r.config);
  Result<Config> back =
      LoadConfigText(yaml, "imported.yaml", LoadOptions{.check_paths = false});
  ASSERT_TRUE(back.ok()) << back.status().ToString() << "\n" << yaml;
  EXPECT_EQ(*back, r.config);
}

TEST(DsImport, ParallelismUnderEachOfItsThreeNames) {
  for (const char* name :
       {"intra_op_parallelism", "thread_count", "num_threads"}) {
    ImportResult r =
        MustImport(std::string(R"({"aio": {")") + name + R"(": 6}})");
    EXPECT_EQ(r.config.io.threads, 6u) << name;
    EXPECT_TRUE(r.unmapped_keys.empty()) << name;
  }
}

TEST(DsImport, ParallelismNamesThatDisagree) {
  ImportResult r = MustImport(
      R"({"aio": {"thread_count": 2, "num_threads": 8, "intra_op_parallelism": 4}})");
  EXPECT_EQ(r.config.io.threads, 4u);  // intra_op_parallelism is preferred
  EXPECT_TRUE(HasNote(
      r,
      "aio.num_threads (8) and aio.thread_count (2) disagree: io.threads "
      "follows aio.thread_count"))
      << AllNotes(r);
  EXPECT_TRUE(
      HasNote(r,
              "aio.intra_op_parallelism (4) and aio.thread_count (2) disagree: "
              "io.threads follows aio.intra_op_parallelism"))
      << AllNotes(r);
  // Names that agree say nothing.
  ImportResult same =
      MustImport(R"({"aio": {"thread_count": 2, "num_threads": 2}})");
  EXPECT_FALSE(HasNote(same, "disagree"));
}

TEST(DsImport, AutoAndBadValuesKeepDefaultsWithANote) {
  ImportResult r = MustImport(R"({"zero_optimization": {
      "stage3_prefetch_bucket_size": "auto",
      "stage3_param_persistence_threshold": "auto",
      "offload_param": {"device": "nvme", "buffer_count": 0, "buffer_size": 1.5}},
    "aio": {"block_size": 5000, "queue_depth": "deep"}})");
  Config d;
  EXPECT_EQ(r.config.coordinator.prefetch_bucket_size,
            d.coordinator.prefetch_bucket_size);
  EXPECT_EQ(r.config.tiers.nvme.buffer_count, d.tiers.nvme.buffer_count);
  EXPECT_EQ(r.config.io.block_size, d.io.block_size);
  EXPECT_TRUE(HasNote(
      r,
      "zero_optimization.stage3_prefetch_bucket_size is \"auto\" (filled in "
      "by the HF Trainer at run time): coordinator.prefetch_bucket_size keeps "
      "ztier's default 5e7"))
      << AllNotes(r);
  EXPECT_TRUE(HasNote(
      r,
      "zero_optimization.offload_param.buffer_count: '0' is out of range "
      "(allowed: 1 to 65536); tiers.nvme.buffer_count keeps ztier's default 5"))
      << AllNotes(r);
  EXPECT_TRUE(HasNote(
      r,
      "zero_optimization.offload_param.buffer_size: '1.5' is not a whole "
      "number"))
      << AllNotes(r);
  EXPECT_TRUE(HasNote(r, "aio.block_size: 5000 is not a multiple of 4KiB"))
      << AllNotes(r);
  EXPECT_TRUE(HasNote(r, "aio.queue_depth: expected a whole number"))
      << AllNotes(r);
  EXPECT_TRUE(HasNote(r, "no NVMe path given")) << AllNotes(r);
  EXPECT_TRUE(r.config.tiers.nvme.paths.empty());
}

TEST(DsImport, CpuAndNoneDevicesUseTheHostTier) {
  ImportResult cpu = MustImport(
      R"({"zero_optimization": {"offload_param": {"device": "cpu", "nvme_path": "/x",
                                                  "pin_memory": false}}})");
  EXPECT_EQ(cpu.config.tiers.params, ParamTier::kHost);
  EXPECT_FALSE(cpu.config.tiers.host.pin_memory);
  EXPECT_TRUE(cpu.config.tiers.nvme.paths.empty());
  EXPECT_EQ(
      cpu.unmapped_keys,
      std::vector<std::string>{"zero_optimization.offload_param.nvme_path"});

  ImportResult none = MustImport(
      R"({"zero_optimization": {"offload_param": {"device": "none"}}})");
  EXPECT_EQ(none.config.tiers.params, ParamTier::kHost);
  EXPECT_EQ(none.unmapped_keys,
            std::vector<std::string>{"zero_optimization.offload_param.device"});
  EXPECT_TRUE(HasNote(none, "no parameter offload")) << AllNotes(none);
}

TEST(DsImport, KnobsWithoutTheStage3Prefix) {
  ImportResult r = MustImport(R"({"zero_optimization": {
      "prefetch_bucket_size": 1e6, "max_live_parameters": 3e8, "max_reuse_distance": 0,
      "param_persistence_threshold": 0, "model_persistence_threshold": 1e10}})");
  EXPECT_EQ(r.config.coordinator.prefetch_bucket_size, 1'000'000u);
  EXPECT_EQ(r.config.tiers.device.max_live_parameters, 300'000'000u);
  EXPECT_EQ(r.config.coordinator.max_reuse_distance, 0u);
  EXPECT_EQ(r.config.coordinator.param_persistence_threshold, 0u);
  EXPECT_EQ(r.config.coordinator.model_persistence_threshold, 10'000'000'000u);
  EXPECT_TRUE(r.unmapped_keys.empty());
}

TEST(DsImport, NvmePathList) {
  ImportResult r = MustImport(
      R"({"zero_optimization": {"offload_param": {"device": "nvme",
          "nvme_path": ["/nvme0", "/nvme1"]}}})");
  EXPECT_EQ(r.config.tiers.nvme.paths,
            (std::vector<std::string>{"/nvme0", "/nvme1"}));
}

TEST(DsImport, Errors) {
  Result<ImportResult> bad = ImportDeepSpeedJson("{\n  \"aio\": {,}\n}");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(bad.status().message().substr(0, 51),
            "DeepSpeed config: JSON parse error at line 2, colum");
  Result<ImportResult> arr = ImportDeepSpeedJson("[1, 2]");
  ASSERT_FALSE(arr.ok());
  EXPECT_EQ(arr.status().message(),
            "DeepSpeed config: expected a JSON object, got array");
}

TEST(DsImport, UnknownKeysUnderAioAndZeroAreListed) {
  ImportResult r =
      MustImport(R"({"zero_optimization": {"stage": 2, "sub_group_size": 1e9,
      "offload_param": {"device": "nvme", "nvme_path": "/n", "ratio": 0.5},
      "offload_optimizer": {"device": "nvme", "future_knob": 1}},
      "aio": {"future_knob": 1}})");
  EXPECT_EQ(r.unmapped_keys,
            (std::vector<std::string>{
                "zero_optimization.offload_param.ratio",
                "zero_optimization.offload_optimizer.future_knob",
                "aio.future_knob"}));
  EXPECT_EQ(r.config.optimizer.sub_group_size, 1'000'000'000u);
  EXPECT_TRUE(HasNote(r, "zero_optimization.stage is 2")) << AllNotes(r);
}

// ---------------------------------------------------------------------------
// zero_optimization.offload_optimizer and sub_group_size

TEST(DsImport, OffloadOptimizerDevices) {
  ImportResult nvme = MustImport(R"({"zero_optimization": {
      "offload_param": {"device": "nvme", "nvme_path": "/p"},
      "offload_optimizer": {"device": "NVMe", "nvme_path": "/o"}}})");
  EXPECT_EQ(nvme.config.optimizer.tier, OptimizerTier::kNvme);
  EXPECT_EQ(nvme.config.optimizer.paths, std::vector<std::string>{"/o"});
  EXPECT_TRUE(nvme.unmapped_keys.empty());

  ImportResult cpu = MustImport(R"({"zero_optimization": {
      "offload_optimizer": {"device": "cpu", "nvme_path": "/o"}}})");
  EXPECT_EQ(cpu.config.optimizer.tier, OptimizerTier::kHost);
  EXPECT_TRUE(cpu.config.optimizer.paths.empty());
  EXPECT_EQ(cpu.unmapped_keys,
            std::vector<std::string>{
                "zero_optimization.offload_optimizer.nvme_path"});
  EXPECT_TRUE(HasNote(cpu,
                      "zero_optimization.offload_optimizer.nvme_path is "
                      "ignored: optimizer state is kept on the host (device "
                      "cpu)"))
      << AllNotes(cpu);

  ImportResult none = MustImport(
      R"({"zero_optimization": {"offload_optimizer": {"device": "none"}}})");
  EXPECT_EQ(none.config.optimizer.tier, OptimizerTier::kHost);
  EXPECT_EQ(
      none.unmapped_keys,
      std::vector<std::string>{"zero_optimization.offload_optimizer.device"});
  EXPECT_TRUE(HasNote(none,
                      "ztier keeps optimizer state on the host or NVMe; "
                      "optimizer.tier is host"))
      << AllNotes(none);

  ImportResult odd = MustImport(
      R"({"zero_optimization": {"offload_optimizer": {"device": "gpu"}}})");
  EXPECT_EQ(odd.config.optimizer.tier, OptimizerTier::kNvme);
  EXPECT_TRUE(HasNote(odd,
                      "zero_optimization.offload_optimizer.device \"gpu\" is "
                      "not nvme, cpu or none: optimizer.tier keeps nvme"))
      << AllNotes(odd);

  ImportResult absent =
      MustImport(R"({"zero_optimization": {"offload_optimizer": {}}})");
  EXPECT_EQ(absent.config.optimizer, OptimizerConfig{});
  EXPECT_TRUE(absent.unmapped_keys.empty());
  EXPECT_TRUE(HasNote(absent,
                      "zero_optimization.offload_optimizer.device not given: "
                      "DeepSpeed's default is none; optimizer.tier keeps nvme"))
      << AllNotes(absent);
}

TEST(DsImport, OffloadOptimizerAcceptedAndUnsupportedKeys) {
  ImportResult r = MustImport(R"({"zero_optimization": {
      "offload_optimizer": {"device": "nvme", "nvme_path": "/o",
        "pin_memory": true, "pipeline_read": true, "pipeline_write": false,
        "fast_init": false, "ratio": 0.3, "buffer_count": 8}}})");
  EXPECT_EQ(r.config.optimizer.buffer_count, 8u);
  EXPECT_EQ(r.unmapped_keys, std::vector<std::string>{
                                 "zero_optimization.offload_optimizer.ratio"});
  const std::string base = "zero_optimization.offload_optimizer.";
  EXPECT_TRUE(HasNote(r, base +
                             "pin_memory is true: accepted; ztier's optimizer "
                             "buffers are never pinned"))
      << AllNotes(r);
  EXPECT_TRUE(HasNote(r, base + "pipeline_read is true: accepted; ztier always "
                                "pipelines"))
      << AllNotes(r);
  EXPECT_TRUE(HasNote(r, base +
                             "pipeline_write is false: accepted; ztier always "
                             "pipelines"))
      << AllNotes(r);
  EXPECT_TRUE(HasNote(r, base + "fast_init is false: accepted")) << AllNotes(r);
  EXPECT_TRUE(
      HasNote(r, base + "ratio is 0.3: not supported (partial offload)"))
      << AllNotes(r);
  EXPECT_TRUE(HasNote(r,
                      "zero_optimization.sub_group_size not given: "
                      "DeepSpeed's default is 1e9 (12 GB per optimizer "
                      "buffer), ztier's is 1e8"))
      << AllNotes(r);
  // The tiers.host pin_memory of the parameters is not touched.
  EXPECT_TRUE(r.config.tiers.host.pin_memory);
}

TEST(DsImport, OffloadOptimizerBadValuesKeepDefaultsWithANote) {
  ImportResult r = MustImport(R"({"zero_optimization": {
      "sub_group_size": 2e10,
      "offload_optimizer": {"device": "nvme", "nvme_path": 7,
                            "buffer_count": 65}}})");
  OptimizerConfig d;
  EXPECT_EQ(r.config.optimizer, d);
  EXPECT_EQ(r.unmapped_keys,
            std::vector<std::string>{
                "zero_optimization.offload_optimizer.nvme_path"});
  EXPECT_TRUE(HasNote(r,
                      "zero_optimization.sub_group_size: '20000000000' is out "
                      "of range (allowed: 1 to 1e10); optimizer.sub_group_size "
                      "keeps ztier's default 1e8"))
      << AllNotes(r);
  EXPECT_TRUE(HasNote(r,
                      "zero_optimization.offload_optimizer.buffer_count: '65' "
                      "is out of range (allowed: 1 to 64); "
                      "optimizer.buffer_count keeps ztier's default 4"))
      << AllNotes(r);
  EXPECT_TRUE(HasNote(r,
                      "zero_optimization.offload_optimizer.nvme_path is not a "
                      "path or a list of paths"))
      << AllNotes(r);
  ImportResult a = MustImport(
      R"({"zero_optimization": {"sub_group_size": "auto",
          "offload_optimizer": "nvme"}})");
  EXPECT_EQ(a.config.optimizer, d);
  EXPECT_EQ(a.unmapped_keys,
            std::vector<std::string>{"zero_optimization.offload_optimizer"});
  EXPECT_TRUE(HasNote(a, "zero_optimization.sub_group_size is \"auto\""))
      << AllNotes(a);
}

TEST(DsImport, OptimizerPathNotes) {
  // No optimizer path: the parameters' drives.
  ImportResult shared = MustImport(R"({"zero_optimization": {
      "offload_param": {"device": "nvme", "nvme_path": "/p"},
      "offload_optimizer": {"device": "nvme"}}})");
  EXPECT_TRUE(shared.config.optimizer.paths.empty());
  EXPECT_EQ(OptimizerPaths(shared.config), std::vector<std::string>{"/p"});
  EXPECT_TRUE(HasNote(shared,
                      "optimizer.paths is left out, so the optimizer state "
                      "goes to tiers.nvme.paths"))
      << AllNotes(shared);
  // No path at all, parameters on the host: named, and still loads.
  ImportResult none = MustImport(R"({"zero_optimization": {
      "offload_param": {"device": "cpu"},
      "offload_optimizer": {"device": "nvme"}}})");
  EXPECT_TRUE(OptimizerPaths(none.config).empty());
  EXPECT_TRUE(HasNote(none, "set optimizer.paths before creating an optimizer"))
      << AllNotes(none);
  Result<Config> back = LoadConfigText(ConfigToYaml(none.config), "n.yaml",
                                       LoadOptions{.check_paths = false});
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(*back, none.config);
  // Without offload_optimizer, a note says what DeepSpeed would have done.
  ImportResult gpu = MustImport(
      R"({"zero_optimization": {"offload_param": {"device": "nvme"}}})");
  EXPECT_TRUE(HasNote(gpu,
                      "no zero_optimization.offload_optimizer: DeepSpeed "
                      "would keep optimizer state on the GPU"))
      << AllNotes(gpu);
  EXPECT_FALSE(HasNote(gpu, "sub_group_size not given")) << AllNotes(gpu);
}

}  // namespace
}  // namespace ztier::tiering
