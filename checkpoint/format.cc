#include "checkpoint/format.h"

#include <fmt/format.h>

#include <limits>
#include <nlohmann/json.hpp>
#include <unordered_map>
#include <unordered_set>

#include "base/crc32c.h"

namespace ztier::checkpoint {
namespace {

using nlohmann::json;

// The document's CRC32C: of its compact dump without the "crc32c" key
// (nlohmann orders keys, so the dump is canonical).
uint32_t DocCrc(json doc) {
  doc.erase("crc32c");
  const std::string text = doc.dump();
  return Crc32c(text.data(), text.size());
}

// Typed access that names the path of a missing or mistyped field.
class Reader {
 public:
  explicit Reader(std::string path) : path_(std::move(path)) {}

  Status Bad(const std::string& where, const std::string& what) const {
    return Status::Corruption(fmt::format("checkpoint file {}: {}: {}", path_, where, what));
  }
  Result<const json*> Field(const json& obj, const char* key, const std::string& where) const {
    if (!obj.is_object()) return Bad(where, "not an object");
    auto it = obj.find(key);
    if (it == obj.end()) return Bad(where, fmt::format("no field '{}'", key));
    return &*it;
  }
  Result<uint64_t> U64(const json& obj, const char* key, const std::string& where,
                       uint64_t max = std::numeric_limits<uint64_t>::max()) const {
    ZTIER_ASSIGN_OR_RETURN(const json* v, Field(obj, key, where));
    if (!v->is_number_unsigned()) {
      return Bad(where, fmt::format("'{}' is not a non-negative integer", key));
    }
    const uint64_t x = v->get<uint64_t>();
    if (x > max) return Bad(where, fmt::format("'{}' is {}, above its limit {}", key, x, max));
    return x;
  }
  Result<std::string> Str(const json& obj, const char* key, const std::string& where) const {
    ZTIER_ASSIGN_OR_RETURN(const json* v, Field(obj, key, where));
    if (!v->is_string()) return Bad(where, fmt::format("'{}' is not a string", key));
    return v->get<std::string>();
  }
  Result<double> Num(const json& obj, const char* key, const std::string& where) const {
    ZTIER_ASSIGN_OR_RETURN(const json* v, Field(obj, key, where));
    if (!v->is_number()) return Bad(where, fmt::format("'{}' is not a number", key));
    return v->get<double>();
  }
  Result<bool> Bool(const json& obj, const char* key, const std::string& where) const {
    ZTIER_ASSIGN_OR_RETURN(const json* v, Field(obj, key, where));
    if (!v->is_boolean()) return Bad(where, fmt::format("'{}' is not true/false", key));
    return v->get<bool>();
  }
  Result<const json*> Array(const json& obj, const char* key, const std::string& where) const {
    ZTIER_ASSIGN_OR_RETURN(const json* v, Field(obj, key, where));
    if (!v->is_array()) return Bad(where, fmt::format("'{}' is not an array", key));
    return v;
  }

  // Parses `text` and checks its format name and CRC.
  Result<json> Document(const std::string& text, const char* format) const {
    json doc = json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (doc.is_discarded() || !doc.is_object()) {
      return Bad("the document", "not a JSON object (truncated or damaged)");
    }
    ZTIER_ASSIGN_OR_RETURN(std::string f, Str(doc, "format", "the document"));
    if (f != format) {
      return Bad("the document", fmt::format("format is '{}', expected '{}'", f, format));
    }
    ZTIER_ASSIGN_OR_RETURN(uint64_t crc, U64(doc, "crc32c", "the document", UINT32_MAX));
    if (DocCrc(doc) != crc) return Bad("the document", "its contents fail their CRC32C");
    return doc;
  }

  Result<FileRef> File(const json& obj, const char* key) const {
    ZTIER_ASSIGN_OR_RETURN(const json* f, Field(obj, key, "the document"));
    const std::string where = fmt::format("'{}'", key);
    FileRef r;
    ZTIER_ASSIGN_OR_RETURN(r.name, Str(*f, "name", where));
    ZTIER_ASSIGN_OR_RETURN(r.bytes, U64(*f, "bytes", where));
    ZTIER_ASSIGN_OR_RETURN(uint64_t crc, U64(*f, "crc32c", where, UINT32_MAX));
    r.crc32c = static_cast<uint32_t>(crc);
    // Names are plain file names inside the checkpoint directory.
    if (r.name.empty() || r.name.find('/') != std::string::npos || r.name[0] == '.') {
      return Bad(where, fmt::format("file name '{}' is not a plain name", r.name));
    }
    return r;
  }

 private:
  std::string path_;
};

json FileJson(const FileRef& f) {
  return json{{"name", f.name}, {"bytes", f.bytes}, {"crc32c", f.crc32c}};
}

json HyperJson(const optim::AdamHyper& h) {
  return json{{"lr", h.lr},
              {"beta1", h.beta1},
              {"beta2", h.beta2},
              {"eps", h.eps},
              {"weight_decay", h.weight_decay},
              {"adamw", h.adamw},
              {"bias_correction", h.bias_correction},
              {"grad_scale", h.grad_scale}};
}

Result<optim::AdamHyper> HyperFrom(const Reader& r, const json& g, const std::string& where) {
  optim::AdamHyper h;
  ZTIER_ASSIGN_OR_RETURN(h.lr, r.Num(g, "lr", where));
  ZTIER_ASSIGN_OR_RETURN(h.beta1, r.Num(g, "beta1", where));
  ZTIER_ASSIGN_OR_RETURN(h.beta2, r.Num(g, "beta2", where));
  ZTIER_ASSIGN_OR_RETURN(h.eps, r.Num(g, "eps", where));
  ZTIER_ASSIGN_OR_RETURN(h.weight_decay, r.Num(g, "weight_decay", where));
  ZTIER_ASSIGN_OR_RETURN(h.adamw, r.Bool(g, "adamw", where));
  ZTIER_ASSIGN_OR_RETURN(h.bias_correction, r.Bool(g, "bias_correction", where));
  ZTIER_ASSIGN_OR_RETURN(h.grad_scale, r.Num(g, "grad_scale", where));
  Status valid = optim::ValidateHyper(h);
  if (!valid.ok()) return r.Bad(where, std::string(valid.message()));
  return h;
}

}  // namespace

const char* KindName(Kind k) {
  switch (k) {
    case Kind::kParam: return "param";
    case Kind::kGrad: return "grad";
    case Kind::kMaster: return "master";
    case Kind::kExpAvg: return "exp_avg";
    case Kind::kExpAvgSq: return "exp_avg_sq";
  }
  return "?";
}

uint32_t KindBytes(Kind kind, coordinator::DType dtype) {
  return kind == Kind::kParam || kind == Kind::kGrad ? coordinator::DTypeBytes(dtype) : 4;
}

std::string IndexFileName(uint32_t rank) { return fmt::format("rank-{:05d}.json", rank); }
std::string DataFileName(uint32_t rank) { return fmt::format("rank-{:05d}.bin", rank); }
std::string UserFileName(uint32_t rank) { return fmt::format("user-{:05d}.bin", rank); }

std::string ManifestToJson(const Manifest& m) {
  json params = json::array();
  for (const ParamMeta& p : m.params) {
    params.push_back(json{{"id", p.id},
                          {"name", p.name},
                          {"shape", p.shape ? json(*p.shape) : json(nullptr)},
                          {"numel", p.numel},
                          {"dtype", std::string(coordinator::DTypeName(p.dtype))},
                          {"has_state", p.has_state},
                          {"group", p.group},
                          {"updates", p.updates},
                          {"has_grad", p.has_grad}});
  }
  json groups = json::array();
  for (const auto& h : m.groups) groups.push_back(HyperJson(h));
  json ranks = json::array();
  for (const FileRef& f : m.ranks) ranks.push_back(FileJson(f));
  json doc{{"format", kManifestFormat},
           {"world_size", m.world_size},
           {"step", m.step},
           {"created", m.created},
           {"library_version", m.library_version},
           {"params", std::move(params)},
           {"optimizer", m.has_optimizer ? json{{"groups", std::move(groups)}} : json(nullptr)},
           {"ranks", std::move(ranks)},
           {"user", FileJson(m.user)},
           {"config", FileJson(m.config)}};
  doc["crc32c"] = DocCrc(doc);
  return doc.dump(1) + "\n";
}

Result<Manifest> ManifestFromJson(const std::string& text, const std::string& path) {
  Reader r(path);
  ZTIER_ASSIGN_OR_RETURN(json doc, r.Document(text, kManifestFormat));
  Manifest m;
  const std::string top = "the document";
  ZTIER_ASSIGN_OR_RETURN(uint64_t world, r.U64(doc, "world_size", top, kMaxWorld));
  if (world == 0) return r.Bad(top, "world_size is 0");
  m.world_size = static_cast<uint32_t>(world);
  ZTIER_ASSIGN_OR_RETURN(m.step, r.U64(doc, "step", top));
  ZTIER_ASSIGN_OR_RETURN(m.created, r.Str(doc, "created", top));
  ZTIER_ASSIGN_OR_RETURN(m.library_version, r.Str(doc, "library_version", top));
  ZTIER_ASSIGN_OR_RETURN(const json* opt, r.Field(doc, "optimizer", top));
  m.has_optimizer = !opt->is_null();
  if (m.has_optimizer) {
    ZTIER_ASSIGN_OR_RETURN(const json* groups, r.Array(*opt, "groups", "'optimizer'"));
    if (groups->empty()) return r.Bad("'optimizer'", "no groups");
    for (size_t k = 0; k < groups->size(); ++k) {
      ZTIER_ASSIGN_OR_RETURN(auto h, HyperFrom(r, (*groups)[k], fmt::format("optimizer group {}", k)));
      m.groups.push_back(h);
    }
  }
  ZTIER_ASSIGN_OR_RETURN(const json* params, r.Array(doc, "params", top));
  std::unordered_set<uint64_t> ids;
  for (size_t k = 0; k < params->size(); ++k) {
    const json& p = (*params)[k];
    const std::string where = fmt::format("params[{}]", k);
    ParamMeta pm;
    ZTIER_ASSIGN_OR_RETURN(pm.id, r.U64(p, "id", where));
    ZTIER_ASSIGN_OR_RETURN(pm.name, r.Str(p, "name", where));
    // Elements times 4 bytes must not overflow.
    ZTIER_ASSIGN_OR_RETURN(pm.numel, r.U64(p, "numel", where, UINT64_MAX / 8));
    ZTIER_ASSIGN_OR_RETURN(const json* shape, r.Field(p, "shape", where));
    if (!shape->is_null()) {
      if (!shape->is_array()) return r.Bad(where, "'shape' is neither null nor an array");
      if (shape->size() > 64) return r.Bad(where, "the shape has more than 64 dimensions");
      pm.shape.emplace();
      unsigned __int128 product = 1;
      for (const json& d : *shape) {
        if (!d.is_number_unsigned()) {
          return r.Bad(where, "a shape entry is not a non-negative integer");
        }
        pm.shape->push_back(d.get<uint64_t>());
        product *= pm.shape->back();
        if (product > pm.numel) product = static_cast<unsigned __int128>(pm.numel) + 1;  // no overflow
      }
      if (product != pm.numel) {
        return r.Bad(where, fmt::format("the shape's product is not numel {}", pm.numel));
      }
    }
    ZTIER_ASSIGN_OR_RETURN(std::string dtype, r.Str(p, "dtype", where));
    auto dt = coordinator::ParseDType(dtype);
    if (!dt.ok()) return r.Bad(where, std::string(dt.status().message()));
    pm.dtype = *dt;
    ZTIER_ASSIGN_OR_RETURN(pm.has_state, r.Bool(p, "has_state", where));
    ZTIER_ASSIGN_OR_RETURN(uint64_t group, r.U64(p, "group", where, UINT32_MAX));
    pm.group = static_cast<uint32_t>(group);
    ZTIER_ASSIGN_OR_RETURN(pm.updates, r.U64(p, "updates", where));
    ZTIER_ASSIGN_OR_RETURN(pm.has_grad, r.Bool(p, "has_grad", where));
    if (!ids.insert(pm.id).second) return r.Bad(where, fmt::format("id {} is listed twice", pm.id));
    if (pm.has_state && (!m.has_optimizer || pm.group >= m.groups.size())) {
      return r.Bad(where, fmt::format("group {} is not one of the optimizer's", pm.group));
    }
    m.params.push_back(std::move(pm));
  }
  ZTIER_ASSIGN_OR_RETURN(const json* ranks, r.Array(doc, "ranks", top));
  if (ranks->size() != m.world_size) {
    return r.Bad(top, fmt::format("{} rank files for world_size {}", ranks->size(), m.world_size));
  }
  for (size_t k = 0; k < ranks->size(); ++k) {
    json holder{{"f", (*ranks)[k]}};
    ZTIER_ASSIGN_OR_RETURN(FileRef f, r.File(holder, "f"));
    if (f.name != IndexFileName(static_cast<uint32_t>(k))) {
      return r.Bad(fmt::format("ranks[{}]", k), fmt::format("file '{}' is not {}", f.name,
                                                            IndexFileName(static_cast<uint32_t>(k))));
    }
    m.ranks.push_back(f);
  }
  ZTIER_ASSIGN_OR_RETURN(m.user, r.File(doc, "user"));
  ZTIER_ASSIGN_OR_RETURN(m.config, r.File(doc, "config"));
  return m;
}

std::string ShardToJson(const ShardIndex& s) {
  json extents = json::array();
  for (const Extent& e : s.extents) {
    extents.push_back(json::array({e.param, static_cast<int>(e.kind), e.start, e.count, e.offset}));
  }
  json doc{{"format", kShardFormat},
           {"rank", s.rank},
           {"data_file", s.data_file},
           {"data_bytes", s.data_bytes},
           {"chunk_bytes", s.chunk_bytes},
           {"chunk_crc32c", s.crc32c},
           {"extents", std::move(extents)},
           {"user", FileJson(s.user)}};
  doc["crc32c"] = DocCrc(doc);
  return doc.dump() + "\n";
}

Result<ShardIndex> ShardFromJson(const std::string& text, const std::string& path,
                                 const Manifest& m) {
  Reader r(path);
  ZTIER_ASSIGN_OR_RETURN(json doc, r.Document(text, kShardFormat));
  const std::string top = "the document";
  ShardIndex s;
  ZTIER_ASSIGN_OR_RETURN(uint64_t rank, r.U64(doc, "rank", top, kMaxWorld));
  s.rank = static_cast<uint32_t>(rank);
  ZTIER_ASSIGN_OR_RETURN(s.data_file, r.Str(doc, "data_file", top));
  if (s.data_file != DataFileName(s.rank)) {
    return r.Bad(top, fmt::format("data_file '{}' is not {}", s.data_file, DataFileName(s.rank)));
  }
  ZTIER_ASSIGN_OR_RETURN(s.data_bytes, r.U64(doc, "data_bytes", top, UINT64_MAX / 2));
  ZTIER_ASSIGN_OR_RETURN(s.chunk_bytes, r.U64(doc, "chunk_bytes", top, 1ull << 30));
  if (s.chunk_bytes == 0 || s.chunk_bytes % 4096 != 0) {
    return r.Bad(top, fmt::format("chunk_bytes {} is not a positive multiple of 4096",
                                  s.chunk_bytes));
  }
  ZTIER_ASSIGN_OR_RETURN(const json* crcs, r.Array(doc, "chunk_crc32c", top));
  const uint64_t chunks = (s.data_bytes + s.chunk_bytes - 1) / s.chunk_bytes;
  if (crcs->size() != chunks) {
    return r.Bad(top, fmt::format("{} chunk CRCs for {} bytes in chunks of {}", crcs->size(),
                                  s.data_bytes, s.chunk_bytes));
  }
  s.crc32c.reserve(chunks);
  for (const json& c : *crcs) {
    if (!c.is_number_unsigned() || c.get<uint64_t>() > UINT32_MAX) {
      return r.Bad("chunk_crc32c", "an entry is not a 32-bit unsigned integer");
    }
    s.crc32c.push_back(c.get<uint32_t>());
  }
  ZTIER_ASSIGN_OR_RETURN(s.user, r.File(doc, "user"));
  if (s.user.name != UserFileName(s.rank)) {
    return r.Bad(top, fmt::format("user file '{}' is not {}", s.user.name, UserFileName(s.rank)));
  }
  std::unordered_map<uint64_t, const ParamMeta*> params;
  for (const ParamMeta& p : m.params) params[p.id] = &p;
  ZTIER_ASSIGN_OR_RETURN(const json* extents, r.Array(doc, "extents", top));
  s.extents.reserve(extents->size());
  for (size_t k = 0; k < extents->size(); ++k) {
    const json& e = (*extents)[k];
    const std::string where = fmt::format("extents[{}]", k);
    if (!e.is_array() || e.size() != 5) return r.Bad(where, "not [param, kind, start, count, offset]");
    for (const json& v : e) {
      if (!v.is_number_unsigned()) return r.Bad(where, "a field is not a non-negative integer");
    }
    Extent x;
    x.param = e[0].get<uint64_t>();
    const uint64_t kind = e[1].get<uint64_t>();
    x.start = e[2].get<uint64_t>();
    x.count = e[3].get<uint64_t>();
    x.offset = e[4].get<uint64_t>();
    if (kind >= static_cast<uint64_t>(kKinds)) return r.Bad(where, fmt::format("kind {} is unknown", kind));
    x.kind = static_cast<Kind>(kind);
    auto it = params.find(x.param);
    if (it == params.end()) return r.Bad(where, fmt::format("parameter {} is not in the manifest", x.param));
    const ParamMeta& p = *it->second;
    if (x.start > p.numel || x.count > p.numel - x.start) {
      return r.Bad(where, fmt::format("elements [{}, +{}) outside parameter {} of {}", x.start,
                                      x.count, p.id, p.numel));
    }
    const uint64_t bytes = x.count * KindBytes(x.kind, p.dtype);  // numel <= 2^61: no overflow
    if (x.offset > s.data_bytes || bytes > s.data_bytes - x.offset) {
      return r.Bad(where, fmt::format("bytes [{}, +{}) outside the data file's {}", x.offset,
                                      bytes, s.data_bytes));
    }
    s.extents.push_back(x);
  }
  return s;
}

}  // namespace ztier::checkpoint
