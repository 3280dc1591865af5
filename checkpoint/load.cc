// Load and Verify (checkpoint.h) over a CheckpointReader.
#include <fmt/format.h>

#include <algorithm>
#include <map>
#include <vector>

#include "checkpoint/checkpoint.h"
#include "checkpoint/reader.h"

namespace ztier::checkpoint {
namespace {

// The engine must hold what was saved: same parameters, same optimizer layout.
Status CheckCompatible(const RankAccess& a, const Manifest& m, const std::string& dir) {
  std::map<uint64_t, const ParamMeta*> saved;
  for (const ParamMeta& p : m.params) saved[p.id] = &p;
  for (const RankParam& p : a.params) {
    auto it = saved.find(p.id);
    if (it == saved.end()) {
      return Status::FailedPrecondition(fmt::format(
          "checkpoint {} has no parameter {} ('{}'): it was saved from another model", dir, p.id,
          p.name));
    }
    const ParamMeta& s = *it->second;
    if (s.numel != p.numel || s.dtype != p.dtype) {
      return Status::FailedPrecondition(fmt::format(
          "checkpoint {}: parameter {} ('{}') was saved with {} elements of {}, this model has {} "
          "of {}",
          dir, p.id, p.name, s.numel, coordinator::DTypeName(s.dtype), p.numel,
          coordinator::DTypeName(p.dtype)));
    }
    const bool has_state = p.segment >= 0 && a.optimizer != nullptr;
    if (m.has_optimizer && has_state != s.has_state) {
      return Status::FailedPrecondition(fmt::format(
          "checkpoint {}: parameter {} ('{}') {} optimizer state in the checkpoint but {} here "
          "(create the optimizer with the same parameters and groups as the saved run)",
          dir, p.id, p.name, s.has_state ? "has" : "has no", has_state ? "has" : "has none"));
    }
    if (has_state && s.has_state && s.group != a.optimizer->segments()[p.segment].group) {
      return Status::FailedPrecondition(fmt::format(
          "checkpoint {}: parameter {} is in group {} in the checkpoint, {} here", dir, p.id,
          s.group, a.optimizer->segments()[p.segment].group));
    }
  }
  if (saved.size() != a.params.size()) {
    return Status::FailedPrecondition(fmt::format(
        "checkpoint {} holds {} parameters, this model registers {}", dir, saved.size(),
        a.params.size()));
  }
  if (m.has_optimizer != (a.optimizer != nullptr)) {
    return Status::FailedPrecondition(fmt::format(
        "checkpoint {} {} optimizer state and this engine {} an optimizer (create it before the "
        "load, as in the saved run)",
        dir, m.has_optimizer ? "holds" : "holds no", a.optimizer != nullptr ? "has" : "has no"));
  }
  if (m.has_optimizer && m.groups.size() != a.hypers.size()) {
    return Status::FailedPrecondition(fmt::format(
        "checkpoint {} has {} parameter groups, this optimizer {}", dir, m.groups.size(),
        a.hypers.size()));
  }
  return Status::Ok();
}

}  // namespace

Result<Manifest> Load(const RankAccess& a, const std::string& dir, bool* wrote) {
  if (wrote != nullptr) *wrote = false;
  ZTIER_ASSIGN_OR_RETURN(std::unique_ptr<CheckpointReader> ck, CheckpointReader::Open(dir));
  const Manifest& m = ck->manifest();
  ZTIER_RETURN_IF_ERROR(CheckCompatible(a, m, dir));
  if (wrote != nullptr) *wrote = true;
  if (a.before_load) a.before_load();
  std::map<uint64_t, const ParamMeta*> saved;
  for (const ParamMeta& p : m.params) saved[p.id] = &p;
  std::vector<uint8_t> buf;
  for (const RankParam& p : a.params) {
    const ParamMeta& s = *saved.at(p.id);
    const Span own = Owned(p, a.rank);
    const uint32_t eb = coordinator::DTypeBytes(p.dtype);
    for (Kind kind : {Kind::kParam, Kind::kGrad}) {
      if (kind == Kind::kGrad && !s.has_grad) continue;
      buf.assign(p.part_numel * eb, 0);  // the padding stays zero
      if (own.count > 0) {
        ZTIER_RETURN_IF_ERROR(ck->ReadRange(s, kind, own.start, own.start + own.count, buf.data()));
      }
      const auto& write = kind == Kind::kParam ? a.write_param : a.write_grad;
      Status w = write(p.id, buf.data());
      if (!w.ok()) {
        return w.WithContext(fmt::format("checkpoint load: write the {} partition of parameter {}",
                                         KindName(kind), p.id));
      }
    }
  }
  if (a.optimizer != nullptr) {
    const auto& segs = a.optimizer->segments();
    std::vector<const RankParam*> by_segment(segs.size(), nullptr);
    std::vector<uint64_t> updates(segs.size(), 0);
    for (const RankParam& p : a.params) {
      if (p.segment < 0) continue;
      by_segment[p.segment] = &p;
      updates[p.segment] = saved.at(p.id)->updates;
    }
    Status s = a.optimizer->ImportState(
        m.step, updates, [&](const swapper::OptimizerSwapper::StateRun<float>& r) -> Status {
          const RankParam* p = by_segment[r.segment];
          if (p == nullptr) return Status::Internal("a segment has no parameter");
          const Span own = Owned(*p, a.rank);
          if (r.seg_offset >= own.count) return Status::Ok();  // padding: zero
          const uint64_t lo = own.start + r.seg_offset;
          const uint64_t hi = lo + std::min(r.count, own.count - r.seg_offset);
          const ParamMeta& s = *saved.at(p->id);
          ZTIER_RETURN_IF_ERROR(ck->ReadRange(s, Kind::kMaster, lo, hi, reinterpret_cast<uint8_t*>(r.master)));
          ZTIER_RETURN_IF_ERROR(ck->ReadRange(s, Kind::kExpAvg, lo, hi, reinterpret_cast<uint8_t*>(r.exp_avg)));
          return ck->ReadRange(s, Kind::kExpAvgSq, lo, hi, reinterpret_cast<uint8_t*>(r.exp_avg_sq));
        });
    ZTIER_RETURN_IF_ERROR(s);
  }
  return m;
}

Status Verify(const std::string& dir, std::string* summary) {
  ZTIER_ASSIGN_OR_RETURN(std::unique_ptr<CheckpointReader> ck, CheckpointReader::Open(dir));
  const Manifest& m = ck->manifest();
  ZTIER_RETURN_IF_ERROR(ReadPinned(dir, m.user).status());
  ZTIER_RETURN_IF_ERROR(ReadPinned(dir, m.config).status());
  for (const ShardIndex& s : ck->shards()) ZTIER_RETURN_IF_ERROR(ReadPinned(dir, s.user).status());
  uint64_t bytes = 0;
  for (uint32_t r = 0; r < ck->shards().size(); ++r) {
    ZTIER_ASSIGN_OR_RETURN(ShardReader * rd, ck->Reader(r));
    ZTIER_RETURN_IF_ERROR(rd->CheckAll());
    bytes += ck->shards()[r].data_bytes;
  }
  // Every parameter complete in every kind it claims, from any rank: the
  // extents alone (every chunk was checked above, and the indexes keep
  // every extent inside its data file).
  uint64_t elements = 0;
  for (const ParamMeta& p : m.params) {
    elements += p.numel;
    std::vector<Kind> kinds{Kind::kParam};
    if (p.has_grad) kinds.push_back(Kind::kGrad);
    if (p.has_state) kinds.insert(kinds.end(), {Kind::kMaster, Kind::kExpAvg, Kind::kExpAvgSq});
    for (Kind k : kinds) ZTIER_RETURN_IF_ERROR(ck->ReadRange(p, k, 0, p.numel, nullptr));
  }
  if (summary != nullptr) {
    *summary = fmt::format(
        "checkpoint {}: valid (format {}, step {}, world size {}, {} parameters, {} elements, "
        "{} data bytes, optimizer state {}, saved {})",
        dir, kManifestFormat, m.step, m.world_size, m.params.size(), elements, bytes,
        m.has_optimizer ? "yes" : "no", m.created);
  }
  return Status::Ok();
}

}  // namespace ztier::checkpoint
