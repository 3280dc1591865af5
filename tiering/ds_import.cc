#include "tiering/ds_import.h"

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <optional>

namespace ztier::tiering {
namespace {

// ordered_json keeps the file's key order, so lists follow the file.
using Json = nlohmann::ordered_json;

// The coordinator knobs DeepSpeed reads from zero_optimization, each under
// its stage3_-prefixed name and its plain alias.
enum class Knob { kPrefetch, kMaxLive, kReuse, kParamPersist, kModelPersist };
struct KnobDef {
  std::string_view name;  // without stage3_
  Knob knob;
};
constexpr KnobDef kKnobs[] = {
    {"prefetch_bucket_size", Knob::kPrefetch},
    {"max_live_parameters", Knob::kMaxLive},
    {"max_reuse_distance", Knob::kReuse},
    {"param_persistence_threshold", Knob::kParamPersist},
    {"model_persistence_threshold", Knob::kModelPersist},
};

// zero_optimization keys DeepSpeed knows that are about communication,
// bucketing, quantization or checkpointing, not about where tensors live:
// outside what a ztier config describes, so neither mapped nor an issue.
constexpr std::string_view kOutsideKeys[] = {
    "contiguous_gradients",
    "reduce_scatter",
    "reduce_bucket_size",
    "use_multi_rank_bucket_allreduce",
    "allgather_partitions",
    "allgather_bucket_size",
    "overlap_comm",
    "load_from_fp32_weights",
    "elastic_checkpoint",
    "gather_16bit_weights_on_model_save",
    "stage3_gather_16bit_weights_on_model_save",
    "stage3_gather_fp16_weights_on_model_save",
    "module_granularity_threshold",
    "stage3_module_granularity_threshold",
    "use_all_reduce_for_fetch_params",
    "stage3_use_all_reduce_for_fetch_params",
    "allgather_sequential",
    "stage3_allgather_sequential",
    "ignore_unused_parameters",
    "legacy_stage1",
    "round_robin_gradients",
    "zero_hpz_partition_size",
    "zero_quantized_weights",
    "zero_quantized_nontrainable_weights",
    "zero_quantized_gradients",
    "zeropp_loco_param",
    "mics_shard_size",
    "mics_hierarchical_params_gather",
    "memory_efficient_linear",
    "pipeline_loading_checkpoint",
    "override_module_apply",
    "log_trace_cache_warnings",
    "enable_sanity_checks",
    "save_muon_momentum_buffer_in_memory",
    "leaf_module",
};

// Every zero_optimization key the import reads, for "did you mean".
constexpr std::string_view kReadKeys[] = {"stage",
                                          "offload_param",
                                          "offload_optimizer",
                                          "sub_group_size",
                                          "cpu_offload",
                                          "cpu_offload_param",
                                          "cpu_offload_use_pin_memory",
                                          "zenflow"};

// Where DeepSpeed puts a tensor class, after its stage rules.
enum class Device { kGpu, kCpu, kNvme };

// One of DeepSpeed's offload sections after its deprecated spelling is
// resolved: the object to read (null when absent) and the key it came from.
struct Offload {
  Json section;     // an object, or null: no offload
  std::string key;  // full path of the key that gave it ("" when absent)
  bool from_alias = false;
};

bool IsAuto(const Json& v) {
  return v.is_string() && v.get<std::string>() == "auto";
}

bool Contains(const auto& list, std::string_view k) {
  return std::find(std::begin(list), std::end(list), k) != std::end(list);
}

// The closest of `candidates` to `k` within a third of its letters, or "".
std::string Nearest(std::string_view k, const auto& candidates) {
  std::string best;
  size_t best_d = std::max<size_t>(1, k.size() / 3) + 1;
  for (std::string_view c : candidates) {
    size_t d = EditDistance(k, c);
    if (d < best_d) {
      best_d = d;
      best = std::string(c);
    }
  }
  return best;
}

class Importer {
 public:
  Result<ImportResult> Run(std::string_view text, const ImportOptions& options);

 private:
  void Note(std::string s) { r_.notes.push_back(std::move(s)); }
  // A key whose DeepSpeed meaning the ztier config does not reproduce.
  void Issue(const std::string& key, const std::string& why) {
    r_.issues.push_back(key + ": " + why);
    Note(key + ": " + why);
  }
  void Unmapped(const std::string& key, const std::string& why) {
    r_.unmapped_keys.push_back(key);
    Issue(key, why);
  }
  // A key DeepSpeed does not know in `section`: unmapped, with the nearest
  // known key of that section as a suggestion.
  void UnknownKey(const std::string& key, std::string_view k, const auto& known,
                  std::string_view section) {
    const std::string near = Nearest(k, known);
    Unmapped(key, std::string(section) + "; " +
                      (near.empty() ? "remove it" : "did you mean '" + near + "'?"));
  }
  // A value DeepSpeed itself rejects: the import fails.
  void Error(std::string s) { errors_.push_back(std::move(s)); }

  // A JSON value as the text ztier's parsers read, or nullopt (an issue).
  std::optional<std::string> NumberText(const Json& v, const std::string& key,
                                        std::string_view target,
                                        const std::string& kept);
  void Count(const Json& v, const std::string& key, std::string_view target,
             const Limits& limits, uint64_t* out);
  void Count32(const Json& v, const std::string& key, std::string_view target,
               const Limits& limits, uint32_t* out);
  void Bytes(const Json& v, const std::string& key, std::string_view target,
             const Limits& limits, uint64_t* out);
  void Bool(const Json& v, const std::string& key, std::string_view target,
            bool* out);
  // A path or a list of paths into *out; false (nothing taken) otherwise.
  static bool PathList(const Json& v, std::vector<std::string>* out);

  int Stage(const Json& zo, bool section_given);
  Offload Resolve(const Json& zo, const std::string& name,
                  const std::string& old_name);
  Offload OldSpelling(const Json& zo, const std::string& name,
                      const std::string& old_name, bool has_new);
  std::string DeviceOf(const Offload& o);
  void Params(const Offload& o, int stage);
  void ParamKeys(const Json& op, const std::string& base, ParamTier tier);
  // Returns whether the optimizer state is offloaded (host or NVMe).
  bool Optimizer(const Offload& o, int stage);
  void OptimizerKeys(const Json& oo, const std::string& base);
  void OptimizerPathNotes();
  void Knob(const KnobDef& knob, const Json& v, const std::string& key);
  void ZeroOptimization(const Json& zo, bool section_given);
  void Aio(const Json& aio);
  void AioFlag(const Json& v, const std::string& key, bool ztier_value,
               const std::string& why);

  ImportResult r_;
  std::vector<std::string> errors_;
};

std::optional<std::string> Importer::NumberText(const Json& v,
                                                const std::string& key,
                                                std::string_view target,
                                                const std::string& kept) {
  if (v.is_number_unsigned()) return std::to_string(v.get<uint64_t>());
  if (v.is_number_integer()) return std::to_string(v.get<int64_t>());
  if (v.is_number_float()) {
    char buf[64];
    snprintf(buf, sizeof(buf), "%.17g", v.get<double>());
    return std::string(buf);
  }
  if (IsAuto(v)) {
    Issue(key, "\"auto\" (filled in by the HF Trainer at run time): " +
                   std::string(target) + " keeps ztier's default " + kept +
                   "; write the value the run uses");
    return std::nullopt;
  }
  if (v.is_string()) return v.get<std::string>();
  Issue(key, std::string(v.type_name()) +
                 ", not a number: " + std::string(target) +
                 " keeps ztier's default " + kept + "; write a number");
  return std::nullopt;
}

void Importer::Count(const Json& v, const std::string& key,
                     std::string_view target, const Limits& limits,
                     uint64_t* out) {
  std::optional<std::string> text =
      NumberText(v, key, target, FormatElementCount(*out));
  if (!text) return;
  Result<uint64_t> n = ParseElementCount(*text, limits);
  if (!n.ok()) {
    Issue(key, std::string(n.status().message()) + "; " + std::string(target) +
                   " keeps ztier's default " + FormatElementCount(*out));
    return;
  }
  *out = *n;
}

void Importer::Count32(const Json& v, const std::string& key,
                       std::string_view target, const Limits& limits,
                       uint32_t* out) {
  uint64_t wide = *out;
  Count(v, key, target, limits, &wide);
  *out = static_cast<uint32_t>(wide);  // limits keep it within 32 bits
}

void Importer::Bytes(const Json& v, const std::string& key,
                     std::string_view target, const Limits& limits,
                     uint64_t* out) {
  std::optional<std::string> text =
      NumberText(v, key, target, FormatByteSize(*out));
  if (!text) return;
  Result<uint64_t> n = ParseByteSize(*text, limits);
  if (!n.ok()) {
    Issue(key, std::string(n.status().message()) + "; " + std::string(target) +
                   " keeps ztier's default " + FormatByteSize(*out));
    return;
  }
  *out = *n;
}

void Importer::Bool(const Json& v, const std::string& key,
                    std::string_view target, bool* out) {
  if (v.is_boolean()) {
    *out = v.get<bool>();
    return;
  }
  Issue(key, std::string(IsAuto(v) ? "\"auto\"" : v.type_name()) +
                 ", not true/false: " + std::string(target) +
                 " keeps ztier's default " + (*out ? "true" : "false") +
                 "; write true or false");
}

bool Importer::PathList(const Json& v, std::vector<std::string>* out) {
  std::vector<std::string> paths;
  if (v.is_string()) {
    paths.push_back(v.get<std::string>());
  } else if (v.is_array()) {
    for (const Json& p : v) {
      if (!p.is_string()) return false;
      paths.push_back(p.get<std::string>());
    }
  }
  if (paths.empty()) return false;
  // A literal $ in a path must not read as an expansion in ztier YAML;
  // ConfigToYaml escapes it.
  *out = std::move(paths);
  return true;
}

// DeepSpeed's stage: 0 (ZeRO off) when not given; anything but 0 to 3 is
// refused by DeepSpeed, so here too.
int Importer::Stage(const Json& zo, bool section_given) {
  const std::string key = "zero_optimization.stage";
  auto it = zo.find("stage");
  if (it == zo.end() || it->is_null()) {
    Note(section_given ? key + " not given: DeepSpeed's default is 0 (ZeRO off)"
                       : "no zero_optimization section: DeepSpeed runs without "
                         "ZeRO (stage 0)");
    return 0;
  }
  if (IsAuto(*it)) {
    Issue(key,
          "\"auto\" is read by DeepSpeed as not given, stage 0 (ZeRO off); "
          "write the stage the run uses");
    return 0;
  }
  if (it->is_number_integer() && it->get<int64_t>() >= 0 &&
      it->get<int64_t>() <= 3)
    return static_cast<int>(it->get<int64_t>());
  Error(key + ": " + it->dump() + " is not a ZeRO stage (valid: 0, 1, 2, 3)");
  return 0;
}

// The deprecated boolean `old_name` that stands for `name` {device: cpu},
// when given without `name` (DeepSpeed refuses the two together, whatever
// the boolean).
Offload Importer::OldSpelling(const Json& zo, const std::string& name,
                              const std::string& old_name, bool has_new) {
  const std::string key = "zero_optimization." + name;
  const std::string old_key = "zero_optimization." + old_name;
  Offload o{Json(nullptr), "", false};
  auto old = zo.find(old_name);
  if (old == zo.end() || old->is_null()) return o;
  if (has_new) {
    Error(old_key + ": cannot be given together with " + key +
          " (it is the old spelling of it, and DeepSpeed refuses both); "
          "remove " +
          old_name);
  } else if (IsAuto(*old)) {
    Issue(old_key,
          "\"auto\" is read by DeepSpeed as not given (no offload); "
          "write the " +
              name + " section the run uses");
  } else if (!old->is_boolean()) {
    Error(old_key + ": expected true or false, got " + old->dump() +
          " (better: write " + key + " {\"device\": \"cpu\"})");
  } else if (old->get<bool>()) {
    o = Offload{Json{{"device", "cpu"}}, old_key, true};
    Note(old_key + " is true: DeepSpeed reads it as " + key +
         " {device: cpu}, its old spelling");
  } else {
    Note(old_key + " is false: no offload, as DeepSpeed reads it");
  }
  return o;
}

// One offload section: `name`, else its old spelling; null when neither.
Offload Importer::Resolve(const Json& zo, const std::string& name,
                          const std::string& old_name) {
  const std::string key = "zero_optimization." + name;
  auto it = zo.find(name);
  const bool has_new = it != zo.end() && !it->is_null();
  Offload o = OldSpelling(zo, name, old_name, has_new);
  if (!has_new) return o;
  if (IsAuto(*it)) {
    Issue(key,
          "\"auto\" is read by DeepSpeed as not given (no offload); write the "
          "section the run uses");
  } else if (!it->is_object()) {
    Error(key + ": expected an object such as {\"device\": \"cpu\"}, got " +
          std::string(it->type_name()));
  } else {
    o = Offload{*it, key, false};
  }
  return o;
}

// The device an offload section names: none when absent or "auto" (DeepSpeed
// reads "auto" as not given). An unknown device is an error, as in DeepSpeed.
std::string Importer::DeviceOf(const Offload& o) {
  if (o.section.is_null()) return "none";
  auto it = o.section.find("device");
  if (it == o.section.end() || it->is_null()) {
    Note(o.key + ".device not given: DeepSpeed's default is none");
    return "none";
  }
  const std::string key = o.key + ".device";
  if (IsAuto(*it)) {
    Issue(key,
          "\"auto\" is read by DeepSpeed as not given, device none; write "
          "cpu or nvme");
    return "none";
  }
  if (it->is_string()) {
    std::string d = it->get<std::string>();
    if (d == "none" || d == "cpu" || d == "nvme") return d;
  }
  std::string error = key + ": " + it->dump() +
                      " is not an offload device (valid: none, cpu, nvme)";
  if (it->is_string()) {
    std::string lower = it->get<std::string>();
    for (char& c : lower)
      c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (lower == "none" || lower == "cpu" || lower == "nvme")
      error += "; DeepSpeed's names are lowercase: write \"" + lower + "\"";
  }
  Error(error);
  return "none";
}

// Parameters: offloaded only at stage 3 with device cpu or nvme; otherwise
// DeepSpeed keeps them on the GPU, which ztier has no tier for.
void Importer::Params(const Offload& o, int stage) {
  TiersConfig& t = r_.config.tiers;
  const std::string device = DeviceOf(o);
  const std::string gpu =
      "DeepSpeed keeps parameters on the GPU, which ztier has no tier for (it "
      "always offloads them): tiers.params is host, the nearest; ";
  if (stage < 3) {
    t.params = ParamTier::kHost;
    const std::string s = std::to_string(stage);
    if (device != "none") {
      Unmapped(o.key, "ignored by DeepSpeed below stage 3 (stage " + s +
                          "): " + gpu +
                          "set zero_optimization.stage to 3 "
                          "to offload parameters");
    } else {
      Issue("zero_optimization.stage",
            s + " (parameters are offloaded only at stage 3): " + gpu +
                "use stage 3 with offload_param.device cpu or nvme");
    }
    return;
  }
  if (device == "none") {
    t.params = ParamTier::kHost;
    if (o.section.is_null()) {
      Issue("zero_optimization.offload_param",
            "not given: " + gpu + "set offload_param.device to cpu or nvme");
    } else {
      Unmapped(o.key + ".device", "none: " + gpu + "set it to cpu or nvme");
    }
  } else {
    t.params = device == "nvme" ? ParamTier::kNvme : ParamTier::kHost;
  }
  if (!o.from_alias && !o.section.is_null())
    ParamKeys(o.section, o.key, t.params);
  if (t.params == ParamTier::kNvme && t.nvme.paths.empty()) {
    Note(
        "no NVMe path given: tiers.nvme.paths is left out, so ztier's "
        "default " +
        std::string(kDefaultNvmePath) + " applies");
  }
}

void Importer::ParamKeys(const Json& op, const std::string& base,
                         ParamTier tier) {
  constexpr std::string_view kKeys[] = {"device",       "nvme_path",
                                        "buffer_count", "buffer_size",
                                        "max_in_cpu",   "pin_memory"};
  TiersConfig& t = r_.config.tiers;
  for (auto it = op.begin(); it != op.end(); ++it) {
    const std::string& k = it.key();
    const Json& v = it.value();
    const std::string key = base + "." + k;
    if (k == "device") continue;
    if (k == "nvme_path") {
      if (tier == ParamTier::kHost) {
        // DeepSpeed ignores it too: nothing is lost.
        Note(key +
             " is ignored, as DeepSpeed ignores it: parameters are not "
             "on NVMe");
      } else if (!PathList(v, &t.nvme.paths)) {
        Unmapped(key,
                 "not a path or a list of paths: tiers.nvme.paths keeps "
                 "the default " +
                     std::string(kDefaultNvmePath) + "; write a directory");
      }
    } else if (k == "buffer_count") {
      Count32(v, key, "tiers.nvme.buffer_count", {1, 65536, false},
              &t.nvme.buffer_count);
    } else if (k == "buffer_size") {
      Count(v, key, "tiers.nvme.buffer_size", {1, 1'000'000'000'000ULL, false},
            &t.nvme.buffer_size);
    } else if (k == "max_in_cpu") {
      Count(v, key, "tiers.host.max_in_cpu", {0, kMaxElements, false},
            &t.host.max_in_cpu);
    } else if (k == "pin_memory") {
      Bool(v, key, "tiers.host.pin_memory", &t.host.pin_memory);
    } else {
      UnknownKey(key, k, kKeys, "not a key of DeepSpeed's offload_param (DeepSpeed rejects it)");
    }
  }
}

// Optimizer state: DeepSpeed offloads it at stages 1 to 3 with device cpu or
// nvme, and below stage 3 only to the CPU, whatever the device says.
bool Importer::Optimizer(const Offload& o, int stage) {
  OptimizerConfig& oc = r_.config.optimizer;
  const std::string device = DeviceOf(o);
  const std::string gpu =
      "DeepSpeed keeps the optimizer state on the GPU, which ztier's optimizer "
      "cannot (it keeps it on the host or NVMe): optimizer.tier is host, the "
      "nearest; ";
  const std::string fix =
      "set offload_optimizer.device to cpu or nvme, or train with an "
      "optimizer of your own (the optimizer section is then unused)";
  if (device == "none" || stage == 0) {
    oc.tier = OptimizerTier::kHost;
    if (device != "none") {
      Unmapped(o.key, "ignored by DeepSpeed at stage 0 (ZeRO off): " + gpu +
                          "set zero_optimization.stage to 1, 2 or 3");
    } else if (o.section.is_null()) {
      Issue("zero_optimization.offload_optimizer", "not given: " + gpu + fix);
    } else {
      Unmapped(o.key + ".device", "none: " + gpu + fix);
    }
    return false;
  }
  if (device == "nvme" && stage < 3) {
    oc.tier = OptimizerTier::kHost;
    Issue(o.key + ".device",
          "nvme at stage " + std::to_string(stage) +
              ": DeepSpeed offloads the optimizer state to the CPU below stage "
              "3, whatever the device, so optimizer.tier is host; use stage 3 "
              "for NVMe, or write device cpu");
  } else if (device == "nvme") {
    oc.tier = OptimizerTier::kNvme;
    // DeepSpeed swaps the gradient partitions out with the optimizer state.
    r_.config.tiers.gradients = GradTier::kNvme;
  } else {
    oc.tier = OptimizerTier::kHost;
  }
  if (!o.from_alias) OptimizerKeys(o.section, o.key);
  OptimizerPathNotes();
  return true;
}

void Importer::OptimizerKeys(const Json& oo, const std::string& base) {
  constexpr std::string_view kKeys[] = {
      "device",        "nvme_path",         "buffer_count", "pin_memory",
      "pipeline_read", "pipeline_write",    "fast_init",    "ratio",
      "super_offload", "cpuadam_cores_perc"};
  OptimizerConfig& o = r_.config.optimizer;
  for (auto it = oo.begin(); it != oo.end(); ++it) {
    const std::string& k = it.key();
    const Json& v = it.value();
    const std::string key = base + "." + k;
    if (k == "device") continue;
    if (k == "nvme_path") {
      if (o.tier == OptimizerTier::kHost) {
        Note(key +
             " is ignored, as DeepSpeed ignores it: the optimizer "
             "state is not on NVMe");
      } else if (!PathList(v, &o.paths)) {
        Unmapped(key,
                 "not a path or a list of paths: optimizer.paths is "
                 "left out, so the optimizer state goes to "
                 "tiers.nvme.paths; write a directory");
      }
    } else if (k == "buffer_count") {
      Count32(v, key, "optimizer.buffer_count", {1, 64, false},
              &o.buffer_count);
    } else if (k == "pin_memory") {
      Note(key + " is " + v.dump() +
           ": accepted; ztier's optimizer buffers are never pinned (the state "
           "never goes to the GPU, so pinning would only use up the memlock "
           "limit)");
    } else if (k == "pipeline_read" || k == "pipeline_write") {
      Note(key + " is " + v.dump() +
           ": accepted; ztier always pipelines optimizer-state reads and "
           "writes with the update (optimizer.buffer_count bounds how far)");
    } else if (k == "fast_init") {
      Note(key + " is " + v.dump() +
           ": accepted; ztier has no setting for how the optimizer state is "
           "initialized");
    } else if (k == "ratio") {
      // 1 is DeepSpeed's default: all of the state, as ztier does.
      if (!v.is_number() || v.get<double>() != 1.0)
        Unmapped(key, v.dump() +
                          ": partial offload is not supported, ztier "
                          "offloads all of the optimizer state; "
                          "remove it or write 1");
    } else if (k == "super_offload") {
      if (!v.is_boolean() || v.get<bool>())
        Unmapped(key, v.dump() + ": has no ztier equivalent; remove it");
    } else if (k == "cpuadam_cores_perc") {
      Note(key + " is " + v.dump() +
           ": ignored; DeepSpeed reads it only with super_offload (ztier's "
           "update threads are optimizer.threads)");
    } else {
      UnknownKey(key, k, kKeys,
                 "not a key of DeepSpeed's offload_optimizer (DeepSpeed rejects it)");
    }
  }
}

void Importer::OptimizerPathNotes() {
  const OptimizerConfig& o = r_.config.optimizer;
  if (o.tier != OptimizerTier::kNvme || !o.paths.empty()) return;
  if (r_.config.tiers.params == ParamTier::kNvme) {
    Note(
        "no NVMe path given for the optimizer: optimizer.paths is left out, "
        "so the optimizer state goes to tiers.nvme.paths");
  } else {
    Note(
        "no NVMe path given for the optimizer, and parameters are on the "
        "host: set optimizer.paths before creating an optimizer");
  }
}

void Importer::Knob(const KnobDef& knob, const Json& v,
                    const std::string& key) {
  CoordinatorConfig& cc = r_.config.coordinator;
  switch (knob.knob) {
    case Knob::kPrefetch:
      Count(v, key, "coordinator.prefetch_bucket_size",
            {0, kMaxElements, false}, &cc.prefetch_bucket_size);
      break;
    case Knob::kMaxLive:
      Count(v, key, "tiers.device.max_live_parameters", {1, kMaxElements, true},
            &r_.config.tiers.device.max_live_parameters);
      break;
    case Knob::kReuse:
      Count(v, key, "coordinator.max_reuse_distance", {0, kMaxElements, true},
            &cc.max_reuse_distance);
      break;
    case Knob::kParamPersist:
      Count(v, key, "coordinator.param_persistence_threshold",
            {0, kMaxElements, false}, &cc.param_persistence_threshold);
      break;
    case Knob::kModelPersist:
      // DeepSpeed's "no cap" is sys.maxsize (2^63 - 1): that is ztier's inf.
      if (v.is_number() && v.get<double>() >= 9.2e18) {
        cc.model_persistence_threshold = kInfinite;
      } else {
        Count(v, key, "coordinator.model_persistence_threshold",
              {0, kMaxElements, true}, &cc.model_persistence_threshold);
      }
      break;
  }
}

void Importer::ZeroOptimization(const Json& zo, bool section_given) {
  const std::string base = "zero_optimization";
  const int stage = Stage(zo, section_given);
  Params(Resolve(zo, "offload_param", "cpu_offload_param"), stage);
  const bool optimizer_offloaded =
      Optimizer(Resolve(zo, "offload_optimizer", "cpu_offload"), stage);
  bool has_sub_group_size = false;
  std::vector<std::string> outside;
  // Which knobs were given, to notice a stage3_ name and its alias both set.
  std::vector<std::string> knob_seen;
  for (auto it = zo.begin(); it != zo.end(); ++it) {
    const std::string& k = it.key();
    const Json& v = it.value();
    const std::string key = base + "." + k;
    if (k == "stage" || k == "offload_param" || k == "offload_optimizer" ||
        k == "cpu_offload" || k == "cpu_offload_param")
      continue;  // read above
    if (k == "cpu_offload_use_pin_memory") {
      Unmapped(key,
               "has no effect in DeepSpeed (an old key it only warns about); "
               "remove it and write pin_memory under offload_param");
    } else if (k == "zenflow") {
      Unmapped(key, "has no ztier equivalent; remove it");
    } else if (k == "sub_group_size") {
      has_sub_group_size = true;
      Count(v, key, "optimizer.sub_group_size", {1, 10'000'000'000ULL, false},
            &r_.config.optimizer.sub_group_size);
    } else if (Contains(kOutsideKeys, k)) {
      outside.push_back(k);
    } else {
      std::string_view name = k;
      if (name.rfind("stage3_", 0) == 0) name.remove_prefix(7);
      const KnobDef* knob = nullptr;
      for (const KnobDef& d : kKnobs) {
        if (d.name == name) knob = &d;
      }
      if (!knob) {
        std::vector<std::string_view> all(std::begin(kReadKeys),
                                          std::end(kReadKeys));
        for (const KnobDef& d : kKnobs) all.push_back(d.name);
        std::string near = Nearest(k, all);
        Unmapped(
            key,
            "not a DeepSpeed zero_optimization key (DeepSpeed "
            "rejects it); " +
                (near.empty() ? "remove it" : "did you mean '" + near + "'?"));
        continue;
      }
      if (Contains(knob_seen, name)) {
        Note(key +
             " repeats a setting already given under its other name: the "
             "later one wins");
      }
      knob_seen.emplace_back(name);
      Knob(*knob, v, key);
    }
  }
  if (optimizer_offloaded && !has_sub_group_size) {
    Note(
        "zero_optimization.sub_group_size not given: DeepSpeed's default is "
        "1e9 (12 GB per optimizer buffer), ztier's is 1e8 "
        "(optimizer.sub_group_size: 1e8)");
  }
  if (!outside.empty()) {
    std::string list;
    for (const std::string& k : outside) list += (list.empty() ? "" : ", ") + k;
    Note(
        "zero_optimization keys about communication or checkpointing, not "
        "about offload, ignored: " +
        list);
  }
}

// A DeepSpeed aio switch for a behaviour ztier always has: taken when it
// asks for that behaviour, not mapped otherwise.
void Importer::AioFlag(const Json& v, const std::string& key, bool ztier_value,
                       const std::string& why) {
  if (v.is_boolean() && v.get<bool>() == ztier_value) return;
  Unmapped(key, v.dump() + ": " + why + "; remove it");
}

void Importer::Aio(const Json& aio) {
  const std::string base = "aio";
  IoConfig& io = r_.config.io;
  for (auto it = aio.begin(); it != aio.end(); ++it) {
    const std::string& k = it.key();
    const Json& v = it.value();
    const std::string key = base + "." + k;
    if (k == "block_size") {
      Bytes(v, key, "io.block_size", {4096, 256ULL << 20, false},
            &io.block_size);
      if (io.block_size % 4096 != 0) {
        Issue(key, FormatByteSize(io.block_size) +
                       " is not a multiple of 4KiB (direct I/O needs it): "
                       "io.block_size keeps 1MiB; write a multiple of 4096");
        io.block_size = 1ULL << 20;
      }
    } else if (k == "queue_depth") {
      Count32(v, key, "io.queue_depth", {1, 4096, false}, &io.queue_depth);
    } else if (k == "intra_op_parallelism") {
      Count32(v, key, "io.threads", {1, 64, false}, &io.threads);
    } else if (k == "thread_count" || k == "num_threads") {
      Unmapped(key,
               "not read by DeepSpeed (its key is "
               "aio.intra_op_parallelism); rename it");
    } else if (k == "single_submit") {
      AioFlag(v, key, false, "ztier always submits requests in batches");
    } else if (k == "overlap_events") {
      AioFlag(v, key, true, "ztier always overlaps submission and completion");
    } else if (k == "use_gds") {
      AioFlag(v, key, false,
              "GPUDirect Storage is not supported, data moves through pinned "
              "host buffers");
    } else {
      constexpr std::string_view kKeys[] = {
          "block_size",    "queue_depth",    "intra_op_parallelism",
          "single_submit", "overlap_events", "use_gds"};
      UnknownKey(key, k, kKeys, "not a DeepSpeed aio key");
    }
  }
  if (!aio.contains("queue_depth")) {
    Note(
        "aio.queue_depth not given: DeepSpeed's default is 8, ztier's is 32 "
        "(io.queue_depth)");
  }
}

std::string JoinLines(const std::vector<std::string>& lines) {
  std::string s;
  for (const std::string& l : lines) s += (s.empty() ? "" : "\n") + l;
  return s;
}

Result<ImportResult> Importer::Run(std::string_view text,
                                   const ImportOptions& options) {
  Json root;
  try {
    root = Json::parse(text.begin(), text.end(), nullptr,
                       /*allow_exceptions=*/true,
                       /*ignore_comments=*/true);
  } catch (const Json::parse_error& e) {
    // e.what() is "[json.exception.parse_error.101] parse error at line L,
    // column C: ..."; keep the part after the bracketed id.
    std::string what = e.what();
    size_t cut = what.find("] ");
    return Status::InvalidArgument(
        "DeepSpeed config: JSON " +
        (cut == std::string::npos ? what : what.substr(cut + 2)));
  }
  if (!root.is_object()) {
    return Status::InvalidArgument(
        "DeepSpeed config: expected a JSON object, got " +
        std::string(root.type_name()));
  }
  std::vector<std::string> ignored;
  bool has_aio = false;
  bool has_zero = false;
  for (auto it = root.begin(); it != root.end(); ++it) {
    const std::string& k = it.key();
    const Json& v = it.value();
    if (k == "zero_optimization") {
      has_zero = true;
      if (v.is_object()) {
        ZeroOptimization(v, true);
      } else if (v.is_boolean()) {
        // DeepSpeed's oldest form: true is stage 1, false stage 0.
        Note("zero_optimization is " + v.dump() +
             ", DeepSpeed's old form of stage " + (v.get<bool>() ? "1" : "0"));
        ZeroOptimization(Json{{"stage", v.get<bool>() ? 1 : 0}}, true);
      } else {
        Error(
            "zero_optimization: expected an object such as {\"stage\": 3}, "
            "got " +
            std::string(v.type_name()));
      }
    } else if (k == "aio") {
      has_aio = true;
      if (v.is_object()) {
        Aio(v);
      } else if (!v.is_null()) {
        Unmapped(k, std::string(v.type_name()) +
                        ", not an object: ignored; write an object such as "
                        "{\"block_size\": 1048576}");
      }
    } else {
      ignored.push_back(k);
    }
  }
  if (!has_zero) ZeroOptimization(Json::object(), false);
  const bool uses_nvme = r_.config.tiers.params == ParamTier::kNvme ||
                         r_.config.optimizer.tier == OptimizerTier::kNvme;
  if (!has_aio && uses_nvme) {
    Note(
        "no aio section: ztier's io defaults apply (DeepSpeed's queue_depth "
        "default is 8, ztier's 32)");
  }
  if (!ignored.empty()) {
    std::string list;
    for (const std::string& k : ignored) list += (list.empty() ? "" : ", ") + k;
    Note("top-level keys not about offload, ignored: " + list);
  }
  if (!errors_.empty()) return Status::InvalidArgument(JoinLines(errors_));
  if (options.strict && !r_.issues.empty()) {
    return Status::InvalidArgument(
        "--strict: " + std::to_string(r_.issues.size()) + " DeepSpeed key" +
        (r_.issues.size() == 1 ? "" : "s") +
        " not mapped or not taken as given (without --strict they are "
        "notes):\n" +
        JoinLines(r_.issues));
  }
  return std::move(r_);
}

}  // namespace

Result<ImportResult> ImportDeepSpeedJson(std::string_view json_text,
                                         const ImportOptions& options) {
  try {
    Importer importer;
    return importer.Run(json_text, options);
  } catch (const std::exception& e) {
    // nlohmann throws type_error on misuse; none is expected.
    return Status::Internal(std::string("DeepSpeed import failed: ") +
                            e.what());
  }
}

}  // namespace ztier::tiering
