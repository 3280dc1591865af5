#include "tiering/config.h"

#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <span>
#include <sstream>
#include <tuple>

namespace ztier::tiering {
namespace {

namespace fs = std::filesystem;

// ---------------------------------------------------------------------------
// Schema: the keys of each section, in the order ConfigToYaml writes them.

constexpr std::string_view kTopKeys[] = {"tiers", "io",        "coordinator",
                                         "comm",  "integrity", "optimizer"};
constexpr std::string_view kTiersKeys[] = {"params", "gradients", "device", "host", "nvme"};
constexpr std::string_view kDeviceKeys[] = {"max_live_parameters"};
constexpr std::string_view kHostKeys[] = {"pin_memory", "max_in_cpu",
                                          "allow_unpinned"};
constexpr std::string_view kNvmeKeys[] = {
    "paths", "buffer_count", "buffer_size", "buffer_element_bytes"};
constexpr std::string_view kIoKeys[] = {
    "backend",          "block_size", "queue_depth", "threads",
    "register_buffers", "sqpoll",     "direct"};
constexpr std::string_view kCoordinatorKeys[] = {
    "prefetch_bucket_size",        "max_reuse_distance",
    "param_persistence_threshold", "model_persistence_threshold",
    "max_ongoing_fetch_events",    "nvme_lookahead",
    "trace_policy",                "trace_orders"};
constexpr std::string_view kCommKeys[] = {"backend", "timeout"};
constexpr std::string_view kIntegrityKeys[] = {"checksum"};
constexpr std::string_view kOptimizerKeys[] = {
    "tier", "paths", "buffer_count", "sub_group_size", "threads", "isa"};

struct SectionDef {
  std::string_view path;
  std::span<const std::string_view> keys;
};
constexpr SectionDef kSections[] = {
    {"", kTopKeys},
    {"tiers", kTiersKeys},
    {"tiers.device", kDeviceKeys},
    {"tiers.host", kHostKeys},
    {"tiers.nvme", kNvmeKeys},
    {"io", kIoKeys},
    {"coordinator", kCoordinatorKeys},
    {"comm", kCommKeys},
    {"integrity", kIntegrityKeys},
    {"optimizer", kOptimizerKeys},
};

// Ranges. The same constants drive the loader and ValidateConfig.
constexpr Limits kMaxLiveLimits{1, kMaxElements, true};
constexpr Limits kMaxInCpuLimits{0, kMaxElements, false};
constexpr Limits kBufferCountLimits{1, 65536, false};
// 10^12 elements per buffer (2 TB at fp16) keeps count * size * bytes in
// 64 bits.
constexpr Limits kBufferSizeLimits{1, 1'000'000'000'000ULL, false};
constexpr Limits kElementBytesLimits{1, 8, false};
constexpr uint64_t kBlockAlign = 4096;  // direct I/O alignment, bytes
constexpr Limits kBlockSizeLimits{4096, 256ULL << 20, false};
constexpr Limits kQueueDepthLimits{1, 4096, false};
constexpr Limits kThreadsLimits{1, 64, false};
constexpr Limits kPrefetchLimits{0, kMaxElements, false};
constexpr Limits kReuseLimits{0, kMaxElements, true};
constexpr Limits kParamPersistLimits{0, kMaxElements, false};
constexpr Limits kModelPersistLimits{0, kMaxElements, true};
constexpr Limits kFetchEventsLimits{1, 1024, false};
constexpr Limits kLookaheadLimits{0, kMaxElements, false};
// Seconds: at least one (a zero timeout fails every wait), at most a day.
constexpr Limits kCommTimeoutLimits{1, 86400, false};
constexpr Limits kTraceOrdersLimits{1, 64, false};
// Optimizer: a sub-group of 1e10 elements is 120 GB of state per buffer (ten
// times DeepSpeed's default sub-group), and 64 such buffers are 7.7 TB, so
// buffer_count * sub_group_size * 12 stays far within 64 bits.
constexpr Limits kOptimizerBufferCountLimits{1, 64, false};
constexpr Limits kSubGroupSizeLimits{1, 10'000'000'000ULL, false};
constexpr Limits kOptimizerThreadsLimits{0, 1024, false};
// Bytes of optimizer state per element: fp32 master weight and Adam's two
// fp32 moments.
constexpr uint64_t kOptimizerStateBytes = 12;
// Bytes of the header in front of each optimizer buffer's state.
constexpr uint64_t kOptimizerBufferHeader = 4096;

template <typename E>
struct EnumName {
  std::string_view name;
  E value;
};
constexpr EnumName<ParamTier> kParamTierNames[] = {{"nvme", ParamTier::kNvme},
                                                   {"host", ParamTier::kHost}};
constexpr EnumName<GradTier> kGradTierNames[] = {{"host", GradTier::kHost},
                                                 {"nvme", GradTier::kNvme}};
constexpr EnumName<io::BackendKind> kIoBackendNames[] = {
    {"auto", io::BackendKind::kAuto},
    {"io_uring", io::BackendKind::kIoUring},
    {"libaio", io::BackendKind::kLibaio},
    {"psync", io::BackendKind::kPsync}};
constexpr EnumName<CommBackend> kCommNames[] = {{"auto", CommBackend::kAuto},
                                                {"nccl", CommBackend::kNccl},
                                                {"local", CommBackend::kLocal},
                                                {"gloo", CommBackend::kGloo}};
constexpr EnumName<TracePolicy> kTracePolicyNames[] = {
    {"adaptive", TracePolicy::kAdaptive}, {"single", TracePolicy::kSingle}};
constexpr EnumName<Checksum> kChecksumNames[] = {{"crc32c", Checksum::kCrc32c},
                                                 {"none", Checksum::kNone}};
constexpr EnumName<OptimizerTier> kOptimizerTierNames[] = {
    {"nvme", OptimizerTier::kNvme}, {"host", OptimizerTier::kHost}};
constexpr EnumName<OptimizerIsa> kOptimizerIsaNames[] = {
    {"auto", OptimizerIsa::kAuto},
    {"avx512", OptimizerIsa::kAvx512},
    {"avx2", OptimizerIsa::kAvx2},
    {"scalar", OptimizerIsa::kScalar}};

template <typename E, size_t N>
std::string_view NameOf(const EnumName<E> (&names)[N], E v) {
  for (const auto& n : names) {
    if (n.value == v) return n.name;
  }
  return "?";
}

template <typename E, size_t N>
std::string NameList(const EnumName<E> (&names)[N]) {
  std::string s;
  for (const auto& n : names) {
    if (!s.empty()) s += ", ";
    s += n.name;
  }
  return s;
}

std::string Join(std::string_view section, std::string_view key) {
  if (section.empty()) return std::string(key);
  std::string s(section);
  s += '.';
  s += key;
  return s;
}

std::string Lower(std::string_view s) {
  std::string r(s);
  for (char& c : r)
    c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return r;
}

// The candidate nearest to `word` if it is close enough to be a typo: at
// most a third of the word's letters (at least one) differ.
std::optional<std::string_view> Nearest(
    std::string_view word, std::span<const std::string_view> candidates) {
  std::string w = Lower(word);
  size_t best = SIZE_MAX;
  std::optional<std::string_view> best_name;
  for (std::string_view c : candidates) {
    size_t d = EditDistance(w, c);
    if (d < best) {
      best = d;
      best_name = c;
    }
  }
  size_t threshold = std::max<size_t>(1, word.size() / 3);
  if (best_name && best <= threshold) return best_name;
  return std::nullopt;
}

// The hint for an unknown key `key` in section `section`.
std::string UnknownKeyHint(std::string_view section, std::string_view key) {
  const SectionDef* here = nullptr;
  for (const SectionDef& s : kSections) {
    if (s.path == section) here = &s;
  }
  if (here) {
    if (auto near = Nearest(key, here->keys)) {
      return " (did you mean '" + std::string(*near) + "'?)";
    }
  }
  // The right key in the wrong section: name where it belongs.
  for (const SectionDef& s : kSections) {
    if (&s == here) continue;
    for (std::string_view k : s.keys) {
      if (k == Lower(key)) return " (did you mean '" + Join(s.path, k) + "'?)";
    }
  }
  if (!here) return "";
  std::string list;
  for (std::string_view k : here->keys) {
    if (!list.empty()) list += ", ";
    list += k;
  }
  return " (valid keys" + std::string(section.empty() ? "" : " in ") +
         std::string(section) + ": " + list + ")";
}

// ---------------------------------------------------------------------------
// Checks shared by the loader and ValidateConfig. Each returns an error
// message (no key path) or nullopt.

std::optional<std::string> CheckNvmePath(const std::string& p) {
  if (p.empty())
    return "empty NVMe path (did an environment variable expand to nothing?)";
  std::error_code ec;
  fs::path path(p);
  fs::file_status st = fs::status(path, ec);
  if (fs::exists(st)) {
    if (!fs::is_directory(st))
      return "NVMe path '" + p + "' exists and is not a directory";
    if (access(p.c_str(), W_OK | X_OK) != 0) {
      return "NVMe path '" + p + "' is not a writable directory";
    }
    return std::nullopt;
  }
  // The path is created by the store; its parent must be there (a missing
  // parent usually means a drive that is not mounted).
  fs::path norm = path.lexically_normal();
  if (!norm.has_filename()) norm = norm.parent_path();
  fs::path parent = norm.parent_path();
  if (parent.empty()) parent = ".";
  fs::file_status pst = fs::status(parent, ec);
  if (!fs::exists(pst)) {
    return "parent directory '" + parent.string() + "' of NVMe path '" + p +
           "' does not exist (mount the drive or create the directory)";
  }
  if (!fs::is_directory(pst)) {
    return "parent '" + parent.string() + "' of NVMe path '" + p +
           "' is not a directory";
  }
  return std::nullopt;
}

struct CrossError {
  std::string path;  // key path the error is reported at
  std::string message;
};

// Rules that involve more than one key.
std::vector<CrossError> CrossCheck(const Config& c) {
  std::vector<CrossError> errors;
  if (c.tiers.params == ParamTier::kNvme && c.tiers.nvme.paths.empty()) {
    errors.push_back({"tiers.nvme.paths",
                      "at least one path is needed when tiers.params is nvme "
                      "(for host-only offload write tiers.params: host)"});
  }
  if (c.io.sqpoll && c.io.backend != io::BackendKind::kAuto &&
      c.io.backend != io::BackendKind::kIoUring) {
    errors.push_back(
        {"io.sqpoll", "sqpoll needs the io_uring backend (io.backend is " +
                          std::string(IoBackendConfigName(c.io.backend)) +
                          ")"});
  }
  return errors;
}

// The path two spellings of one directory share ("./x/" and "x").
std::string NormalKey(const std::string& p) {
  fs::path norm = fs::path(p).lexically_normal();
  if (!norm.has_filename() && norm.has_parent_path() &&
      norm != norm.root_path()) {
    norm = norm.parent_path();
  }
  return norm.string();
}

// ---------------------------------------------------------------------------
// The loader.

struct Pos {
  int line = 0;  // 1-based; 0: unknown
  int column = 0;
};

Pos PosOf(const YAML::Mark& m) {
  if (m.is_null()) return {};
  return {m.line + 1, m.column + 1};
}

std::string_view KindName(const YAML::Node& n) {
  switch (n.Type()) {
    case YAML::NodeType::Map:
      return "a mapping";
    case YAML::NodeType::Sequence:
      return "a list";
    case YAML::NodeType::Null:
      return "nothing";
    case YAML::NodeType::Scalar:
      return "a single value";
    default:
      return "an undefined node";
  }
}

class Loader {
 public:
  Loader(std::string_view source, const LoadOptions& options)
      : source_(source.empty() ? "<config>" : source), options_(options) {}

  Result<Config> Run(std::string_view yaml);

 private:
  struct Entry {
    YAML::Node key;
    YAML::Node value;
    Pos key_pos;
    Pos value_pos;  // the key's position when the value is empty
  };
  // Keys of one mapping in document order (duplicates already reported).
  using Entries = std::vector<std::pair<std::string, Entry>>;

  struct ErrorLine {
    Pos pos;
    std::string text;  // "path: message"
  };

  void Err(Pos pos, std::string_view path, std::string_view msg) {
    std::string text(path);
    if (!text.empty()) text += ": ";
    text += msg;
    errors_.push_back({pos, std::move(text)});
  }

  Entries Section(const YAML::Node& node, Pos where, std::string_view path);
  static const Entry* Find(const Entries& e, std::string_view key);
  // The env-expanded text of a scalar value, or nullopt (error reported).
  std::optional<std::string> Scalar(const Entry& e, std::string_view path,
                                    std::string_view expected);
  void Bool(const Entries& es, std::string_view section, std::string_view key,
            bool* out);
  template <typename T>
  void Count(const Entries& es, std::string_view section, std::string_view key,
             const Limits& limits, T* out);
  void Bytes(const Entries& es, std::string_view section, std::string_view key,
             const Limits& limits, uint64_t* out);
  template <typename E, size_t N>
  void Enum(const Entries& es, std::string_view section, std::string_view key,
            const EnumName<E> (&names)[N], E* out);
  // The `paths` key of `section` (tiers.nvme, optimizer).
  void Paths(const Entries& es, std::string_view section,
             std::vector<std::string>* out);
  void Lookahead(const Entries& es, std::optional<uint64_t>* out);
  // Remembers where a key's value was, for errors found after parsing.
  void Seen(std::string path, Pos pos) { seen_[std::move(path)] = pos; }
  Pos WhereIs(const std::string& path) const;

  std::string source_;
  LoadOptions options_;
  std::vector<ErrorLine> errors_;
  std::map<std::string, Pos> seen_;
};

const Loader::Entry* Loader::Find(const Entries& es, std::string_view key) {
  for (const auto& [k, e] : es) {
    if (k == key) return &e;
  }
  return nullptr;
}

Pos Loader::WhereIs(const std::string& path) const {
  // The key itself, else the nearest enclosing section that was written.
  std::string p = path;
  for (;;) {
    auto it = seen_.find(p);
    if (it != seen_.end()) return it->second;
    size_t dot = p.rfind('.');
    if (dot == std::string::npos) break;
    p.resize(dot);
  }
  return {1, 1};
}

Loader::Entries Loader::Section(const YAML::Node& node, Pos where,
                                std::string_view path) {
  Entries out;
  if (node.IsNull()) return out;  // "host:" alone: all defaults
  if (!node.IsMap()) {
    Err(where, path.empty() ? "config" : path,
        "expected a mapping of keys, got " + std::string(KindName(node)));
    return out;
  }
  const SectionDef* def = nullptr;
  for (const SectionDef& s : kSections) {
    if (s.path == path) def = &s;
  }
  for (auto it = node.begin(); it != node.end(); ++it) {
    Entry e{it->first, it->second, PosOf(it->first.Mark()), Pos{}};
    e.value_pos = e.value.IsNull() ? e.key_pos : PosOf(e.value.Mark());
    if (!e.key.IsScalar()) {
      Err(e.key_pos, path,
          "keys must be plain names, got " + std::string(KindName(e.key)));
      continue;
    }
    const std::string& key = e.key.Scalar();
    std::string full = Join(path, key);
    bool known = def && std::find(def->keys.begin(), def->keys.end(), key) !=
                            def->keys.end();
    if (!known) {
      Err(e.key_pos, full, "unknown key" + UnknownKeyHint(path, key));
      continue;
    }
    if (const Entry* first = Find(out, key)) {
      Err(e.key_pos, full,
          "duplicate key (first given at line " +
              std::to_string(first->key_pos.line) + ", column " +
              std::to_string(first->key_pos.column) + ")");
      continue;
    }
    Seen(full, e.value_pos);
    out.emplace_back(key, std::move(e));
  }
  return out;
}

std::optional<std::string> Loader::Scalar(const Entry& e, std::string_view path,
                                          std::string_view expected) {
  if (e.value.IsNull()) {
    Err(e.value_pos, path,
        "missing value (expected " + std::string(expected) + ")");
    return std::nullopt;
  }
  if (!e.value.IsScalar()) {
    Err(e.value_pos, path,
        "expected " + std::string(expected) + ", got " +
            std::string(KindName(e.value)));
    return std::nullopt;
  }
  Result<std::string> text = ExpandEnv(e.value.Scalar());
  if (!text.ok()) {
    Err(e.value_pos, path, text.status().message());
    return std::nullopt;
  }
  return std::move(text).value();
}

void Loader::Bool(const Entries& es, std::string_view section,
                  std::string_view key, bool* out) {
  const Entry* e = Find(es, key);
  if (!e) return;
  std::string path = Join(section, key);
  std::optional<std::string> s = Scalar(*e, path, "true or false");
  if (!s) return;
  if (*s == "true" || *s == "True" || *s == "TRUE") {
    *out = true;
  } else if (*s == "false" || *s == "False" || *s == "FALSE") {
    *out = false;
  } else {
    Err(e->value_pos, path, "expected true or false, got '" + *s + "'");
  }
}

template <typename T>
void Loader::Count(const Entries& es, std::string_view section,
                   std::string_view key, const Limits& limits, T* out) {
  const Entry* e = Find(es, key);
  if (!e) return;
  std::string path = Join(section, key);
  std::optional<std::string> s = Scalar(*e, path, "a whole number");
  if (!s) return;
  Result<uint64_t> v = ParseElementCount(*s, limits);
  if (!v.ok()) {
    Err(e->value_pos, path, v.status().message());
    return;
  }
  *out = static_cast<T>(*v);
}

void Loader::Bytes(const Entries& es, std::string_view section,
                   std::string_view key, const Limits& limits, uint64_t* out) {
  const Entry* e = Find(es, key);
  if (!e) return;
  std::string path = Join(section, key);
  std::optional<std::string> s =
      Scalar(*e, path, "a byte size such as 4096 or 1MiB");
  if (!s) return;
  Result<uint64_t> v = ParseByteSize(*s, limits);
  if (!v.ok()) {
    Err(e->value_pos, path, v.status().message());
    return;
  }
  *out = *v;
}

template <typename E, size_t N>
void Loader::Enum(const Entries& es, std::string_view section,
                  std::string_view key, const EnumName<E> (&names)[N], E* out) {
  const Entry* e = Find(es, key);
  if (!e) return;
  std::string path = Join(section, key);
  std::string expected = "one of " + NameList(names);
  std::optional<std::string> s = Scalar(*e, path, expected);
  if (!s) return;
  for (const auto& n : names) {
    if (n.name == *s) {
      *out = n.value;
      return;
    }
  }
  std::string msg = "expected " + expected + ", got '" + *s + "'";
  std::vector<std::string_view> candidates;
  for (const auto& n : names) candidates.push_back(n.name);
  if (auto near = Nearest(*s, candidates))
    msg += " (did you mean '" + std::string(*near) + "'?)";
  Err(e->value_pos, path, msg);
}

void Loader::Paths(const Entries& es, std::string_view section,
                   std::vector<std::string>* out) {
  const Entry* e = Find(es, "paths");
  if (!e) return;
  const std::string path = Join(section, "paths");
  if (!e->value.IsSequence()) {
    if (e->value.IsScalar()) {
      Err(e->value_pos, path,
          "expected a list of directories, got a single value (write [" +
              e->value.Scalar() + "])");
    } else {
      Err(e->value_pos, path,
          "expected a list of directories, got " +
              std::string(KindName(e->value)));
    }
    return;
  }
  std::vector<std::string> paths;
  std::map<std::string, size_t> index_of;
  for (size_t i = 0; i < e->value.size(); ++i) {
    YAML::Node item = e->value[i];
    std::string item_path = path + "[" + std::to_string(i) + "]";
    Entry ie{e->key, item, e->key_pos,
             item.IsNull() ? e->value_pos : PosOf(item.Mark())};
    std::optional<std::string> s = Scalar(ie, item_path, "a directory path");
    if (!s) continue;
    std::string norm = NormalKey(*s);
    if (auto it = index_of.find(norm); it != index_of.end()) {
      Err(ie.value_pos, item_path,
          "duplicate NVMe path '" + *s + "' (also paths[" +
              std::to_string(it->second) + "])");
      continue;
    }
    index_of[norm] = i;
    if (options_.check_paths) {
      if (auto bad = CheckNvmePath(*s)) {
        Err(ie.value_pos, item_path, *bad);
        continue;
      }
    }
    paths.push_back(std::move(*s));
  }
  *out = std::move(paths);
}

void Loader::Lookahead(const Entries& es, std::optional<uint64_t>* out) {
  const Entry* e = Find(es, "nvme_lookahead");
  if (!e) return;
  const std::string path = "coordinator.nvme_lookahead";
  std::optional<std::string> s =
      Scalar(*e, path, "auto or a whole number of elements");
  if (!s) return;
  if (*s == "auto") {
    out->reset();
    return;
  }
  Result<uint64_t> v = ParseElementCount(*s, kLookaheadLimits);
  if (!v.ok()) {
    std::string_view m = v.status().message();
    if (m.rfind("expected", 0) == 0) {
      Err(e->value_pos, path,
          "expected auto or a whole number of elements such as 2e8, got '" +
              *s + "'");
    } else {
      Err(e->value_pos, path, m);
    }
    return;
  }
  *out = *v;
}

Result<Config> Loader::Run(std::string_view yaml) {
  std::vector<YAML::Node> docs;
  try {
    docs = YAML::LoadAll(std::string(yaml));
  } catch (const YAML::ParserException& e) {
    Err(PosOf(e.mark), "", "YAML syntax error: " + e.msg);
  }
  Config c;
  if (errors_.empty() && docs.size() > 1) {
    Err({1, 1}, "",
        "expected one YAML document, found " + std::to_string(docs.size()));
  }
  YAML::Node root = docs.empty() ? YAML::Node() : docs.front();
  if (errors_.empty() && !root.IsNull() && !root.IsMap()) {
    Err(PosOf(root.Mark()), "",
        "a config is a mapping of sections (tiers, io, coordinator, comm, "
        "integrity, optimizer), got " +
            std::string(KindName(root)));
  }
  if (errors_.empty()) {
    Entries top = Section(root, {1, 1}, "");
    auto sub = [&](const Entries& es, std::string_view parent,
                   std::string_view key) -> Entries {
      const Entry* e = Find(es, key);
      if (!e) return {};
      return Section(e->value, e->value_pos, Join(parent, key));
    };

    Entries tiers = sub(top, "", "tiers");
    Enum(tiers, "tiers", "params", kParamTierNames, &c.tiers.params);
    Enum(tiers, "tiers", "gradients", kGradTierNames, &c.tiers.gradients);
    Entries device = sub(tiers, "tiers", "device");
    Count(device, "tiers.device", "max_live_parameters", kMaxLiveLimits,
          &c.tiers.device.max_live_parameters);
    Entries host = sub(tiers, "tiers", "host");
    Bool(host, "tiers.host", "pin_memory", &c.tiers.host.pin_memory);
    Count(host, "tiers.host", "max_in_cpu", kMaxInCpuLimits,
          &c.tiers.host.max_in_cpu);
    Bool(host, "tiers.host", "allow_unpinned", &c.tiers.host.allow_unpinned);
    Entries nvme = sub(tiers, "tiers", "nvme");
    Paths(nvme, "tiers.nvme", &c.tiers.nvme.paths);
    Count(nvme, "tiers.nvme", "buffer_count", kBufferCountLimits,
          &c.tiers.nvme.buffer_count);
    Count(nvme, "tiers.nvme", "buffer_size", kBufferSizeLimits,
          &c.tiers.nvme.buffer_size);
    uint32_t element_bytes = c.tiers.nvme.buffer_element_bytes;
    Count(nvme, "tiers.nvme", "buffer_element_bytes", kElementBytesLimits,
          &element_bytes);
    if (element_bytes == 1 || element_bytes == 2 || element_bytes == 4 ||
        element_bytes == 8) {
      c.tiers.nvme.buffer_element_bytes = element_bytes;
    } else {
      Err(WhereIs("tiers.nvme.buffer_element_bytes"),
          "tiers.nvme.buffer_element_bytes",
          "expected 1, 2, 4 or 8, got " + std::to_string(element_bytes));
    }
    // No paths key: the default path, when the params need one.
    if (!Find(nvme, "paths") && c.tiers.params == ParamTier::kNvme) {
      Result<std::string> def = ExpandEnv(kDefaultNvmePath);
      if (!def.ok()) {
        Err(WhereIs("tiers.nvme"), "tiers.nvme.paths", def.status().message());
      } else {
        std::optional<std::string> bad;
        if (options_.check_paths) bad = CheckNvmePath(*def);
        if (bad) {
          Err(WhereIs("tiers.nvme"), "tiers.nvme.paths",
              *bad + " (the default path " + std::string(kDefaultNvmePath) +
                  "; set ZTIER_NVME_PATH or tiers.nvme.paths)");
        } else {
          c.tiers.nvme.paths = {std::move(def).value()};
        }
      }
    }

    Entries io = sub(top, "", "io");
    Enum(io, "io", "backend", kIoBackendNames, &c.io.backend);
    Bytes(io, "io", "block_size", kBlockSizeLimits, &c.io.block_size);
    if (c.io.block_size % kBlockAlign != 0) {
      Err(WhereIs("io.block_size"), "io.block_size",
          FormatByteSize(c.io.block_size) +
              " is not a multiple of 4KiB (direct I/O needs 4 KiB-aligned "
              "requests)");
    }
    Count(io, "io", "queue_depth", kQueueDepthLimits, &c.io.queue_depth);
    Count(io, "io", "threads", kThreadsLimits, &c.io.threads);
    Bool(io, "io", "register_buffers", &c.io.register_buffers);
    Bool(io, "io", "sqpoll", &c.io.sqpoll);
    Bool(io, "io", "direct", &c.io.direct);

    Entries co = sub(top, "", "coordinator");
    CoordinatorConfig& cc = c.coordinator;
    Count(co, "coordinator", "prefetch_bucket_size", kPrefetchLimits,
          &cc.prefetch_bucket_size);
    Count(co, "coordinator", "max_reuse_distance", kReuseLimits,
          &cc.max_reuse_distance);
    Count(co, "coordinator", "param_persistence_threshold", kParamPersistLimits,
          &cc.param_persistence_threshold);
    Count(co, "coordinator", "model_persistence_threshold", kModelPersistLimits,
          &cc.model_persistence_threshold);
    Count(co, "coordinator", "max_ongoing_fetch_events", kFetchEventsLimits,
          &cc.max_ongoing_fetch_events);
    Lookahead(co, &cc.nvme_lookahead);
    Enum(co, "coordinator", "trace_policy", kTracePolicyNames, &cc.trace_policy);
    Count(co, "coordinator", "trace_orders", kTraceOrdersLimits, &cc.trace_orders);

    Entries comm = sub(top, "", "comm");
    Enum(comm, "comm", "backend", kCommNames, &c.comm.backend);
    Count(comm, "comm", "timeout", kCommTimeoutLimits, &c.comm.timeout);
    Entries integrity = sub(top, "", "integrity");
    Enum(integrity, "integrity", "checksum", kChecksumNames,
         &c.integrity.checksum);

    // No cross-key rule: with tier nvme, empty optimizer.paths and
    // tiers.params host there may be no directory at all, which is reported
    // only if an optimizer is created (see OptimizerPaths).
    Entries opt = sub(top, "", "optimizer");
    OptimizerConfig& oc = c.optimizer;
    Enum(opt, "optimizer", "tier", kOptimizerTierNames, &oc.tier);
    Paths(opt, "optimizer", &oc.paths);
    Count(opt, "optimizer", "buffer_count", kOptimizerBufferCountLimits,
          &oc.buffer_count);
    Count(opt, "optimizer", "sub_group_size", kSubGroupSizeLimits,
          &oc.sub_group_size);
    Count(opt, "optimizer", "threads", kOptimizerThreadsLimits, &oc.threads);
    Enum(opt, "optimizer", "isa", kOptimizerIsaNames, &oc.isa);

    // Cross-key rules only where the keys parsed: a path that failed its
    // own check would otherwise also count as "no paths".
    for (const CrossError& x : CrossCheck(c)) {
      bool reported = std::any_of(
          errors_.begin(), errors_.end(),
          [&](const ErrorLine& l) { return l.text.rfind(x.path, 0) == 0; });
      if (!reported) Err(WhereIs(x.path), x.path, x.message);
    }
  }
  if (errors_.empty()) return c;

  std::stable_sort(errors_.begin(), errors_.end(),
                   [](const ErrorLine& a, const ErrorLine& b) {
                     return std::tie(a.pos.line, a.pos.column) <
                            std::tie(b.pos.line, b.pos.column);
                   });
  std::string msg;
  for (const ErrorLine& l : errors_) {
    if (!msg.empty()) msg += '\n';
    msg += source_;
    if (l.pos.line > 0)
      msg +=
          ":" + std::to_string(l.pos.line) + ":" + std::to_string(l.pos.column);
    msg += ": " + l.text;
  }
  return Status::InvalidArgument(std::move(msg));
}

// ---------------------------------------------------------------------------
// Writing YAML.

// `$` is the expansion character: written as `$$` so that the text loads
// back to the same string.
std::string EscapeDollar(const std::string& s) {
  std::string r;
  for (char c : s) {
    r += c;
    if (c == '$') r += '$';
  }
  return r;
}

std::string OnOff(bool b) { return b ? "true" : "false"; }

}  // namespace

std::string_view ParamTierName(ParamTier t) {
  return NameOf(kParamTierNames, t);
}
std::string_view GradTierName(GradTier t) { return NameOf(kGradTierNames, t); }
std::string_view CommBackendName(CommBackend b) {
  return NameOf(kCommNames, b);
}
std::string_view ChecksumName(Checksum c) { return NameOf(kChecksumNames, c); }
std::string_view TracePolicyName(TracePolicy p) { return NameOf(kTracePolicyNames, p); }
std::string_view IoBackendConfigName(io::BackendKind k) {
  return NameOf(kIoBackendNames, k);
}
std::string_view OptimizerTierName(OptimizerTier t) {
  return NameOf(kOptimizerTierNames, t);
}
std::string_view OptimizerIsaName(OptimizerIsa i) {
  return NameOf(kOptimizerIsaNames, i);
}

std::vector<std::string> OptimizerPaths(const Config& config) {
  if (!config.optimizer.paths.empty()) return config.optimizer.paths;
  return config.tiers.nvme.paths;
}

size_t EditDistance(std::string_view a, std::string_view b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t subst = prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1);
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, subst});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

Result<std::string> ExpandEnv(std::string_view text) {
  std::string out;
  size_t i = 0;
  while (i < text.size()) {
    char c = text[i];
    if (c != '$') {
      out += c;
      ++i;
      continue;
    }
    if (i + 1 < text.size() && text[i + 1] == '$') {
      out += '$';
      i += 2;
      continue;
    }
    if (i + 1 >= text.size() || text[i + 1] != '{') {
      out += '$';  // a lone $ is literal
      ++i;
      continue;
    }
    size_t close = text.find('}', i + 2);
    if (close == std::string_view::npos) {
      return Status::InvalidArgument(
          "unterminated '${' in '" + std::string(text) +
          "' (write ${VAR} or ${VAR:-default}; $$ for a literal $)");
    }
    std::string_view inner = text.substr(i + 2, close - i - 2);
    std::string_view name = inner;
    std::optional<std::string_view> fallback;
    if (size_t sep = inner.find(":-"); sep != std::string_view::npos) {
      name = inner.substr(0, sep);
      fallback = inner.substr(sep + 2);
    }
    bool valid_name =
        !name.empty() && !std::isdigit(static_cast<unsigned char>(name[0]));
    for (char ch : name) {
      if (!std::isalnum(static_cast<unsigned char>(ch)) && ch != '_')
        valid_name = false;
    }
    if (!valid_name) {
      return Status::InvalidArgument("bad environment variable name '" +
                                     std::string(name) + "' in '" +
                                     std::string(text) + "'");
    }
    const char* value = getenv(std::string(name).c_str());
    if (fallback) {
      out += (value && *value) ? std::string_view(value) : *fallback;
    } else if (value) {
      out += value;
    } else {
      return Status::InvalidArgument(
          "environment variable " + std::string(name) +
          " is not set (write ${" + std::string(name) +
          ":-default} to give a default)");
    }
    i = close + 1;
  }
  return out;
}

Result<Config> LoadConfigText(std::string_view yaml,
                              std::string_view source_name,
                              const LoadOptions& options) {
  try {
    Loader loader(source_name, options);
    return loader.Run(yaml);
  } catch (const std::exception& e) {
    // yaml-cpp throws on node misuse; none is expected, but nothing escapes.
    return Status::Internal(std::string(source_name) +
                            ": config loader failed: " + e.what());
  }
}

Result<Config> LoadConfigFile(const std::string& path,
                              const LoadOptions& options) {
  std::ifstream in(path, std::ios::binary);
  if (!in)
    return Status::FromErrno(errno, "cannot open config file '" + path + "'");
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad())
    return Status::FromErrno(errno, "cannot read config file '" + path + "'");
  return LoadConfigText(text.str(), path, options);
}

Status ValidateConfig(const Config& c, const LoadOptions& options) {
  std::vector<std::string> errors;
  auto count = [&](std::string_view path, uint64_t v, const Limits& l) {
    if (v == kInfinite && l.allow_inf) return;
    Result<uint64_t> r = ParseElementCount(FormatElementCount(v), l);
    if (!r.ok())
      errors.push_back(std::string(path) + ": " +
                       std::string(r.status().message()));
  };
  if (c.tiers.params != ParamTier::kNvme &&
      c.tiers.params != ParamTier::kHost) {
    errors.push_back("tiers.params: not a valid tier");
  }
  if (c.tiers.gradients != GradTier::kHost && c.tiers.gradients != GradTier::kNvme) {
    errors.push_back("tiers.gradients: not a valid tier");
  }
  count("tiers.device.max_live_parameters", c.tiers.device.max_live_parameters,
        kMaxLiveLimits);
  count("tiers.host.max_in_cpu", c.tiers.host.max_in_cpu, kMaxInCpuLimits);
  auto paths = [&](std::string_view path,
                   const std::vector<std::string>& list) {
    std::map<std::string, size_t> seen;
    for (size_t i = 0; i < list.size(); ++i) {
      const std::string& p = list[i];
      std::string key = std::string(path) + "[" + std::to_string(i) + "]: ";
      if (auto it = seen.find(NormalKey(p)); it != seen.end()) {
        errors.push_back(key + "duplicate NVMe path '" + p + "' (also paths[" +
                         std::to_string(it->second) + "])");
        continue;
      }
      seen[NormalKey(p)] = i;
      if (options.check_paths) {
        if (auto bad = CheckNvmePath(p)) errors.push_back(key + *bad);
      } else if (p.empty()) {
        errors.push_back(key + "empty NVMe path");
      }
    }
  };
  paths("tiers.nvme.paths", c.tiers.nvme.paths);
  count("tiers.nvme.buffer_count", c.tiers.nvme.buffer_count,
        kBufferCountLimits);
  count("tiers.nvme.buffer_size", c.tiers.nvme.buffer_size, kBufferSizeLimits);
  uint32_t eb = c.tiers.nvme.buffer_element_bytes;
  if (eb != 1 && eb != 2 && eb != 4 && eb != 8) {
    errors.push_back(
        "tiers.nvme.buffer_element_bytes: expected 1, 2, 4 or 8, got " +
        std::to_string(eb));
  }
  if (c.io.backend > io::BackendKind::kPsync)
    errors.push_back("io.backend: not a valid backend");
  {
    Result<uint64_t> r =
        ParseByteSize(FormatByteSize(c.io.block_size), kBlockSizeLimits);
    if (!r.ok()) {
      errors.push_back("io.block_size: " + std::string(r.status().message()));
    } else if (c.io.block_size % kBlockAlign != 0) {
      errors.push_back("io.block_size: " + FormatByteSize(c.io.block_size) +
                       " is not a multiple of 4KiB (direct I/O needs 4 "
                       "KiB-aligned requests)");
    }
  }
  count("io.queue_depth", c.io.queue_depth, kQueueDepthLimits);
  count("io.threads", c.io.threads, kThreadsLimits);
  const CoordinatorConfig& cc = c.coordinator;
  count("coordinator.prefetch_bucket_size", cc.prefetch_bucket_size,
        kPrefetchLimits);
  count("coordinator.max_reuse_distance", cc.max_reuse_distance, kReuseLimits);
  count("coordinator.param_persistence_threshold",
        cc.param_persistence_threshold, kParamPersistLimits);
  count("coordinator.model_persistence_threshold",
        cc.model_persistence_threshold, kModelPersistLimits);
  count("coordinator.max_ongoing_fetch_events", cc.max_ongoing_fetch_events,
        kFetchEventsLimits);
  if (cc.nvme_lookahead)
    count("coordinator.nvme_lookahead", *cc.nvme_lookahead, kLookaheadLimits);
  if (cc.trace_policy > TracePolicy::kSingle)
    errors.push_back("coordinator.trace_policy: not a valid policy");
  count("coordinator.trace_orders", cc.trace_orders, kTraceOrdersLimits);
  if (c.comm.backend > CommBackend::kGloo)
    errors.push_back("comm.backend: not a valid backend");
  count("comm.timeout", c.comm.timeout, kCommTimeoutLimits);
  if (c.integrity.checksum > Checksum::kNone) {
    errors.push_back("integrity.checksum: not a valid checksum");
  }
  const OptimizerConfig& oc = c.optimizer;
  if (oc.tier > OptimizerTier::kHost)
    errors.push_back("optimizer.tier: not a valid tier");
  paths("optimizer.paths", oc.paths);
  count("optimizer.buffer_count", oc.buffer_count, kOptimizerBufferCountLimits);
  count("optimizer.sub_group_size", oc.sub_group_size, kSubGroupSizeLimits);
  count("optimizer.threads", oc.threads, kOptimizerThreadsLimits);
  if (oc.isa > OptimizerIsa::kScalar)
    errors.push_back("optimizer.isa: not a valid instruction set");
  for (const CrossError& x : CrossCheck(c))
    errors.push_back(x.path + ": " + x.message);
  if (errors.empty()) return Status::Ok();
  std::string msg;
  for (const std::string& e : errors) {
    if (!msg.empty()) msg += '\n';
    msg += e;
  }
  return Status::InvalidArgument(std::move(msg));
}

std::string ConfigToYaml(const Config& c) {
  YAML::Emitter y;
  y.SetIndent(2);
  using YAML::BeginMap;
  using YAML::Comment;
  using YAML::EndMap;
  using YAML::Key;
  using YAML::Value;
  y << BeginMap;
  y << Key << "tiers" << Value << BeginMap;
  y << Key << "params" << Value << std::string(ParamTierName(c.tiers.params))
    << Comment("nvme | host");
  y << Key << "gradients" << Value << std::string(GradTierName(c.tiers.gradients))
    << Comment("host | nvme");
  y << Key << "device" << Value << BeginMap;
  y << Key << "max_live_parameters" << Value
    << FormatElementCount(c.tiers.device.max_live_parameters)
    << Comment("elements");
  y << EndMap;
  y << Key << "host" << Value << BeginMap;
  y << Key << "pin_memory" << Value << OnOff(c.tiers.host.pin_memory);
  y << Key << "max_in_cpu" << Value
    << FormatElementCount(c.tiers.host.max_in_cpu) << Comment("elements");
  y << Key << "allow_unpinned" << Value << OnOff(c.tiers.host.allow_unpinned);
  y << EndMap;
  y << Key << "nvme" << Value << BeginMap;
  if (!c.tiers.nvme.paths.empty()) {
    y << Key << "paths" << Value << YAML::BeginSeq;
    for (const std::string& p : c.tiers.nvme.paths)
      y << YAML::DoubleQuoted << EscapeDollar(p);
    y << YAML::EndSeq;
  }
  y << Key << "buffer_count" << Value
    << std::to_string(c.tiers.nvme.buffer_count)
    << Comment("pinned swap buffers");
  y << Key << "buffer_size" << Value
    << FormatElementCount(c.tiers.nvme.buffer_size)
    << Comment("elements per buffer");
  y << Key << "buffer_element_bytes" << Value
    << std::to_string(c.tiers.nvme.buffer_element_bytes)
    << Comment("bytes per element");
  y << EndMap;
  y << EndMap;  // tiers

  y << Key << "io" << Value << BeginMap;
  y << Key << "backend" << Value
    << std::string(IoBackendConfigName(c.io.backend))
    << Comment("auto | io_uring | libaio | psync");
  y << Key << "block_size" << Value << FormatByteSize(c.io.block_size)
    << Comment("bytes per request");
  y << Key << "queue_depth" << Value << std::to_string(c.io.queue_depth);
  y << Key << "threads" << Value << std::to_string(c.io.threads);
  y << Key << "register_buffers" << Value << OnOff(c.io.register_buffers);
  y << Key << "sqpoll" << Value << OnOff(c.io.sqpoll);
  y << Key << "direct" << Value << OnOff(c.io.direct);
  y << EndMap;

  const CoordinatorConfig& cc = c.coordinator;
  y << Key << "coordinator" << Value << BeginMap;
  y << Key << "prefetch_bucket_size" << Value
    << FormatElementCount(cc.prefetch_bucket_size) << Comment("elements");
  y << Key << "max_reuse_distance" << Value
    << FormatElementCount(cc.max_reuse_distance) << Comment("elements");
  y << Key << "param_persistence_threshold" << Value
    << FormatElementCount(cc.param_persistence_threshold)
    << Comment("elements");
  y << Key << "model_persistence_threshold" << Value
    << FormatElementCount(cc.model_persistence_threshold)
    << Comment("elements");
  y << Key << "max_ongoing_fetch_events" << Value
    << std::to_string(cc.max_ongoing_fetch_events);
  y << Key << "nvme_lookahead" << Value
    << (cc.nvme_lookahead ? FormatElementCount(*cc.nvme_lookahead)
                          : std::string("auto"))
    << Comment("elements, or auto");
  y << Key << "trace_policy" << Value << std::string(TracePolicyName(cc.trace_policy))
    << Comment("adaptive | single");
  y << Key << "trace_orders" << Value << std::to_string(cc.trace_orders);
  y << EndMap;

  y << Key << "comm" << Value << BeginMap;
  y << Key << "backend" << Value << std::string(CommBackendName(c.comm.backend))
    << Comment("auto | nccl | local | gloo");
  y << Key << "timeout" << Value << std::to_string(c.comm.timeout) << Comment("seconds");
  y << EndMap;
  y << Key << "integrity" << Value << BeginMap;
  y << Key << "checksum" << Value
    << std::string(ChecksumName(c.integrity.checksum))
    << Comment("crc32c | none");
  y << EndMap;

  const OptimizerConfig& oc = c.optimizer;
  y << Key << "optimizer" << Value << BeginMap;
  y << Key << "tier" << Value << std::string(OptimizerTierName(oc.tier))
    << Comment("nvme | host");
  // Left out when empty: the loader then uses tiers.nvme.paths, as it does
  // for an empty list.
  if (!oc.paths.empty()) {
    y << Key << "paths" << Value << YAML::BeginSeq;
    for (const std::string& p : oc.paths)
      y << YAML::DoubleQuoted << EscapeDollar(p);
    y << YAML::EndSeq;
  }
  y << Key << "buffer_count" << Value << std::to_string(oc.buffer_count)
    << Comment("pageable host buffers");
  y << Key << "sub_group_size" << Value << FormatElementCount(oc.sub_group_size)
    << Comment("elements per sub-group");
  y << Key << "threads" << Value << std::to_string(oc.threads)
    << Comment("0: all cores");
  y << Key << "isa" << Value << std::string(OptimizerIsaName(oc.isa))
    << Comment("auto | avx512 | avx2 | scalar");
  y << EndMap;
  y << EndMap;
  std::string s = y.c_str();
  s += '\n';
  return s;
}

std::string SummarizeConfig(const Config& c) {
  std::ostringstream o;
  const NvmeTier& n = c.tiers.nvme;
  if (c.tiers.params == ParamTier::kNvme) {
    o << "params       on NVMe, " << n.paths.size() << " path"
      << (n.paths.size() == 1 ? "" : "s (striped)") << "\n";
    for (const std::string& p : n.paths) o << "               " << p << "\n";
    uint64_t buffer_bytes = n.buffer_size * n.buffer_element_bytes;
    o << "swap buffers " << n.buffer_count << " x "
      << FormatElementCount(n.buffer_size) << " elements x "
      << n.buffer_element_bytes
      << " B = " << HumanBytes(buffer_bytes * n.buffer_count)
      << (c.tiers.host.pin_memory ? " pinned" : "") << "\n";
  } else {
    o << "params       on the host (no NVMe)\n";
  }
  o << "gradients    "
    << (c.tiers.gradients == GradTier::kNvme ? "on NVMe (the optimizer paths)" : "on the host")
    << "\n";
  o << "device       max_live_parameters "
    << FormatElementCount(c.tiers.device.max_live_parameters) << " elements\n";
  o << "host         pin_memory " << OnOff(c.tiers.host.pin_memory);
  if (c.tiers.params == ParamTier::kNvme) {
    o << ", max_in_cpu " << FormatElementCount(c.tiers.host.max_in_cpu)
      << " elements";
  }
  o << ", allow_unpinned " << OnOff(c.tiers.host.allow_unpinned) << "\n";
  if (c.tiers.params == ParamTier::kNvme) {
    o << "io           backend " << IoBackendConfigName(c.io.backend)
      << ", block " << HumanBytes(c.io.block_size) << ", queue depth "
      << c.io.queue_depth << ", threads " << c.io.threads << "\n";
    o << "             direct " << OnOff(c.io.direct) << ", register_buffers "
      << OnOff(c.io.register_buffers) << ", sqpoll " << OnOff(c.io.sqpoll)
      << "\n";
  }
  const CoordinatorConfig& cc = c.coordinator;
  o << "coordinator  prefetch_bucket_size "
    << FormatElementCount(cc.prefetch_bucket_size) << ", max_reuse_distance "
    << FormatElementCount(cc.max_reuse_distance) << " elements\n";
  o << "             persistence: param <= "
    << FormatElementCount(cc.param_persistence_threshold)
    << ", model total <= " << FormatElementCount(cc.model_persistence_threshold)
    << " elements\n";
  o << "             max_ongoing_fetch_events " << cc.max_ongoing_fetch_events
    << ", nvme_lookahead "
    << (cc.nvme_lookahead ? FormatElementCount(*cc.nvme_lookahead) + " elements"
                          : std::string("auto"))
    << "\n";
  o << "             trace_policy " << TracePolicyName(cc.trace_policy) << ", trace_orders "
    << cc.trace_orders << "\n";
  o << "comm         backend " << CommBackendName(c.comm.backend) << ", timeout "
    << c.comm.timeout << " s\n";
  o << "integrity    checksum " << ChecksumName(c.integrity.checksum) << "\n";
  const OptimizerConfig& oc = c.optimizer;
  std::string threads =
      oc.threads == 0 ? std::string("all cores") : std::to_string(oc.threads);
  if (oc.tier == OptimizerTier::kNvme) {
    o << "optimizer    state on NVMe, ";
    if (!oc.paths.empty()) {
      o << oc.paths.size() << " path" << (oc.paths.size() == 1 ? "" : "s")
        << "\n";
      for (const std::string& p : oc.paths) o << "               " << p << "\n";
    } else if (!n.paths.empty()) {
      o << "on the tiers.nvme paths\n";
    } else {
      o << "no path (set optimizer.paths, or optimizer.tier: host)\n";
    }
  } else {
    o << "optimizer    state in host memory (no NVMe)\n";
  }
  uint64_t buffer_bytes =
      oc.sub_group_size * kOptimizerStateBytes + kOptimizerBufferHeader;
  o << "             buffers " << oc.buffer_count << " x "
    << FormatElementCount(oc.sub_group_size) << " elements x "
    << kOptimizerStateBytes
    << " B = " << HumanBytes(buffer_bytes * oc.buffer_count) << " pageable\n";
  o << "             threads " << threads << ", isa "
    << OptimizerIsaName(oc.isa) << "\n";
  return o.str();
}

}  // namespace ztier::tiering
