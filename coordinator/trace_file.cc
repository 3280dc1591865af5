// ztier-trace-v1: reading, validating, writing (trace_file.h), model shapes
// (configs/models/*.yaml) and the trace generator.
//
// nlohmann-json and yaml-cpp report errors by throwing; every call into them
// sits in a try block here, so no exception leaves this file.
#include "coordinator/trace_file.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <span>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include "tiering/config.h"  // EditDistance, for "did you mean" hints
#include "tiering/units.h"   // ParseElementCount

namespace ztier::coordinator {
namespace {

using Json = nlohmann::json;
using OrderedJson = nlohmann::ordered_json;

constexpr std::string_view kFormat = "ztier-trace-v1";

// A trace with thousands of errors is usually one mistake repeated; the first
// few are enough to find it, and the message stays readable.
constexpr size_t kMaxErrors = 20;

// ---------------------------------------------------------------------------
// Shared helpers.

std::string Join(std::string_view path, std::string_view key) {
  if (path.empty()) return std::string(key);
  return fmt::format("{}.{}", path, key);
}

std::string Index(std::string_view path, size_t i) {
  return fmt::format("{}[{}]", path, i);
}

// The hint for an unknown key: the nearest valid key when it is close enough
// to be a typo (at most a third of its letters differ), else the whole list.
std::string UnknownKeyHint(std::string_view key,
                           std::span<const std::string_view> valid) {
  size_t best = std::numeric_limits<size_t>::max();
  std::string_view best_key;
  for (std::string_view v : valid) {
    size_t d = tiering::EditDistance(key, v);
    if (d < best) {
      best = d;
      best_key = v;
    }
  }
  if (!best_key.empty() && best <= std::max<size_t>(1, key.size() / 3)) {
    return fmt::format(" (did you mean '{}'?)", best_key);
  }
  return fmt::format(" (valid keys: {})", fmt::join(valid, ", "));
}

// Reads a whole file; errno becomes the Status.
Result<std::string> ReadFile(const std::string& path, std::string_view what) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return Status::FromErrno(errno,
                             fmt::format("cannot open {} '{}'", what, path));
  }
  std::string text;
  char buf[1 << 16];
  for (;;) {
    ssize_t n = read(fd, buf, sizeof(buf));
    if (n < 0) {
      if (errno == EINTR) continue;
      Status s = Status::FromErrno(
          errno, fmt::format("cannot read {} '{}'", what, path));
      close(fd);
      return s;
    }
    if (n == 0) break;
    text.append(buf, static_cast<size_t>(n));
  }
  close(fd);
  return text;
}

// Collected error lines, each "<source>: <path>: <message>".
class Errors {
 public:
  explicit Errors(std::string_view source) : source_(source) {}

  void Add(std::string_view path, std::string_view message) {
    ++count_;
    if (lines_.size() >= kMaxErrors) return;
    std::string line;
    if (!source_.empty()) line = fmt::format("{}: ", source_);
    if (!path.empty()) line += fmt::format("{}: ", path);
    line += message;
    lines_.push_back(std::move(line));
  }
  bool empty() const { return count_ == 0; }
  Status ToStatus() const {
    std::string msg = fmt::format("{}", fmt::join(lines_, "\n"));
    if (count_ > lines_.size()) {
      msg += fmt::format("\n... and {} more error{}", count_ - lines_.size(),
                         count_ - lines_.size() == 1 ? "" : "s");
    }
    return Status::InvalidArgument(std::move(msg));
  }

 private:
  std::string source_;
  std::vector<std::string> lines_;
  size_t count_ = 0;
};

// ---------------------------------------------------------------------------
// Reading JSON.

// Finds a repeated key in any object while nlohmann parses (its DOM keeps only
// the last value of a repeated key, which would hide a mistake). Tracks the
// JSON path of the value being parsed so the error can name it.
class DuplicateKeyFinder {
 public:
  bool OnEvent(int /*depth*/, Json::parse_event_t event, Json& parsed) {
    switch (event) {
      case Json::parse_event_t::object_start:
        frames_.push_back(Frame{false, 0, {}, {}});
        break;
      case Json::parse_event_t::key: {
        Frame& f = frames_.back();
        f.key = parsed.get<std::string>();
        if (!f.keys.insert(f.key).second && first_.empty()) first_ = Path();
        break;
      }
      case Json::parse_event_t::array_start:
        frames_.push_back(Frame{true, 0, {}, {}});
        break;
      case Json::parse_event_t::object_end:
      case Json::parse_event_t::array_end:
        frames_.pop_back();
        ElementDone();
        break;
      case Json::parse_event_t::value:
        ElementDone();
        break;
    }
    return true;  // keep every value
  }
  // Path of the first repeated key, or empty.
  const std::string& first() const { return first_; }

 private:
  struct Frame {
    bool array;
    size_t index;     // array: the element being parsed
    std::string key;  // object: the key being parsed
    std::set<std::string> keys;
  };
  void ElementDone() {
    if (!frames_.empty() && frames_.back().array) ++frames_.back().index;
  }
  std::string Path() const {
    std::string p;
    for (const Frame& f : frames_) {
      p = f.array ? Index(p, f.index) : Join(p, f.key);
    }
    return p;
  }
  std::vector<Frame> frames_;
  std::string first_;
};

std::string_view TypeName(const Json& j) {
  if (j.is_number_unsigned() || j.is_number_integer()) return "integer";
  if (j.is_number_float()) return "number";
  return j.type_name();
}

// Typed getters: each checks one value and adds an error naming its path.
class Reader {
 public:
  explicit Reader(Errors* errors) : errors_(errors) {}

  // Adds an error for each key of `obj` not in `valid`. False when `obj` is
  // not an object at all.
  bool CheckObject(const Json& obj, std::string_view path,
                   std::span<const std::string_view> valid) {
    if (!obj.is_object()) {
      errors_->Add(path,
                   fmt::format("expected an object, got {}", TypeName(obj)));
      return false;
    }
    for (const auto& [key, value] : obj.items()) {
      if (std::find(valid.begin(), valid.end(), key) == valid.end()) {
        errors_->Add(Join(path, key),
                     "unknown key" + UnknownKeyHint(key, valid));
      }
    }
    return true;
  }

  const Json* Find(const Json& obj, std::string_view path, std::string_view key,
                   bool required) {
    auto it = obj.find(key);
    if (it == obj.end()) {
      if (required) errors_->Add(Join(path, key), "missing (required)");
      return nullptr;
    }
    return &*it;
  }

  // A whole number >= `min`. JSON writers that print 5e7 for an integer are
  // accepted as long as the value is exactly whole.
  std::optional<uint64_t> Uint(const Json& j, std::string_view path,
                               uint64_t min) {
    std::optional<uint64_t> v;
    if (j.is_number_unsigned()) {
      v = j.get<uint64_t>();
    } else if (j.is_number_integer()) {
      errors_->Add(
          path, fmt::format("must not be negative, got {}", j.get<int64_t>()));
      return std::nullopt;
    } else if (j.is_number_float()) {
      double d = j.get<double>();
      // 2^53: beyond it a double no longer holds every whole number.
      if (d >= 0 && d <= 9007199254740992.0 && std::floor(d) == d) {
        v = static_cast<uint64_t>(d);
      } else {
        errors_->Add(path,
                     fmt::format("expected a non-negative whole number, got {}",
                                 j.dump()));
        return std::nullopt;
      }
    } else {
      errors_->Add(path,
                   fmt::format("expected a non-negative whole number, got {}",
                               TypeName(j)));
      return std::nullopt;
    }
    if (*v < min) {
      errors_->Add(path, fmt::format("must be at least {}, got {}", min, *v));
      return std::nullopt;
    }
    return v;
  }

  std::optional<bool> Bool(const Json& j, std::string_view path) {
    if (!j.is_boolean()) {
      errors_->Add(path,
                   fmt::format("expected true or false, got {}", TypeName(j)));
      return std::nullopt;
    }
    return j.get<bool>();
  }

  std::optional<std::string> String(const Json& j, std::string_view path) {
    if (!j.is_string()) {
      errors_->Add(path, fmt::format("expected a string, got {}", TypeName(j)));
      return std::nullopt;
    }
    return j.get<std::string>();
  }

  Errors& errors() { return *errors_; }

 private:
  Errors* errors_;
};

constexpr std::string_view kTopKeys[] = {
    "format", "world_size", "model", "params", "modules", "steps", "config"};
constexpr std::string_view kParamKeys[] = {"id", "numel", "persist", "tier",
                                           "name"};
constexpr std::string_view kModuleKeys[] = {"id", "name", "params", "parent",
                                            "flops"};
constexpr std::string_view kEventKeys[] = {"op", "module", "forward",
                                           "backward"};

std::string_view TierName(ParamTier t) {
  switch (t) {
    case ParamTier::kNvme:
      return "nvme";
    case ParamTier::kHost:
      return "host";
    case ParamTier::kDevice:
      return "device";
  }
  return "nvme";
}

std::optional<ParamTier> TierFromName(std::string_view s) {
  if (s == "nvme") return ParamTier::kNvme;
  if (s == "host") return ParamTier::kHost;
  if (s == "device") return ParamTier::kDevice;
  return std::nullopt;
}

// "module 3 (layers.0.attn)" for messages.
std::string ModuleLabel(const TraceModule& m) {
  if (m.name.empty()) return fmt::format("module {}", m.id);
  return fmt::format("module {} ({})", m.id, m.name);
}

void ParseParams(const Json& arr, Reader& r, TraceFile& t) {
  if (!arr.is_array()) {
    r.errors().Add("params",
                   fmt::format("expected an array, got {}", TypeName(arr)));
    return;
  }
  std::unordered_map<uint64_t, size_t> seen;  // id -> index in the file
  for (size_t i = 0; i < arr.size(); ++i) {
    const Json& p = arr[i];
    std::string path = Index("params", i);
    if (!r.CheckObject(p, path, kParamKeys)) continue;
    TraceParam param;
    bool ok = true;
    if (const Json* j = r.Find(p, path, "id", true)) {
      if (auto v = r.Uint(*j, Join(path, "id"), 0)) {
        param.id = *v;
        auto [it, fresh] = seen.emplace(*v, i);
        if (!fresh) {
          r.errors().Add(Join(path, "id"),
                         fmt::format("duplicate param id {} (also params[{}])",
                                     *v, it->second));
          ok = false;
        }
      } else {
        ok = false;
      }
    } else {
      ok = false;
    }
    if (const Json* j = r.Find(p, path, "numel", true)) {
      // A parameter of 0 elements has nothing to fetch and no swap extent.
      if (auto v = r.Uint(*j, Join(path, "numel"), 1)) param.numel = *v;
    }
    if (const Json* j = r.Find(p, path, "persist", false)) {
      if (auto v = r.Bool(*j, Join(path, "persist"))) param.persist = *v;
    }
    if (const Json* j = r.Find(p, path, "tier", false)) {
      if (auto v = r.String(*j, Join(path, "tier"))) {
        if (auto tier = TierFromName(*v)) {
          param.tier = *tier;
        } else {
          r.errors().Add(
              Join(path, "tier"),
              fmt::format("unknown tier '{}' (use nvme, host or device)", *v));
        }
      }
    }
    if (const Json* j = r.Find(p, path, "name", false)) {
      if (auto v = r.String(*j, Join(path, "name"))) param.name = *v;
    }
    // A param whose id did not parse is left out, so that references to it
    // report as unknown rather than naming a made-up id.
    if (ok) t.params.push_back(std::move(param));
  }
}

void ParseModules(const Json& arr, Reader& r, TraceFile& t) {
  if (!arr.is_array()) {
    r.errors().Add("modules",
                   fmt::format("expected an array, got {}", TypeName(arr)));
    return;
  }
  std::unordered_set<uint64_t> param_ids;
  for (const TraceParam& p : t.params) param_ids.insert(p.id);
  std::unordered_map<uint64_t, size_t> seen;  // id -> index in the file
  for (size_t i = 0; i < arr.size(); ++i) {
    const Json& m = arr[i];
    std::string path = Index("modules", i);
    if (!r.CheckObject(m, path, kModuleKeys)) continue;
    TraceModule mod;
    bool ok = true;
    if (const Json* j = r.Find(m, path, "id", true)) {
      if (auto v = r.Uint(*j, Join(path, "id"), 0)) {
        mod.id = *v;
        auto [it, fresh] = seen.emplace(*v, i);
        if (!fresh) {
          r.errors().Add(
              Join(path, "id"),
              fmt::format("duplicate module id {} (also modules[{}])", *v,
                          it->second));
          ok = false;
        }
      } else {
        ok = false;
      }
    } else {
      ok = false;
    }
    if (const Json* j = r.Find(m, path, "name", false)) {
      if (auto v = r.String(*j, Join(path, "name"))) mod.name = *v;
    }
    if (const Json* j = r.Find(m, path, "params", false)) {
      std::string ppath = Join(path, "params");
      if (!j->is_array()) {
        r.errors().Add(ppath,
                       fmt::format("expected an array of param ids, got {}",
                                   TypeName(*j)));
      } else {
        std::unordered_set<uint64_t> mine;
        for (size_t k = 0; k < j->size(); ++k) {
          std::string epath = Index(ppath, k);
          auto v = r.Uint((*j)[k], epath, 0);
          if (!v) continue;
          if (!param_ids.contains(*v)) {
            r.errors().Add(epath, fmt::format("unknown param {}", *v));
          } else if (!mine.insert(*v).second) {
            r.errors().Add(epath, fmt::format("param {} listed twice", *v));
          } else {
            mod.params.push_back(*v);
          }
        }
      }
    }
    if (const Json* j = r.Find(m, path, "parent", false)) {
      if (auto v = r.Uint(*j, Join(path, "parent"), 0)) mod.parent = *v;
    }
    if (const Json* j = r.Find(m, path, "flops", false)) {
      if (auto v = r.Uint(*j, Join(path, "flops"), 0)) mod.flops = *v;
    }
    if (ok) t.modules.push_back(std::move(mod));
  }

  // Parents may be declared after their children; check them once all ids
  // are known. The tree must have no cycle (a walk up must end).
  std::unordered_map<uint64_t, size_t> index;
  for (size_t i = 0; i < t.modules.size(); ++i)
    index.emplace(t.modules[i].id, i);
  auto file_index = [&](size_t k) { return seen.at(t.modules[k].id); };
  bool parents_ok = true;
  for (size_t k = 0; k < t.modules.size(); ++k) {
    if (!t.modules[k].parent) continue;
    uint64_t parent = *t.modules[k].parent;
    std::string path = Join(Index("modules", file_index(k)), "parent");
    if (parent == t.modules[k].id) {
      r.errors().Add(path, "a module cannot be its own parent");
      parents_ok = false;
    } else if (!index.contains(parent)) {
      r.errors().Add(path, fmt::format("unknown module {}", parent));
      parents_ok = false;
    }
  }
  if (!parents_ok) return;
  for (size_t k = 0; k < t.modules.size(); ++k) {
    size_t at = k;
    for (size_t hops = 0; t.modules[at].parent; ++hops) {
      at = index.at(*t.modules[at].parent);
      if (at == k || hops > t.modules.size()) {
        r.errors().Add(Join(Index("modules", file_index(k)), "parent"),
                       fmt::format("the parent chain of {} is a cycle",
                                   ModuleLabel(t.modules[k])));
        break;
      }
    }
  }
}

void ParseSteps(const Json& arr, Reader& r, TraceFile& t) {
  if (!arr.is_array()) {
    r.errors().Add("steps", fmt::format("expected an array of steps, got {}",
                                        TypeName(arr)));
    return;
  }
  std::unordered_map<uint64_t, size_t> index;
  for (size_t i = 0; i < t.modules.size(); ++i)
    index.emplace(t.modules[i].id, i);
  for (size_t s = 0; s < arr.size(); ++s) {
    const Json& step = arr[s];
    std::string spath = Index("steps", s);
    std::vector<TraceEvent> events;
    if (!step.is_array()) {
      r.errors().Add(spath, fmt::format("expected an array of events, got {}",
                                        TypeName(step)));
      t.steps.push_back(std::move(events));
      continue;
    }
    // For each module, the event indices of its fetches not yet released in
    // this step (a module may be entered again before it is left, as a
    // shared module called from two places is).
    std::unordered_map<uint64_t, std::vector<size_t>> open;
    events.reserve(step.size());
    for (size_t e = 0; e < step.size(); ++e) {
      const Json& ev = step[e];
      std::string path = Index(spath, e);
      if (!r.CheckObject(ev, path, kEventKeys)) continue;
      TraceEvent event;
      std::optional<TraceOp> op;
      if (const Json* j = r.Find(ev, path, "op", true)) {
        if (auto v = r.String(*j, Join(path, "op"))) {
          if (*v == "fetch") {
            op = TraceOp::kFetch;
          } else if (*v == "release") {
            op = TraceOp::kRelease;
          } else if (*v == "hint") {
            op = TraceOp::kHint;
          } else {
            r.errors().Add(
                Join(path, "op"),
                fmt::format("unknown op '{}' (use fetch, release or hint)", *v));
          }
        }
      }
      std::optional<uint64_t> module;
      if (const Json* j = r.Find(ev, path, "module", true)) {
        if (auto v = r.Uint(*j, Join(path, "module"), 0)) {
          if (index.contains(*v)) {
            module = v;
          } else {
            r.errors().Add(Join(path, "module"),
                           fmt::format("unknown module {}", *v));
          }
        }
      }
      if (!op) continue;
      if (*op == TraceOp::kHint) {
        // A hint names a module and nothing else: a flag would be ignored.
        for (std::string_view flag : {"forward", "backward"}) {
          if (ev.contains(flag)) {
            r.errors().Add(Join(path, flag), "not valid on a hint event (it takes only 'module')");
          }
        }
        if (module) events.push_back(TraceEvent{TraceOp::kHint, *module, true, false});
        continue;
      }
      // Each op carries only its own flag; the other one would be ignored,
      // so it is a mistake in the file.
      std::string_view own = *op == TraceOp::kFetch ? "forward" : "backward";
      std::string_view other = *op == TraceOp::kFetch ? "backward" : "forward";
      if (ev.contains(other)) {
        r.errors().Add(
            Join(path, other),
            fmt::format("not valid on a {} event (it takes '{}')",
                        *op == TraceOp::kFetch ? "fetch" : "release", own));
      }
      // `flag` is `forward`. Defaults: a forward fetch, a release after
      // forward.
      bool flag = true;
      if (const Json* j = r.Find(ev, path, own, false)) {
        if (auto v = r.Bool(*j, Join(path, own))) {
          flag = *op == TraceOp::kFetch ? *v : !*v;
        }
      }
      if (!module) continue;
      event.op = *op;
      event.module = *module;
      event.forward = flag;
      event.backward = !flag;
      if (*op == TraceOp::kFetch) {
        open[*module].push_back(e);
      } else {
        std::vector<size_t>& fetches = open[*module];
        if (fetches.empty()) {
          r.errors().Add(
              path,
              fmt::format("release of {}, which is not fetched at this point "
                          "of step {}",
                          ModuleLabel(t.modules[index.at(*module)]), s));
        } else {
          fetches.pop_back();
        }
      }
      events.push_back(event);
    }
    std::vector<std::pair<size_t, uint64_t>> unreleased;
    for (const auto& [m, fetches] : open) {
      for (size_t e : fetches) unreleased.emplace_back(e, m);
    }
    std::sort(unreleased.begin(), unreleased.end());
    for (auto [e, m] : unreleased) {
      r.errors().Add(
          Index(spath, e),
          fmt::format("{} is fetched here and never released in step {}",
                      ModuleLabel(t.modules[index.at(m)]), s));
    }
    t.steps.push_back(std::move(events));
  }
}

// Flattens nested objects into "section.key" entries; any other value is
// kept as its JSON text.
void ParseConfig(const Json& obj, std::string_view path,
                 std::string_view prefix, Reader& r, TraceFile& t) {
  if (!obj.is_object()) {
    r.errors().Add(path,
                   fmt::format("expected an object, got {}", TypeName(obj)));
    return;
  }
  for (const auto& [key, value] : obj.items()) {
    std::string full = Join(prefix, key);
    std::string vpath = Join(path, key);
    if (key.empty()) {
      r.errors().Add(path, "empty key");
    } else if (value.is_object()) {
      ParseConfig(value, vpath, full, r, t);
    } else if (value.is_null()) {
      r.errors().Add(vpath, "null is not a config value");
    } else if (!t.config.emplace(full, value.dump()).second) {
      r.errors().Add(vpath, fmt::format("'{}' is given twice", full));
    }
  }
}

// JSON text for a string, never throwing on bytes that are not UTF-8.
std::string Quote(const std::string& s) {
  return Json(s).dump(-1, ' ', false, Json::error_handler_t::replace);
}

std::string Dump(const OrderedJson& j) {
  return j.dump(-1, ' ', false, OrderedJson::error_handler_t::replace);
}

// ---------------------------------------------------------------------------
// Model shapes.

constexpr std::string_view kShapeKeys[] = {
    "name",     "family",   "layers",          "hidden",
    "heads",    "kv_heads", "vocab",           "ffn_hidden",
    "seq_len",  "batch",    "tied_embeddings", "experts",
    "moe_every"};
constexpr std::string_view kFamilies[] = {"gpt2", "llama", "moe"};

// Experts each token is routed to in an MoE layer (top-2 gating).
constexpr uint64_t kTopK = 2;

// Semantic checks of a shape, as (key, message) pairs.
std::vector<std::pair<std::string, std::string>> ShapeProblems(
    const ModelShape& s) {
  std::vector<std::pair<std::string, std::string>> out;
  auto add = [&](std::string key, std::string msg) {
    out.emplace_back(std::move(key), std::move(msg));
  };
  if (std::find(std::begin(kFamilies), std::end(kFamilies), s.family) ==
      std::end(kFamilies)) {
    add("family",
        fmt::format("unknown family '{}' (use gpt2, llama or moe)", s.family));
  }
  if (s.layers == 0) add("layers", "must be at least 1");
  if (s.hidden == 0) add("hidden", "must be at least 1");
  if (s.heads == 0) add("heads", "must be at least 1");
  if (s.vocab == 0) add("vocab", "must be at least 1");
  if (s.seq_len == 0) add("seq_len", "must be at least 1");
  if (s.batch == 0) add("batch", "must be at least 1");
  if (s.hidden > 0 && s.heads > 0 && s.hidden % s.heads != 0) {
    add("heads", fmt::format("hidden ({}) is not a multiple of heads ({})",
                             s.hidden, s.heads));
  }
  if (s.kv_heads != 0) {
    if (s.family != "llama") {
      add("kv_heads", "only the llama family has grouped-query attention");
    } else if (s.heads > 0 &&
               (s.kv_heads > s.heads || s.heads % s.kv_heads != 0)) {
      add("kv_heads",
          fmt::format("heads ({}) is not a multiple of kv_heads ({})", s.heads,
                      s.kv_heads));
    }
  }
  if (s.family == "moe") {
    if (s.experts == 0)
      add("experts", "an moe model needs at least 1 expert per MoE layer");
    if (s.moe_every == 0) add("moe_every", "must be at least 1");
  } else if (s.experts != 0) {
    add("experts", "only the moe family has experts");
  }
  // Element counts (vocab x hidden, hidden x ffn) must stay far from 2^64;
  // these bounds are well past any real model.
  if (s.hidden > (1u << 20) || s.vocab > (1u << 24) || s.layers > (1u << 14) ||
      s.seq_len > (1u << 24) || s.batch > (1u << 16) ||
      s.ffn_hidden > (1u << 22) || s.experts > (1u << 12)) {
    add("",
        "a dimension is beyond what ztier models (hidden <= 2^20, "
        "vocab <= 2^24, layers <= 2^14, seq_len <= 2^24, batch <= 2^16, "
        "ffn_hidden <= 2^22, experts <= 2^12)");
  }
  return out;
}

// LLaMA's rule: two thirds of 4h, rounded up to a multiple of 256.
uint64_t LlamaDefaultFfn(uint64_t hidden) {
  uint64_t f = 2 * (4 * hidden) / 3;
  return (f + 255) / 256 * 256;
}

// ---------------------------------------------------------------------------
// Generator.

// Deterministic on every platform (unlike std:: distributions), so a seed
// names the same routing everywhere.
uint64_t SplitMix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

class TraceBuilder {
 public:
  TraceBuilder(double scale, uint64_t tokens)
      : scale_(scale), tokens_(tokens) {}

  // `numel`: elements of the full-size tensor; stored divided by the scale.
  uint64_t Param(std::string name, uint64_t numel) {
    TraceParam p;
    p.id = trace_.params.size();
    p.numel = Scaled(numel);
    p.name = std::move(name);
    full_numel_.push_back(numel);
    trace_.params.push_back(std::move(p));
    return trace_.params.back().id;
  }

  // FLOPs of one forward call: 2 per parameter element per token (a
  // multiply and an add: exact for the matmuls, a slight overcount for
  // biases and norms) times `token_share` (the fraction of the tokens this
  // module sees: an expert sees k/E of them), plus `extra` (attention
  // scores). Divided by the scale, so a scaled trace keeps the ratio of
  // compute to bytes moved.
  uint64_t Module(std::string name, std::optional<uint64_t> parent,
                  std::vector<uint64_t> params, bool lookup_only = false,
                  long double extra_flops = 0, double token_share = 1.0) {
    TraceModule m;
    m.id = trace_.modules.size();
    m.name = std::move(name);
    m.parent = parent;
    long double flops = extra_flops;
    if (!lookup_only) {
      for (uint64_t p : params) {
        flops += 2.0L * static_cast<long double>(full_numel_[p]) *
                 static_cast<long double>(tokens_) * token_share;
      }
    }
    // Clamped: only a shape far beyond any real model reaches 2^64 FLOPs.
    const long double scaled = std::round(flops / scale_);
    m.flops = flops <= 0 ? 0
              : scaled >= 1.8e19L
                  ? std::numeric_limits<uint64_t>::max()
                  : std::max<uint64_t>(1, static_cast<uint64_t>(scaled));
    m.params = std::move(params);
    trace_.modules.push_back(std::move(m));
    return trace_.modules.back().id;
  }

  TraceFile& trace() { return trace_; }

 private:
  uint64_t Scaled(uint64_t numel) const {
    if (scale_ == 1.0) return numel;
    long double v = std::ceil(static_cast<long double>(numel) / scale_);
    return std::max<uint64_t>(1, static_cast<uint64_t>(v));
  }

  double scale_;
  uint64_t tokens_;
  TraceFile trace_;
  std::vector<uint64_t> full_numel_;  // elements before scaling, by param id
};

// FLOPs of the attention scores of one forward call: QK^T and the weighted
// sum of V, 2 x seq^2 x hidden each per sequence. In long double: seq^2 x
// hidden x batch leaves 64 bits for long sequences.
long double AttentionFlops(const ModelShape& s) {
  const long double seq = static_cast<long double>(s.seq_len);
  return 4.0L * seq * seq * static_cast<long double>(s.hidden) *
         static_cast<long double>(s.batch);
}

// The modules of one transformer layer.
struct LayerModules {
  uint64_t layer = 0;              // "layers.i": a container, no params
  std::vector<uint64_t> children;  // dense: norms, attention, MLP in order
  // moe layers: `children` ends before the MLP; the router and the experts
  // the step routes to follow it.
  std::optional<uint64_t> router;
  std::vector<uint64_t> experts;
};

struct ModelModules {
  uint64_t root = 0;
  uint64_t embed = 0;
  std::vector<LayerModules> layers;
  uint64_t final_norm = 0;
  uint64_t head = 0;
};

// gpt2 and moe: GPT-2 blocks (LayerNorm with bias, fused qkv, 4h MLP).
ModelModules BuildGpt2(const ModelShape& s, TraceBuilder& b) {
  const uint64_t h = s.hidden;
  const uint64_t ffn = s.ffn_hidden ? s.ffn_hidden : 4 * h;
  const long double attn_flops = AttentionFlops(s);
  ModelModules m;
  uint64_t wte = b.Param("wte.weight", s.vocab * h);
  uint64_t wpe = b.Param("wpe.weight", s.seq_len * h);
  m.root = b.Module("model", std::nullopt, {});
  m.embed = b.Module("embed", m.root, {wte, wpe}, /*lookup_only=*/true);
  for (uint64_t i = 0; i < s.layers; ++i) {
    std::string l = fmt::format("layers.{}", i);
    LayerModules lm;
    lm.layer = b.Module(l, m.root, {});
    auto norm = [&](const std::string& name) {
      uint64_t w = b.Param(name + ".weight", h);
      uint64_t bias = b.Param(name + ".bias", h);
      return b.Module(name, lm.layer, {w, bias});
    };
    // A two-matrix MLP under `name` (h -> width -> h).
    auto mlp = [&](const std::string& name, double token_share) {
      uint64_t fc_w = b.Param(name + ".c_fc.weight", h * ffn);
      uint64_t fc_b = b.Param(name + ".c_fc.bias", ffn);
      uint64_t pr_w = b.Param(name + ".c_proj.weight", ffn * h);
      uint64_t pr_b = b.Param(name + ".c_proj.bias", h);
      return b.Module(name, lm.layer, {fc_w, fc_b, pr_w, pr_b}, false, 0,
                      token_share);
    };
    lm.children.push_back(norm(l + ".ln_1"));
    {
      std::string a = l + ".attn";
      uint64_t qkv_w = b.Param(a + ".c_attn.weight", h * 3 * h);
      uint64_t qkv_b = b.Param(a + ".c_attn.bias", 3 * h);
      uint64_t pr_w = b.Param(a + ".c_proj.weight", h * h);
      uint64_t pr_b = b.Param(a + ".c_proj.bias", h);
      lm.children.push_back(
          b.Module(a, lm.layer, {qkv_w, qkv_b, pr_w, pr_b}, false, attn_flops));
    }
    lm.children.push_back(norm(l + ".ln_2"));
    // Every moe_every-th layer (1-based: layers 1, 3, ... for 2) is MoE.
    bool moe = s.family == "moe" && (i + 1) % s.moe_every == 0;
    if (!moe) {
      lm.children.push_back(mlp(l + ".mlp", 1.0));
    } else {
      uint64_t router_w = b.Param(l + ".router.weight", h * s.experts);
      lm.router = b.Module(l + ".router", lm.layer, {router_w});
      const double share = static_cast<double>(std::min(kTopK, s.experts)) /
                           static_cast<double>(s.experts);
      for (uint64_t e = 0; e < s.experts; ++e) {
        lm.experts.push_back(mlp(fmt::format("{}.experts.{}", l, e), share));
      }
    }
    m.layers.push_back(std::move(lm));
  }
  uint64_t lnf_w = b.Param("ln_f.weight", h);
  uint64_t lnf_b = b.Param("ln_f.bias", h);
  m.final_norm = b.Module("ln_f", m.root, {lnf_w, lnf_b});
  uint64_t head_w =
      s.tied_embeddings ? wte : b.Param("lm_head.weight", s.vocab * h);
  m.head = b.Module("lm_head", m.root, {head_w});
  return m;
}

// LLaMA blocks: RMSNorm (weight only), q/k/v/o without bias (k and v
// narrower with grouped-query attention), gated MLP (gate, up, down).
ModelModules BuildLlama(const ModelShape& s, TraceBuilder& b) {
  const uint64_t h = s.hidden;
  const uint64_t ffn = s.ffn_hidden ? s.ffn_hidden : LlamaDefaultFfn(h);
  const uint64_t kv_heads = s.kv_heads ? s.kv_heads : s.heads;
  const uint64_t kv = h / s.heads * kv_heads;  // width of k and v
  const long double attn_flops = AttentionFlops(s);
  ModelModules m;
  uint64_t emb = b.Param("embed_tokens.weight", s.vocab * h);
  m.root = b.Module("model", std::nullopt, {});
  m.embed = b.Module("embed_tokens", m.root, {emb}, /*lookup_only=*/true);
  for (uint64_t i = 0; i < s.layers; ++i) {
    std::string l = fmt::format("layers.{}", i);
    LayerModules lm;
    lm.layer = b.Module(l, m.root, {});
    auto norm = [&](const std::string& name) {
      return b.Module(name, lm.layer, {b.Param(name + ".weight", h)});
    };
    lm.children.push_back(norm(l + ".input_layernorm"));
    {
      std::string a = l + ".self_attn";
      uint64_t q = b.Param(a + ".q_proj.weight", h * h);
      uint64_t k = b.Param(a + ".k_proj.weight", h * kv);
      uint64_t v = b.Param(a + ".v_proj.weight", h * kv);
      uint64_t o = b.Param(a + ".o_proj.weight", h * h);
      lm.children.push_back(
          b.Module(a, lm.layer, {q, k, v, o}, false, attn_flops));
    }
    lm.children.push_back(norm(l + ".post_attention_layernorm"));
    {
      std::string f = l + ".mlp";
      uint64_t gate = b.Param(f + ".gate_proj.weight", h * ffn);
      uint64_t up = b.Param(f + ".up_proj.weight", h * ffn);
      uint64_t down = b.Param(f + ".down_proj.weight", ffn * h);
      lm.children.push_back(b.Module(f, lm.layer, {gate, up, down}));
    }
    m.layers.push_back(std::move(lm));
  }
  m.final_norm = b.Module("norm", m.root, {b.Param("norm.weight", h)});
  uint64_t head_w =
      s.tied_embeddings ? emb : b.Param("lm_head.weight", s.vocab * h);
  m.head = b.Module("lm_head", m.root, {head_w});
  return m;
}

// One step's fetch/release calls, in the order the module hooks fire.
class StepWriter {
 public:
  // With hints, each router in `routers` is followed by hint events naming
  // the calls after it in its layer (the experts it chose).
  explicit StepWriter(std::vector<uint64_t> routers) : routers_(std::move(routers)) {}
  void Fetch(uint64_t m, bool forward) {
    events_.push_back(TraceEvent{TraceOp::kFetch, m, forward, !forward});
  }
  void Release(uint64_t m, bool backward) {
    events_.push_back(TraceEvent{TraceOp::kRelease, m, !backward, backward});
  }
  void Forward(uint64_t m) {
    Fetch(m, true);
    Release(m, false);
  }
  void Backward(uint64_t m) {
    Fetch(m, false);
    Release(m, true);
  }
  void Hint(uint64_t m) { events_.push_back(TraceEvent{TraceOp::kHint, m, true, false}); }
  bool HintsAfter(uint64_t m) const {
    return std::find(routers_.begin(), routers_.end(), m) != routers_.end();
  }
  std::vector<TraceEvent> Take() { return std::move(events_); }

 private:
  std::vector<TraceEvent> events_;
  std::vector<uint64_t> routers_;
};

// The writer of one step: with options.hints, one that hints after routers.
StepWriter WriterFor(const ModelModules& m, const TraceGenOptions& o) {
  std::vector<uint64_t> routers;
  if (o.hints) {
    for (const LayerModules& l : m.layers) {
      if (l.router) routers.push_back(*l.router);
    }
  }
  return StepWriter(std::move(routers));
}

// The leaf modules each layer calls in one step, in forward order.
using LayerCalls = std::vector<std::vector<uint64_t>>;

// The routing state of one step. A training step keeps the key it had before
// decode steps existed, so its routing does not depend on decode_steps;
// decode step `decode` (1-based) before it mixes that number in, so each
// decode step routes to experts of its own.
uint64_t RoutingSeed(const TraceGenOptions& o, uint32_t train_step,
                     uint32_t decode) {
  return o.seed ^
         (0xD1B54A32D192ED03ULL * (static_cast<uint64_t>(train_step) + 1)) ^
         (0xA0761D6478BD642FULL * decode);
}

// Every layer's leaf calls; an MoE layer adds its router and the experts the
// step's tokens go to (drawn from `rng`).
LayerCalls RouteStep(const ModelModules& m, uint64_t rng) {
  LayerCalls calls(m.layers.size());
  for (size_t i = 0; i < m.layers.size(); ++i) {
    const LayerModules& l = m.layers[i];
    calls[i] = l.children;
    if (!l.router) continue;
    calls[i].push_back(*l.router);
    // The step's tokens go to k distinct experts, run in index order.
    const uint64_t n = l.experts.size();
    std::vector<uint64_t> chosen;
    while (chosen.size() < std::min<uint64_t>(kTopK, n)) {
      uint64_t e = SplitMix64(rng) % n;
      if (std::find(chosen.begin(), chosen.end(), e) == chosen.end())
        chosen.push_back(e);
    }
    std::sort(chosen.begin(), chosen.end());
    for (uint64_t e : chosen) calls[i].push_back(l.experts[e]);
  }
  return calls;
}

// One layer's forward: the container wraps its children's calls.
void WriteLayerForward(StepWriter& w, uint64_t layer,
                       const std::vector<uint64_t>& calls) {
  w.Fetch(layer, true);
  for (size_t k = 0; k < calls.size(); ++k) {
    w.Forward(calls[k]);
    if (!w.HintsAfter(calls[k])) continue;
    for (size_t later = k + 1; later < calls.size(); ++later) w.Hint(calls[later]);
  }
  w.Release(layer, false);
}

// Forward: every module's pre-forward hook fires on entry and its
// post-forward hook on exit, so containers wrap their children.
void WriteForward(StepWriter& w, const ModelModules& m,
                  const LayerCalls& calls) {
  w.Fetch(m.root, true);
  w.Forward(m.embed);
  for (size_t i = 0; i < m.layers.size(); ++i)
    WriteLayerForward(w, m.layers[i].layer, calls[i]);
  w.Forward(m.final_norm);
  w.Forward(m.head);  // a tied head fetches the embedding's weight again
  w.Release(m.root, false);
}

// Backward: the same nesting, in reverse order.
void WriteBackward(StepWriter& w, const ModelModules& m,
                   const LayerCalls& calls, bool checkpointing) {
  w.Fetch(m.root, false);
  w.Backward(m.head);
  w.Backward(m.final_norm);
  for (size_t i = m.layers.size(); i-- > 0;) {
    // The layer's activations were dropped: its forward runs again first.
    if (checkpointing) WriteLayerForward(w, m.layers[i].layer, calls[i]);
    w.Fetch(m.layers[i].layer, false);
    for (auto it = calls[i].rbegin(); it != calls[i].rend(); ++it)
      w.Backward(*it);
    w.Release(m.layers[i].layer, true);
  }
  w.Backward(m.embed);
  w.Release(m.root, true);
}

std::vector<TraceEvent> GenerateTrainingStep(const ModelModules& m,
                                             const TraceGenOptions& o,
                                             uint32_t step) {
  const LayerCalls calls = RouteStep(m, RoutingSeed(o, step, 0));
  StepWriter w = WriterFor(m, o);
  WriteForward(w, m, calls);
  WriteBackward(w, m, calls, o.checkpointing);
  return w.Take();
}

// Decode step `decode` (1-based) before training step `step`. Generation
// keeps no activations for a backward, so with checkpointing too there is
// nothing to recompute: the forward alone.
std::vector<TraceEvent> GenerateDecodeStep(const ModelModules& m,
                                           const TraceGenOptions& o,
                                           uint32_t step, uint32_t decode) {
  StepWriter w = WriterFor(m, o);
  WriteForward(w, m, RouteStep(m, RoutingSeed(o, step, decode)));
  return w.Take();
}

// Problems with the step counts, as "option: message" lines.
void StepCountProblems(const TraceGenOptions& o,
                       std::vector<std::string>& problems) {
  if (o.steps == 0) problems.push_back("steps: must be at least 1");
  if (o.decode_steps > kMaxDecodeSteps) {
    problems.push_back(fmt::format(
        "decode_steps: {} is more than the limit of {} forward-only steps "
        "per training step",
        o.decode_steps, kMaxDecodeSteps));
  }
  // steps < 2^32 and decode_steps + 1 <= 2^32: the product fits in 64 bits.
  const uint64_t total = static_cast<uint64_t>(o.steps) *
                         (static_cast<uint64_t>(o.decode_steps) + 1);
  if (total > kMaxGeneratedSteps) {
    problems.push_back(fmt::format(
        "steps x (decode_steps + 1) = {} x {} = {} steps, more than the limit "
        "of {} in one trace; use fewer steps or decode_steps",
        o.steps, static_cast<uint64_t>(o.decode_steps) + 1, total,
        kMaxGeneratedSteps));
  }
}

}  // namespace

// ---------------------------------------------------------------------------
// Public API.

Result<TraceFile> ParseTrace(std::string_view json_text,
                             std::string_view source_name) {
  Errors errors(source_name);
  Json root;
  DuplicateKeyFinder dups;
  try {
    root = Json::parse(
        json_text.begin(), json_text.end(),
        [&dups](int depth, Json::parse_event_t event, Json& parsed) {
          return dups.OnEvent(depth, event, parsed);
        });
  } catch (const Json::parse_error& e) {
    // e.what() is "[json.exception.parse_error.N] parse error at line L,
    // column C: ..."; the bracketed id means nothing to a reader.
    std::string_view what = e.what();
    if (size_t close = what.find("] "); close != std::string_view::npos) {
      what.remove_prefix(close + 2);
    }
    errors.Add("", fmt::format("not valid JSON: {}", what));
    return errors.ToStatus();
  } catch (const std::exception& e) {
    errors.Add("", fmt::format("cannot parse JSON: {}", e.what()));
    return errors.ToStatus();
  }
  if (!dups.first().empty()) {
    errors.Add(dups.first(), "key given twice in the same object");
  }

  Reader r(&errors);
  TraceFile t;
  try {
    if (!r.CheckObject(root, "", kTopKeys)) return errors.ToStatus();
    if (const Json* j = r.Find(root, "", "format", true)) {
      if (auto v = r.String(*j, "format")) {
        if (*v != kFormat) {
          errors.Add("format",
                     fmt::format("unknown format '{}' (this reader knows '{}')",
                                 *v, kFormat));
          return errors
              .ToStatus();  // the rest would be read by the wrong rules
        }
      }
    }
    if (const Json* j = r.Find(root, "", "world_size", false)) {
      if (auto v = r.Uint(*j, "world_size", 1)) {
        if (*v > std::numeric_limits<uint32_t>::max()) {
          errors.Add("world_size", fmt::format("{} is too large", *v));
        } else {
          t.world_size = static_cast<uint32_t>(*v);
        }
      }
    }
    if (const Json* j = r.Find(root, "", "model", false)) {
      if (auto v = r.String(*j, "model")) t.model = *v;
    }
    if (const Json* j = r.Find(root, "", "params", true)) ParseParams(*j, r, t);
    if (const Json* j = r.Find(root, "", "modules", true))
      ParseModules(*j, r, t);
    if (const Json* j = r.Find(root, "", "steps", true)) ParseSteps(*j, r, t);
    if (const Json* j = r.Find(root, "", "config", false))
      ParseConfig(*j, "config", "", r, t);
  } catch (const std::exception& e) {
    // Every access above is type-checked first; this is a guard, not a path.
    return Status::Internal(
        fmt::format("{}: reading the trace: {}", source_name, e.what()));
  }
  if (!errors.empty()) return errors.ToStatus();
  return t;
}

Result<TraceFile> LoadTrace(const std::string& path) {
  ZTIER_ASSIGN_OR_RETURN(std::string text, ReadFile(path, "trace file"));
  return ParseTrace(text, path);
}

std::string TraceToJson(const TraceFile& trace) {
  // One object per line (params, modules, events), so that a diff of two
  // traces shows which events moved.
  std::string out;
  out += fmt::format("{{\"format\": {},\n", Quote(std::string(kFormat)));
  out += fmt::format(" \"world_size\": {},\n", trace.world_size);
  if (!trace.model.empty())
    out += fmt::format(" \"model\": {},\n", Quote(trace.model));

  auto lines = [&out](std::string_view key, size_t n, auto&& line) {
    out += fmt::format(" \"{}\": [", key);
    for (size_t i = 0; i < n; ++i) {
      out += i == 0 ? "\n  " : ",\n  ";
      out += line(i);
    }
    out += n == 0 ? "]" : "\n ]";
  };

  lines("params", trace.params.size(), [&](size_t i) {
    const TraceParam& p = trace.params[i];
    OrderedJson j;
    j["id"] = p.id;
    j["numel"] = p.numel;
    j["persist"] = p.persist;
    j["tier"] = TierName(p.tier);
    if (!p.name.empty()) j["name"] = p.name;
    return Dump(j);
  });
  out += ",\n";
  lines("modules", trace.modules.size(), [&](size_t i) {
    const TraceModule& m = trace.modules[i];
    OrderedJson j;
    j["id"] = m.id;
    if (!m.name.empty()) j["name"] = m.name;
    j["params"] = m.params;
    if (m.parent) j["parent"] = *m.parent;
    j["flops"] = m.flops;
    return Dump(j);
  });
  out += ",\n";

  out += " \"steps\": [";
  for (size_t s = 0; s < trace.steps.size(); ++s) {
    out += s == 0 ? "\n  [" : ",\n  [";
    const std::vector<TraceEvent>& events = trace.steps[s];
    for (size_t e = 0; e < events.size(); ++e) {
      const TraceEvent& ev = events[e];
      out += e == 0 ? "\n   " : ",\n   ";
      if (ev.op == TraceOp::kFetch) {
        out += fmt::format("{{\"op\":\"fetch\",\"module\":{},\"forward\":{}}}",
                           ev.module, ev.forward);
      } else if (ev.op == TraceOp::kHint) {
        out += fmt::format("{{\"op\":\"hint\",\"module\":{}}}", ev.module);
      } else {
        out +=
            fmt::format("{{\"op\":\"release\",\"module\":{},\"backward\":{}}}",
                        ev.module, ev.backward);
      }
    }
    out += events.empty() ? "]" : "\n  ]";
  }
  out += trace.steps.empty() ? "]" : "\n ]";

  if (!trace.config.empty()) {
    out += ",\n \"config\": {";
    bool first = true;
    for (const auto& [key, text] : trace.config) {
      // Values are JSON text; text that is not a JSON scalar or array (a
      // bare word set by a program) is written as a string.
      Json v = Json::parse(text, nullptr, /*allow_exceptions=*/false);
      std::string value =
          (v.is_discarded() || v.is_object() || v.is_null())
              ? Quote(text)
              : v.dump(-1, ' ', false, Json::error_handler_t::replace);
      out += first ? "\n  " : ",\n  ";
      out += fmt::format("{}: {}", Quote(key), value);
      first = false;
    }
    out += "\n }";
  }
  out += "\n}\n";
  return out;
}

Status SaveTrace(const TraceFile& trace, const std::string& path) {
  // Written beside the target and renamed over it: a reader sees the old
  // file or the whole new one, never a half-written trace.
  const std::string text = TraceToJson(trace);
  const std::string tmp = fmt::format("{}.tmp.{}", path, getpid());
  int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    return Status::FromErrno(
        errno, fmt::format("cannot create '{}' (to write '{}')", tmp, path));
  }
  auto fail = [&](std::string_view what) {
    Status s =
        Status::FromErrno(errno, fmt::format("cannot {} '{}'", what, tmp));
    if (fd >= 0) close(fd);
    unlink(tmp.c_str());
    return s;
  };
  size_t done = 0;
  while (done < text.size()) {
    ssize_t n = write(fd, text.data() + done, text.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return fail("write");
    }
    done += static_cast<size_t>(n);
  }
  if (fsync(fd) != 0) return fail("sync");
  int rc = close(fd);
  fd = -1;
  if (rc != 0) return fail("close");
  if (rename(tmp.c_str(), path.c_str()) != 0) {
    Status s = Status::FromErrno(
        errno, fmt::format("cannot rename '{}' to '{}'", tmp, path));
    unlink(tmp.c_str());
    return s;
  }
  return Status::Ok();
}

Result<ModelShape> LoadModelShape(const std::string& path) {
  ZTIER_ASSIGN_OR_RETURN(std::string text, ReadFile(path, "model shape"));
  // "<path>:<line>:<column>: <key>: <message>", 1-based like compilers.
  std::vector<std::string> errors;
  auto add = [&](const YAML::Mark& mark, std::string_view key,
                 std::string_view msg) {
    std::string where = path;
    if (mark.line >= 0)
      where += fmt::format(":{}:{}", mark.line + 1, mark.column + 1);
    errors.push_back(key.empty() ? fmt::format("{}: {}", where, msg)
                                 : fmt::format("{}: {}: {}", where, key, msg));
  };
  auto fail = [&]() {
    return Status::InvalidArgument(fmt::format("{}", fmt::join(errors, "\n")));
  };

  ModelShape shape;
  shape.name = std::filesystem::path(path).stem().string();
  std::unordered_map<std::string, YAML::Mark> marks;  // key -> where it is
  try {
    YAML::Node root = YAML::Load(text);
    if (!root.IsMap()) {
      add(root.Mark(), "",
          "expected a mapping of shape keys (name, family, layers, ...)");
      return fail();
    }
    for (auto it = root.begin(); it != root.end(); ++it) {
      const YAML::Node k = it->first;  // a copy: it-> returns a temporary
      const YAML::Node v = it->second;  // a copy: it-> returns a temporary
      if (!k.IsScalar()) {
        add(k.Mark(), "", "a key must be a plain word");
        continue;
      }
      const std::string key = k.Scalar();
      if (std::find(std::begin(kShapeKeys), std::end(kShapeKeys), key) ==
          std::end(kShapeKeys)) {
        add(k.Mark(), key, "unknown key" + UnknownKeyHint(key, kShapeKeys));
        continue;
      }
      if (!marks.emplace(key, k.Mark()).second) {
        add(k.Mark(), key, "given twice");
        continue;
      }
      if (!v.IsScalar()) {
        add(v.Mark(), key, "expected a single value");
        continue;
      }
      const std::string& s = v.Scalar();
      if (key == "name") {
        shape.name = s;
      } else if (key == "family") {
        shape.family = s;
      } else if (key == "tied_embeddings") {
        if (s == "true" || s == "True") {
          shape.tied_embeddings = true;
        } else if (s == "false" || s == "False") {
          shape.tied_embeddings = false;
        } else {
          add(v.Mark(), key,
              fmt::format("expected true or false, got '{}'", s));
        }
      } else {
        Result<uint64_t> n = tiering::ParseElementCount(s, tiering::Limits{});
        if (!n.ok()) {
          add(v.Mark(), key, n.status().message());
          continue;
        }
        uint64_t* field = key == "layers"       ? &shape.layers
                          : key == "hidden"     ? &shape.hidden
                          : key == "heads"      ? &shape.heads
                          : key == "kv_heads"   ? &shape.kv_heads
                          : key == "vocab"      ? &shape.vocab
                          : key == "ffn_hidden" ? &shape.ffn_hidden
                          : key == "seq_len"    ? &shape.seq_len
                          : key == "batch"      ? &shape.batch
                          : key == "experts"    ? &shape.experts
                                                : &shape.moe_every;
        *field = *n;
      }
    }
    for (std::string_view req :
         {"family", "layers", "hidden", "heads", "vocab"}) {
      if (!marks.contains(std::string(req)))
        add(root.Mark(), req, "missing (required)");
    }
    if (shape.family != "moe" && marks.contains("moe_every")) {
      add(marks.at("moe_every"), "moe_every",
          "only the moe family has MoE layers");
    }
  } catch (const YAML::Exception& e) {
    add(e.mark, "", fmt::format("not valid YAML: {}", e.msg));
    return fail();
  } catch (const std::exception& e) {
    add(YAML::Mark::null_mark(), "",
        fmt::format("cannot read YAML: {}", e.what()));
    return fail();
  }
  if (!errors.empty()) return fail();
  for (const auto& [key, msg] : ShapeProblems(shape)) {
    auto it = marks.find(key);
    add(it == marks.end() ? YAML::Mark::null_mark() : it->second, key, msg);
  }
  if (!errors.empty()) return fail();
  return shape;
}

Result<TraceFile> GenerateTrace(const ModelShape& shape,
                                const TraceGenOptions& options) {
  std::vector<std::string> problems;
  for (const auto& [key, msg] : ShapeProblems(shape)) {
    problems.push_back(key.empty() ? msg : fmt::format("{}: {}", key, msg));
  }
  if (!(options.scale >= 1.0) || !std::isfinite(options.scale)) {
    problems.push_back(fmt::format(
        "scale: must be a finite number >= 1, got {}", options.scale));
  }
  StepCountProblems(options, problems);
  if (options.hints && (shape.family != "moe" || shape.experts == 0)) {
    problems.push_back(fmt::format(
        "hints: family '{}' has no router to hint after; hints need an MoE shape "
        "(family: moe, experts > 0)",
        shape.family));
  }
  if (options.world_size == 0)
    problems.push_back("world_size: must be at least 1");
  if (!problems.empty()) {
    return Status::InvalidArgument(fmt::format(
        "model shape '{}': {}", shape.name, fmt::join(problems, "; ")));
  }

  TraceBuilder b(options.scale, shape.seq_len * shape.batch);
  ModelModules modules =
      shape.family == "llama" ? BuildLlama(shape, b) : BuildGpt2(shape, b);
  TraceFile& t = b.trace();
  t.world_size = options.world_size;
  t.model = shape.name;
  t.steps.reserve(static_cast<size_t>(options.steps) *
                  (static_cast<size_t>(options.decode_steps) + 1));
  for (uint32_t s = 0; s < options.steps; ++s) {
    for (uint32_t d = 1; d <= options.decode_steps; ++d)
      t.steps.push_back(GenerateDecodeStep(modules, options, s, d));
    t.steps.push_back(GenerateTrainingStep(modules, options, s));
  }
  return std::move(t);
}

}  // namespace ztier::coordinator
