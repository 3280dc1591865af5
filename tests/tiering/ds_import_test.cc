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

  EXPECT_EQ(r.unmapped_keys,
            (std::vector<std::string>{
                "zero_optimization.contiguous_gradients",
                "zero_optimization.overlap_comm",
                "zero_optimization.stage3_gather_16bit_weights_on_model_save",
                "zero_optimization.offload_optimizer.device",
                "zero_optimization.offload_optimizer.nvme_path",
                "zero_optimization.offload_optimizer.pipeline_read",
                "zero_optimization.offload_optimizer.buffer_count",
                "aio.single_submit",
                "aio.overlap_events",
                "aio.use_gds",
            }));
  EXPECT_TRUE(HasNote(r, "aio.use_gds (GPUDirect Storage) is not supported"))
      << AllNotes(r);
  EXPECT_TRUE(
      HasNote(r,
              "zero_optimization.offload_optimizer (device \"nvme\", nvme_path "
              "\"/local_nvme\") is not mapped"))
      << AllNotes(r);
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
      "offload_param": {"device": "nvme", "nvme_path": "/n", "ratio": 0.5}},
      "aio": {"future_knob": 1}})");
  EXPECT_EQ(r.unmapped_keys,
            (std::vector<std::string>{"zero_optimization.sub_group_size",
                                      "zero_optimization.offload_param.ratio",
                                      "aio.future_knob"}));
  EXPECT_TRUE(HasNote(r, "zero_optimization.stage is 2")) << AllNotes(r);
}

}  // namespace
}  // namespace ztier::tiering
