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

// The three names DeepSpeed versions have used for the aio parallelism, in
// the order this import prefers them when several disagree.
constexpr std::string_view kParallelismKeys[] = {"intra_op_parallelism",
                                                 "thread_count", "num_threads"};

class Importer {
 public:
  Result<ImportResult> Run(std::string_view text);

 private:
  void Note(std::string s) { r_.notes.push_back(std::move(s)); }
  void Unmapped(std::string key) { r_.unmapped_keys.push_back(std::move(key)); }
  // A JSON value as the text ztier's parsers read, or nullopt (noted).
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
  void OffloadParam(const Json& op);
  void OffloadOptimizer(const Json& oo);
  void ZeroOptimization(const Json& zo);
  void Aio(const Json& aio);

  ImportResult r_;
};

std::string Lower(std::string s) {
  for (char& c : s)
    c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

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
  if (v.is_string()) {
    std::string s = v.get<std::string>();
    if (Lower(s) == "auto") {
      Note(key + " is \"auto\" (filled in by the HF Trainer at run time): " +
           std::string(target) + " keeps ztier's default " + kept);
      return std::nullopt;
    }
    return s;
  }
  Note(key + " is " + std::string(v.type_name()) + ", not a number: " +
       std::string(target) + " keeps ztier's default " + kept);
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
    Note(key + ": " + std::string(n.status().message()) + "; " +
         std::string(target) + " keeps ztier's default " +
         FormatElementCount(*out));
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
    Note(key + ": " + std::string(n.status().message()) + "; " +
         std::string(target) + " keeps ztier's default " +
         FormatByteSize(*out));
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
  Note(key + " is " + std::string(v.type_name()) +
       ", not true/false: " + std::string(target) + " keeps ztier's default " +
       (*out ? "true" : "false"));
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

void Importer::OffloadParam(const Json& op) {
  const std::string base = "zero_optimization.offload_param";
  TiersConfig& t = r_.config.tiers;
  std::string device = "nvme";
  bool device_given = false;
  if (auto it = op.find("device"); it != op.end()) {
    device_given = true;
    device = it->is_string() ? Lower(it->get<std::string>()) : std::string("?");
    if (device == "nvme") {
      t.params = ParamTier::kNvme;
    } else if (device == "cpu") {
      t.params = ParamTier::kHost;
    } else if (device == "none") {
      t.params = ParamTier::kHost;
      Unmapped(base + ".device");
      Note(base +
           ".device is none (no parameter offload), which ztier does not have: "
           "tiers.params is host, the nearest setting");
    } else {
      Unmapped(base + ".device");
      Note(base + ".device " + it->dump() +
           " is not nvme, cpu or none: tiers.params keeps " +
           std::string(ParamTierName(t.params)));
    }
  }
  if (!device_given) {
    Note(base +
         ".device not given: DeepSpeed's default is none; tiers.params keeps "
         "nvme");
  }
  for (auto it = op.begin(); it != op.end(); ++it) {
    const std::string& k = it.key();
    const Json& v = it.value();
    std::string key = base + "." + k;
    if (k == "device") continue;
    if (k == "nvme_path") {
      if (t.params == ParamTier::kHost) {
        Unmapped(key);
        Note(key +
             " is ignored: parameters are offloaded to the host (device " +
             device + ")");
        continue;
      }
      if (!PathList(v, &t.nvme.paths)) {
        Unmapped(key);
        Note(key +
             " is not a path or a list of paths: tiers.nvme.paths keeps the "
             "default " +
             std::string(kDefaultNvmePath));
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
      Unmapped(key);
    }
  }
  if (!op.contains("pin_memory")) {
    Note(base +
         ".pin_memory not given: DeepSpeed's default is false, ztier's is true "
         "(tiers.host.pin_memory: true)");
  }
  if (t.params == ParamTier::kNvme && t.nvme.paths.empty()) {
    Note(
        "no NVMe path given: tiers.nvme.paths is left out, so ztier's "
        "default " +
        std::string(kDefaultNvmePath) + " applies");
  }
}

void Importer::OffloadOptimizer(const Json& oo) {
  const std::string base = "zero_optimization.offload_optimizer";
  OptimizerConfig& o = r_.config.optimizer;
  std::string device = "nvme";
  if (auto it = oo.find("device"); it != oo.end()) {
    device = it->is_string() ? Lower(it->get<std::string>()) : std::string("?");
    if (device == "nvme") {
      o.tier = OptimizerTier::kNvme;
      // DeepSpeed swaps the gradient partitions out with the optimizer state.
      r_.config.tiers.gradients = GradTier::kNvme;
    } else if (device == "cpu") {
      o.tier = OptimizerTier::kHost;
    } else if (device == "none") {
      o.tier = OptimizerTier::kHost;
      Unmapped(base + ".device");
      Note(base +
           ".device is none (optimizer state stays on the GPU), which ztier "
           "does not have: ztier keeps optimizer state on the host or NVMe; "
           "optimizer.tier is host, the nearest setting");
    } else {
      Unmapped(base + ".device");
      Note(base + ".device " + it->dump() +
           " is not nvme, cpu or none: optimizer.tier keeps " +
           std::string(OptimizerTierName(o.tier)));
    }
  } else {
    Note(base +
         ".device not given: DeepSpeed's default is none; optimizer.tier keeps "
         "nvme");
  }
  for (auto it = oo.begin(); it != oo.end(); ++it) {
    const std::string& k = it.key();
    const Json& v = it.value();
    std::string key = base + "." + k;
    if (k == "device") continue;
    if (k == "nvme_path") {
      if (o.tier == OptimizerTier::kHost) {
        Unmapped(key);
        Note(key + " is ignored: optimizer state is kept on the host (device " +
             device + ")");
      } else if (!PathList(v, &o.paths)) {
        Unmapped(key);
        Note(key +
             " is not a path or a list of paths: optimizer.paths is left out, "
             "so the optimizer state goes to tiers.nvme.paths");
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
      Unmapped(key);
      Note(key + " is " + v.dump() +
           ": not supported (partial offload); ztier offloads all of the "
           "optimizer state");
    } else {
      Unmapped(key);
    }
  }
}

void Importer::ZeroOptimization(const Json& zo) {
  const std::string base = "zero_optimization";
  CoordinatorConfig& cc = r_.config.coordinator;
  bool has_offload_param = false;
  bool has_offload_optimizer = false;
  bool has_sub_group_size = false;
  // Which knobs were given, to notice a stage3_ name and its alias both set.
  std::vector<std::string> knob_seen;
  for (auto it = zo.begin(); it != zo.end(); ++it) {
    const std::string& k = it.key();
    const Json& v = it.value();
    std::string key = base + "." + k;
    if (k == "stage") {
      if (!v.is_number_integer() || v.get<int64_t>() != 3) {
        Note(key + " is " + v.dump() +
             ": ztier's parameter offload follows ZeRO stage 3 (parameters "
             "partitioned)");
      }
      continue;
    }
    if (k == "offload_param") {
      if (!v.is_object()) {
        Unmapped(key);
        Note(key + " is not an object: ignored");
        continue;
      }
      has_offload_param = true;
      OffloadParam(v);
      continue;
    }
    if (k == "offload_optimizer") {
      if (!v.is_object()) {
        Unmapped(key);
        Note(key + " is not an object: ignored");
        continue;
      }
      has_offload_optimizer = true;
      OffloadOptimizer(v);
      continue;
    }
    if (k == "sub_group_size") {
      has_sub_group_size = true;
      Count(v, key, "optimizer.sub_group_size", {1, 10'000'000'000ULL, false},
            &r_.config.optimizer.sub_group_size);
      continue;
    }
    std::string_view name = k;
    if (name.rfind("stage3_", 0) == 0) name.remove_prefix(7);
    const KnobDef* knob = nullptr;
    for (const KnobDef& d : kKnobs) {
      if (d.name == name) knob = &d;
    }
    if (!knob) {
      Unmapped(key);
      continue;
    }
    if (std::find(knob_seen.begin(), knob_seen.end(), std::string(name)) !=
        knob_seen.end()) {
      Note(key +
           " repeats a setting already given under its other name: the later "
           "one wins");
    }
    knob_seen.emplace_back(name);
    switch (knob->knob) {
      case Knob::kPrefetch:
        Count(v, key, "coordinator.prefetch_bucket_size",
              {0, kMaxElements, false}, &cc.prefetch_bucket_size);
        break;
      case Knob::kMaxLive:
        Count(v, key, "tiers.device.max_live_parameters",
              {1, kMaxElements, true},
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
      case Knob::kModelPersist: {
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
  }
  if (!has_offload_param) {
    Note(
        "no zero_optimization.offload_param: DeepSpeed would keep parameters "
        "on the GPU; "
        "the ztier config keeps its default tiers.params: nvme");
  }
  if (!has_offload_optimizer) {
    Note(
        "no zero_optimization.offload_optimizer: DeepSpeed would keep "
        "optimizer state on the GPU; the ztier config keeps its default "
        "optimizer.tier: nvme");
  }
  const OptimizerConfig& o = r_.config.optimizer;
  if (has_offload_optimizer && o.tier == OptimizerTier::kNvme &&
      o.paths.empty()) {
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
  if (has_offload_optimizer && !has_sub_group_size) {
    Note(
        "zero_optimization.sub_group_size not given: DeepSpeed's default is "
        "1e9 (12 GB per optimizer buffer), ztier's is 1e8 "
        "(optimizer.sub_group_size: 1e8)");
  }
}

void Importer::Aio(const Json& aio) {
  const std::string base = "aio";
  IoConfig& io = r_.config.io;
  std::optional<std::pair<std::string, uint64_t>> threads;  // key, value taken
  for (auto it = aio.begin(); it != aio.end(); ++it) {
    const std::string& k = it.key();
    const Json& v = it.value();
    std::string key = base + "." + k;
    if (k == "block_size") {
      Bytes(v, key, "io.block_size", {4096, 256ULL << 20, false},
            &io.block_size);
      if (io.block_size % 4096 != 0) {
        Note(key + ": " + FormatByteSize(io.block_size) +
             " is not a multiple of 4KiB (direct I/O needs it): io.block_size "
             "keeps 1MiB");
        io.block_size = 1ULL << 20;
      }
    } else if (k == "queue_depth") {
      Count32(v, key, "io.queue_depth", {1, 4096, false}, &io.queue_depth);
    } else if (std::find(std::begin(kParallelismKeys),
                         std::end(kParallelismKeys),
                         k) != std::end(kParallelismKeys)) {
      uint32_t n = io.threads;
      Count32(v, key, "io.threads", {1, 64, false}, &n);
      auto rank = [](std::string_view name) {
        return std::find(std::begin(kParallelismKeys),
                         std::end(kParallelismKeys), name) -
               std::begin(kParallelismKeys);
      };
      if (!threads) {
        threads.emplace(key, n);
        io.threads = n;
      } else if (threads->second != n) {
        std::string first = threads->first;
        bool take = rank(k) < rank(first.substr(base.size() + 1));
        std::string used = take ? key : first;
        Note(key + " (" + std::to_string(n) + ") and " + first + " (" +
             std::to_string(threads->second) +
             ") disagree: io.threads follows " + used);
        if (take) {
          threads.emplace(key, n);
          io.threads = n;
        }
      }
    } else if (k == "single_submit") {
      Unmapped(key);
      Note(
          key +
          " has no ztier equivalent: ztier always submits requests in batches");
    } else if (k == "overlap_events") {
      Unmapped(key);
      Note(key +
           " has no ztier equivalent: ztier always overlaps submission and "
           "completion");
    } else if (k == "use_gds") {
      Unmapped(key);
      Note(key +
           " (GPUDirect Storage) is not supported: data moves through pinned "
           "host "
           "buffers");
    } else {
      Unmapped(key);
    }
  }
  if (!aio.contains("queue_depth")) {
    Note(
        "aio.queue_depth not given: DeepSpeed's default is 8, ztier's is 32 "
        "(io.queue_depth)");
  }
}

Result<ImportResult> Importer::Run(std::string_view text) {
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
  for (auto it = root.begin(); it != root.end(); ++it) {
    const std::string& k = it.key();
    const Json& v = it.value();
    if (k == "zero_optimization") {
      if (v.is_object()) {
        ZeroOptimization(v);
      } else {
        Unmapped(k);
        Note("zero_optimization is " + std::string(v.type_name()) +
             ", not an object: ignored");
      }
    } else if (k == "aio") {
      has_aio = true;
      if (v.is_object()) {
        Aio(v);
      } else {
        Unmapped(k);
        Note("aio is " + std::string(v.type_name()) +
             ", not an object: ignored");
      }
    } else {
      ignored.push_back(k);
    }
  }
  if (!root.contains("zero_optimization")) {
    Note("no zero_optimization section: the ztier config is all defaults");
  }
  if (!has_aio) {
    Note(
        "no aio section: ztier's io defaults apply (DeepSpeed's queue_depth "
        "default is 8, "
        "ztier's 32)");
  }
  if (!ignored.empty()) {
    std::string list;
    for (const std::string& k : ignored) list += (list.empty() ? "" : ", ") + k;
    Note("top-level keys not about offload, ignored: " + list);
  }
  return std::move(r_);
}

}  // namespace

Result<ImportResult> ImportDeepSpeedJson(std::string_view json_text) {
  try {
    Importer importer;
    return importer.Run(json_text);
  } catch (const std::exception& e) {
    // nlohmann throws type_error on misuse; none is expected.
    return Status::Internal(std::string("DeepSpeed import failed: ") +
                            e.what());
  }
}

}  // namespace ztier::tiering
