// Tests of the DeepSpeed JSON import: what maps where, DeepSpeed's placement
// rules (stage, absence, old spellings, "auto"), issues, --strict, errors,
// and that the output loads back. tests/data/deepspeed/ holds whole configs.
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

// A typical ZeRO-Infinity config: parameters and optimizer state on NVMe.
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

std::string ImportError(const std::string& json, bool strict = false) {
  Result<ImportResult> r =
      ImportDeepSpeedJson(json, ImportOptions{.strict = strict});
  EXPECT_FALSE(r.ok()) << json;
  return r.ok() ? std::string() : std::string(r.status().message());
}

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
  EXPECT_EQ(c.tiers.gradients,
            GradTier::kNvme);  // swapped out with the state, as DeepSpeed does
  EXPECT_EQ(c.optimizer.paths, std::vector<std::string>{"/local_nvme"});
  EXPECT_EQ(c.optimizer.buffer_count, 4u);
  EXPECT_EQ(c.optimizer.sub_group_size, 1'000'000'000u);

  // aio's switches ask for what ztier always does; the communication keys
  // are outside the import: nothing is lost, so --strict passes.
  EXPECT_TRUE(r.unmapped_keys.empty()) << AllNotes(r);
  EXPECT_TRUE(r.issues.empty()) << AllNotes(r);
  EXPECT_TRUE(ImportDeepSpeedJson(kSample, ImportOptions{.strict = true}).ok());
  EXPECT_TRUE(HasNote(r,
                      "zero_optimization keys about communication or "
                      "checkpointing, not about offload, ignored: "
                      "contiguous_gradients, overlap_comm, "
                      "stage3_gather_16bit_weights_on_model_save"))
      << AllNotes(r);
  EXPECT_FALSE(HasNote(r, "pin_memory not given")) << AllNotes(r);
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

// ---------------------------------------------------------------------------
// Where parameters live: stage 3 with device cpu or nvme, else the GPU.

TEST(DsImport, ParametersStayOnTheGpuWithoutOffloadParam) {
  ImportResult r = MustImport(R"({"zero_optimization": {"stage": 3,
      "offload_optimizer": {"device": "cpu"}}})");
  EXPECT_EQ(r.config.tiers.params, ParamTier::kHost);
  EXPECT_EQ(r.issues,
            std::vector<std::string>{
                "zero_optimization.offload_param: not given: DeepSpeed keeps "
                "parameters on the GPU, which ztier has no tier for (it always "
                "offloads them): tiers.params is host, the nearest; set "
                "offload_param.device to cpu or nvme"});
  EXPECT_TRUE(r.unmapped_keys.empty());
}

TEST(DsImport, ParameterDevices) {
  ImportResult cpu = MustImport(R"({"zero_optimization": {"stage": 3,
      "offload_param": {"device": "cpu", "nvme_path": "/x", "pin_memory": false},
      "offload_optimizer": {"device": "cpu"}}})");
  EXPECT_EQ(cpu.config.tiers.params, ParamTier::kHost);
  EXPECT_FALSE(cpu.config.tiers.host.pin_memory);
  EXPECT_TRUE(cpu.config.tiers.nvme.paths.empty());
  EXPECT_TRUE(cpu.issues.empty())
      << AllNotes(cpu);  // nvme_path: DeepSpeed ignores it too
  EXPECT_TRUE(HasNote(cpu, "offload_param.nvme_path is ignored, as DeepSpeed"))
      << AllNotes(cpu);

  ImportResult none = MustImport(
      R"({"zero_optimization": {"stage": 3, "offload_param": {"device": "none"}}})");
  EXPECT_EQ(none.config.tiers.params, ParamTier::kHost);
  EXPECT_EQ(none.unmapped_keys,
            std::vector<std::string>{"zero_optimization.offload_param.device"});

  // Absent device and "auto" are none, as DeepSpeed reads them.
  for (const char* op : {R"({})", R"({"device": "auto"})"}) {
    ImportResult r =
        MustImport(std::string(R"({"zero_optimization": {"stage": 3,
        "offload_param": )") +
                   op + "}}");
    EXPECT_EQ(r.config.tiers.params, ParamTier::kHost) << op;
    EXPECT_TRUE(HasNote(r, "DeepSpeed keeps parameters on the GPU")) << op;
  }
}

TEST(DsImport, UnknownDeviceIsAnErrorNamingTheValidOnes) {
  EXPECT_EQ(ImportError(R"({"zero_optimization": {"stage": 3,
      "offload_optimizer": {"device": "gpu"}}})"),
            "zero_optimization.offload_optimizer.device: \"gpu\" is not an "
            "offload device (valid: none, cpu, nvme)");
  EXPECT_EQ(
      ImportError(R"({"zero_optimization": {"stage": 3,
      "offload_param": {"device": "NVMe"}, "offload_optimizer": {"device": 1}}})"),
      "zero_optimization.offload_param.device: \"NVMe\" is not an offload "
      "device (valid: none, cpu, nvme); DeepSpeed's names are lowercase: "
      "write \"nvme\"\n"
      "zero_optimization.offload_optimizer.device: 1 is not an offload "
      "device (valid: none, cpu, nvme)");
}

TEST(DsImport, BelowStage3ParametersAreNotOffloaded) {
  ImportResult r = MustImport(R"({"zero_optimization": {"stage": 2,
      "offload_param": {"device": "nvme", "nvme_path": "/p"},
      "offload_optimizer": {"device": "cpu"}}})");
  EXPECT_EQ(r.config.tiers.params, ParamTier::kHost);
  EXPECT_TRUE(
      r.config.tiers.nvme.paths.empty());  // not read: DeepSpeed ignores it
  EXPECT_EQ(r.unmapped_keys,
            std::vector<std::string>{"zero_optimization.offload_param"});
  EXPECT_TRUE(HasNote(r,
                      "zero_optimization.offload_param: ignored by DeepSpeed "
                      "below stage 3 (stage 2)"))
      << AllNotes(r);
  // The stage is still checked.
  EXPECT_EQ(
      ImportError(R"({"zero_optimization": {"stage": 4}})"),
      "zero_optimization.stage: 4 is not a ZeRO stage (valid: 0, 1, 2, 3)");
}

// ---------------------------------------------------------------------------
// Where the optimizer state lives.

TEST(DsImport, OptimizerDevicesAndStages) {
  ImportResult nvme = MustImport(R"({"zero_optimization": {"stage": 3,
      "offload_param": {"device": "nvme", "nvme_path": "/p"},
      "offload_optimizer": {"device": "nvme", "nvme_path": "/o"}}})");
  EXPECT_EQ(nvme.config.optimizer.tier, OptimizerTier::kNvme);
  EXPECT_EQ(nvme.config.tiers.gradients, GradTier::kNvme);
  EXPECT_EQ(nvme.config.optimizer.paths, std::vector<std::string>{"/o"});
  EXPECT_TRUE(nvme.issues.empty()) << AllNotes(nvme);

  // Below stage 3 DeepSpeed offloads to the CPU whatever the device.
  ImportResult z2 = MustImport(R"({"zero_optimization": {"stage": 2,
      "offload_optimizer": {"device": "nvme", "nvme_path": "/o"}}})");
  EXPECT_EQ(z2.config.optimizer.tier, OptimizerTier::kHost);
  EXPECT_EQ(z2.config.tiers.gradients, GradTier::kHost);
  EXPECT_TRUE(z2.config.optimizer.paths.empty());
  EXPECT_TRUE(HasNote(z2,
                      "zero_optimization.offload_optimizer.device: nvme at "
                      "stage 2: DeepSpeed offloads the optimizer state to the "
                      "CPU below stage 3"))
      << AllNotes(z2);

  // Stage 0 is ZeRO off: no offload at all.
  ImportResult z0 = MustImport(
      R"({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}})");
  EXPECT_EQ(z0.unmapped_keys,
            std::vector<std::string>{"zero_optimization.offload_optimizer"});
  EXPECT_TRUE(HasNote(z0, "ignored by DeepSpeed at stage 0 (ZeRO off)"))
      << AllNotes(z0);

  ImportResult gpu = MustImport(
      R"({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}})");
  EXPECT_EQ(gpu.config.optimizer.tier, OptimizerTier::kHost);
  EXPECT_EQ(gpu.issues.size(), 1u) << AllNotes(gpu);
  EXPECT_TRUE(HasNote(gpu,
                      "zero_optimization.offload_optimizer: not given: "
                      "DeepSpeed keeps the optimizer state on the GPU"))
      << AllNotes(gpu);
}

TEST(DsImport, OldSpellingsReadAsDeepSpeedReadsThem) {
  ImportResult r = MustImport(R"({"zero_optimization": {"stage": 3,
      "cpu_offload": true, "cpu_offload_param": true,
      "cpu_offload_use_pin_memory": false}})");
  EXPECT_EQ(r.config.optimizer.tier, OptimizerTier::kHost);
  EXPECT_EQ(r.config.tiers.params, ParamTier::kHost);
  EXPECT_TRUE(r.config.tiers.host.pin_memory);  // the old pin key does nothing
  EXPECT_EQ(
      r.unmapped_keys,
      std::vector<std::string>{"zero_optimization.cpu_offload_use_pin_memory"});
  EXPECT_TRUE(
      HasNote(r,
              "zero_optimization.cpu_offload is true: DeepSpeed reads "
              "it as zero_optimization.offload_optimizer {device: cpu}"))
      << AllNotes(r);

  ImportResult off = MustImport(
      R"({"zero_optimization": {"stage": 3, "cpu_offload": false}})");
  EXPECT_TRUE(HasNote(off,
                      "offload_optimizer: not given: DeepSpeed keeps the "
                      "optimizer state on the GPU"))
      << AllNotes(off);

  EXPECT_EQ(
      ImportError(R"({"zero_optimization": {"stage": 3, "cpu_offload": false,
      "offload_optimizer": {"device": "nvme"}}})"),
      "zero_optimization.cpu_offload: cannot be given together with "
      "zero_optimization.offload_optimizer (it is the old spelling of "
      "it, and DeepSpeed refuses both); remove cpu_offload");
  // A misspelt old key is not one DeepSpeed knows.
  ImportResult typo = MustImport(
      R"({"zero_optimization": {"stage": 3, "cpu_offload_params": true}})");
  EXPECT_TRUE(HasNote(typo,
                      "zero_optimization.cpu_offload_params: not a "
                      "DeepSpeed zero_optimization key (DeepSpeed "
                      "rejects it); did you mean 'cpu_offload_param'?"))
      << AllNotes(typo);
}

TEST(DsImport, OffloadOptimizerAcceptedAndUnsupportedKeys) {
  ImportResult r = MustImport(R"({"zero_optimization": {"stage": 3,
      "offload_param": {"device": "cpu"},
      "offload_optimizer": {"device": "nvme", "nvme_path": "/o",
        "pin_memory": true, "pipeline_read": true, "pipeline_write": false,
        "fast_init": false, "ratio": 0.3, "super_offload": false,
        "buffer_count": 8}}})");
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
  EXPECT_TRUE(HasNote(r, base + "fast_init is false: accepted")) << AllNotes(r);
  EXPECT_TRUE(HasNote(r, base + "ratio: 0.3: partial offload is not supported"))
      << AllNotes(r);
  EXPECT_TRUE(HasNote(r,
                      "zero_optimization.sub_group_size not given: "
                      "DeepSpeed's default is 1e9 (12 GB per optimizer "
                      "buffer), ztier's is 1e8"))
      << AllNotes(r);
  // ratio 1 (all of the state) is what ztier does.
  ImportResult full = MustImport(R"({"zero_optimization": {"stage": 3,
      "offload_param": {"device": "cpu"},
      "offload_optimizer": {"device": "cpu", "ratio": 1.0}}})");
  EXPECT_TRUE(full.unmapped_keys.empty()) << AllNotes(full);
}

TEST(DsImport, OptimizerPathNotes) {
  ImportResult shared = MustImport(R"({"zero_optimization": {"stage": 3,
      "offload_param": {"device": "nvme", "nvme_path": "/p"},
      "offload_optimizer": {"device": "nvme"}}})");
  EXPECT_TRUE(shared.config.optimizer.paths.empty());
  EXPECT_EQ(OptimizerPaths(shared.config), std::vector<std::string>{"/p"});
  EXPECT_TRUE(HasNote(shared,
                      "optimizer.paths is left out, so the optimizer state "
                      "goes to tiers.nvme.paths"))
      << AllNotes(shared);
  ImportResult none = MustImport(R"({"zero_optimization": {"stage": 3,
      "offload_param": {"device": "cpu"},
      "offload_optimizer": {"device": "nvme"}}})");
  EXPECT_TRUE(OptimizerPaths(none.config).empty());
  EXPECT_TRUE(HasNote(none, "set optimizer.paths before creating an optimizer"))
      << AllNotes(none);
  Result<Config> back = LoadConfigText(ConfigToYaml(none.config), "n.yaml",
                                       LoadOptions{.check_paths = false});
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(*back, none.config);
}

// ---------------------------------------------------------------------------
// Values: "auto", out of range, wrong types; aio.

TEST(DsImport, AutoAndBadValuesKeepDefaultsAsIssues) {
  ImportResult r = MustImport(R"({"zero_optimization": {"stage": 3,
      "stage3_prefetch_bucket_size": "auto",
      "offload_param": {"device": "nvme", "buffer_count": 0, "buffer_size": 1.5},
      "offload_optimizer": {"device": "cpu"}},
    "aio": {"block_size": 5000, "queue_depth": "deep"}})");
  Config d;
  EXPECT_EQ(r.config.coordinator.prefetch_bucket_size,
            d.coordinator.prefetch_bucket_size);
  EXPECT_EQ(r.config.tiers.nvme.buffer_count, d.tiers.nvme.buffer_count);
  EXPECT_EQ(r.config.io.block_size, d.io.block_size);
  EXPECT_EQ(
      r.issues,
      (std::vector<std::string>{
          "zero_optimization.offload_param.buffer_count: '0' is out of "
          "range (allowed: 1 to 65536); tiers.nvme.buffer_count keeps "
          "ztier's default 5",
          "zero_optimization.offload_param.buffer_size: '1.5' is not a "
          "whole number; tiers.nvme.buffer_size keeps ztier's default 1e8",
          "zero_optimization.stage3_prefetch_bucket_size: \"auto\" "
          "(filled in by the HF Trainer at run time): "
          "coordinator.prefetch_bucket_size "
          "keeps ztier's default 5e7; write the value the run uses",
          "aio.block_size: 5000 is not a multiple of 4KiB (direct I/O "
          "needs it): io.block_size keeps 1MiB; write a multiple of 4096",
          "aio.queue_depth: expected a whole number such as 32, 50000000 "
          "or 5e7, got 'deep'; io.queue_depth keeps ztier's default 32",
      }));
  EXPECT_TRUE(HasNote(r, "no NVMe path given")) << AllNotes(r);
}

TEST(DsImport, AioTakesOnlyWhatDeepSpeedReads) {
  ImportResult r = MustImport(R"({"aio": {"intra_op_parallelism": 6,
      "thread_count": 2, "single_submit": true, "overlap_events": false,
      "use_gds": true, "queue_dept": 4}})");
  EXPECT_EQ(r.config.io.threads, 6u);
  EXPECT_EQ(r.unmapped_keys,
            (std::vector<std::string>{"aio.thread_count", "aio.single_submit",
                                      "aio.overlap_events", "aio.use_gds",
                                      "aio.queue_dept"}));
  EXPECT_TRUE(HasNote(r,
                      "aio.thread_count: not read by DeepSpeed (its key is "
                      "aio.intra_op_parallelism); rename it"))
      << AllNotes(r);
  EXPECT_TRUE(HasNote(r,
                      "aio.queue_dept: not a DeepSpeed aio key; did you "
                      "mean 'queue_depth'?"))
      << AllNotes(r);
}

TEST(DsImport, KnobsWithoutTheStage3Prefix) {
  ImportResult r = MustImport(R"({"zero_optimization": {"stage": 3,
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
      R"({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme",
          "nvme_path": ["/nvme0", "/nvme1"]}}})");
  EXPECT_EQ(r.config.tiers.nvme.paths,
            (std::vector<std::string>{"/nvme0", "/nvme1"}));
}

// ---------------------------------------------------------------------------
// Errors and --strict.

TEST(DsImport, Errors) {
  Result<ImportResult> bad = ImportDeepSpeedJson("{\n  \"aio\": {,}\n}");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(bad.status().message().substr(0, 51),
            "DeepSpeed config: JSON parse error at line 2, colum");
  EXPECT_EQ(ImportError("[1, 2]"),
            "DeepSpeed config: expected a JSON object, got array");
  EXPECT_EQ(ImportError(R"({"zero_optimization": {"stage": 3,
      "offload_optimizer": "nvme"}})"),
            "zero_optimization.offload_optimizer: expected an object such as "
            "{\"device\": \"cpu\"}, got string");
}

TEST(DsImport, BooleanZeroOptimizationIsTheOldFormOfAStage) {
  ImportResult r = MustImport(R"({"zero_optimization": true,
      "cpu_offload": true})");  // top level: not a DeepSpeed offload key
  EXPECT_TRUE(HasNote(r,
                      "zero_optimization is true, DeepSpeed's old form of "
                      "stage 1"))
      << AllNotes(r);
  EXPECT_TRUE(HasNote(r,
                      "zero_optimization.stage: 1 (parameters are "
                      "offloaded only at stage 3)"))
      << AllNotes(r);
  EXPECT_EQ(r.config.optimizer.tier, OptimizerTier::kHost);
  EXPECT_TRUE(HasNote(r,
                      "top-level keys not about offload, ignored: "
                      "cpu_offload"))
      << AllNotes(r);
}

TEST(DsImport, StrictListsEveryIssue) {
  const std::string json = R"({"zero_optimization": {"stage": 3,
      "offload_param": {"device": "nvme", "buffer_count": "auto"},
      "offload_optimizer": {"device": "none"}}})";
  ImportResult lax = MustImport(json);
  EXPECT_EQ(lax.issues.size(), 2u) << AllNotes(lax);
  EXPECT_EQ(ImportError(json, /*strict=*/true),
            "--strict: 2 DeepSpeed keys not mapped or not taken as given "
            "(without --strict they are notes):\n"
            "zero_optimization.offload_param.buffer_count: \"auto\" (filled in "
            "by the HF Trainer at run time): tiers.nvme.buffer_count keeps "
            "ztier's default 5; write "
            "the value the run uses\n"
            "zero_optimization.offload_optimizer.device: none: DeepSpeed keeps "
            "the optimizer state on the GPU, which ztier's optimizer cannot "
            "(it keeps it on the host or NVMe): optimizer.tier is host, the "
            "nearest; set offload_optimizer.device to cpu or nvme, or train "
            "with an optimizer of your own (the optimizer section is then "
            "unused)");
}

}  // namespace
}  // namespace ztier::tiering
