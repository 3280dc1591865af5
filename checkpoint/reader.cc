// CheckpointReader (reader.h), ReadManifest and ReadUserData (checkpoint.h).
#include "checkpoint/reader.h"

#include <fmt/format.h>
#include <sys/stat.h>

#include <algorithm>
#include <filesystem>

#include "base/crc32c.h"

namespace ztier::checkpoint {

namespace fs = std::filesystem;

Span Owned(const RankParam& p, uint32_t rank) {
  const uint64_t start = uint64_t{rank} * p.part_numel;
  if (start >= p.numel) return {start, 0};
  return {start, std::min(p.part_numel, p.numel - start)};
}

Result<std::unique_ptr<CheckpointReader>> CheckpointReader::Open(const std::string& dir) {
  std::unique_ptr<CheckpointReader> o(new CheckpointReader());
  o->dir_ = dir;
  ZTIER_ASSIGN_OR_RETURN(o->m_, ReadManifest(dir));
  for (uint32_t r = 0; r < o->m_.world_size; ++r) {
    ZTIER_ASSIGN_OR_RETURN(ShardIndex s, ReadIndex(dir, o->m_, r));
    // A missing or truncated data file is found here, before a load
    // changes anything.
    const std::string data = dir + "/" + s.data_file;
    struct stat st {};
    if (stat(data.c_str(), &st) != 0 || !S_ISREG(st.st_mode) ||
        static_cast<uint64_t>(st.st_size) < s.data_bytes) {
      return Status::Corruption(fmt::format(
          "checkpoint data file {} is missing or shorter than the {} bytes its index gives "
          "(truncated?)",
          data, s.data_bytes));
    }
    o->shards_.push_back(std::move(s));
  }
  o->readers_.resize(o->shards_.size());
  for (uint32_t r = 0; r < o->shards_.size(); ++r) {
    for (const Extent& e : o->shards_[r].extents) o->by_key_[{e.param, e.kind}].push_back({r, &e});
  }
  for (auto& [key, list] : o->by_key_) {
    std::sort(list.begin(), list.end(),
              [](const Ref& x, const Ref& y) { return x.e->start < y.e->start; });
  }
  return o;
}

Status CheckpointReader::ReadRange(const ParamMeta& p, Kind kind, uint64_t lo, uint64_t hi, uint8_t* out) {
  const uint32_t eb = KindBytes(kind, p.dtype);
  auto it = by_key_.find({p.id, kind});
  uint64_t next = lo;  // elements below `next` are filled
  if (it != by_key_.end()) {
    for (const Ref& ref : it->second) {
      const Extent& e = *ref.e;
      if (next >= hi) break;
      if (e.start + e.count <= next) continue;
      if (e.start > next) break;  // a gap: reported below
      const uint64_t end = std::min(hi, e.start + e.count);
      if (out != nullptr) {
        ZTIER_ASSIGN_OR_RETURN(ShardReader * rd, Reader(ref.rank));
        ZTIER_RETURN_IF_ERROR(rd->Read(e.offset + (next - e.start) * eb, (end - next) * eb,
                                       out + (next - lo) * eb));
      }
      next = end;
    }
  }
  if (next < hi) {
    return Status::Corruption(fmt::format(
        "checkpoint {}: elements [{}, {}) of the {} of parameter {} are in no shard", dir_, next,
        hi, KindName(kind), p.id));
  }
  return Status::Ok();
}

Result<ShardReader*> CheckpointReader::Reader(uint32_t r) {
  if (readers_[r] == nullptr) {
    std::erase(recent_, r);
    if (recent_.size() >= kOpenReaders) {
      readers_[recent_.front()].reset();
      recent_.erase(recent_.begin());
    }
    const ShardIndex& s = shards_[r];
    ZTIER_ASSIGN_OR_RETURN(readers_[r], ShardReader::Open(dir_ + "/" + s.data_file, s.data_bytes,
                                                          s.chunk_bytes, s.crc32c));
  }
  if (recent_.empty() || recent_.back() != r) {
    std::erase(recent_, r);
    recent_.push_back(r);
  }
  return readers_[r].get();
}

Result<Manifest> ReadManifest(const std::string& dir) {
  const std::string path = dir + "/" + kManifestName;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return Status::NotFound(fmt::format("checkpoint {} does not exist (no such directory)", dir));
  }
  ZTIER_ASSIGN_OR_RETURN(std::string text, ReadSmallFile(path, kMaxJsonBytes));
  return ManifestFromJson(text, path);
}

Result<std::string> ReadPinned(const std::string& dir, const FileRef& f) {
  const std::string path = dir + "/" + f.name;
  ZTIER_ASSIGN_OR_RETURN(std::string text, ReadSmallFile(path, kMaxJsonBytes));
  if (text.size() != f.bytes || Crc32c(text.data(), text.size()) != f.crc32c) {
    return Status::Corruption(fmt::format(
        "checkpoint file {}: {} bytes, CRC32C {:08x}; expected {} bytes, {:08x} (damaged)", path,
        text.size(), Crc32c(text.data(), text.size()), f.bytes, f.crc32c));
  }
  return text;
}

Result<ShardIndex> ReadIndex(const std::string& dir, const Manifest& m, uint32_t rank) {
  const std::string path = dir + "/" + m.ranks[rank].name;
  ZTIER_ASSIGN_OR_RETURN(std::string text, ReadPinned(dir, m.ranks[rank]));
  ZTIER_ASSIGN_OR_RETURN(ShardIndex s, ShardFromJson(text, path, m));
  if (s.rank != rank) return Status::Corruption(fmt::format("{} describes rank {}", path, s.rank));
  return s;
}

Result<std::string> ReadUserData(const std::string& dir) {
  ZTIER_ASSIGN_OR_RETURN(Manifest m, ReadManifest(dir));
  return ReadPinned(dir, m.user);
}

Result<std::string> ReadUserData(const std::string& dir, uint32_t rank) {
  ZTIER_ASSIGN_OR_RETURN(Manifest m, ReadManifest(dir));
  if (rank >= m.world_size) {
    return Status::InvalidArgument(fmt::format(
        "checkpoint {} was saved by {} ranks: it has no rank {}", dir, m.world_size, rank));
  }
  ZTIER_ASSIGN_OR_RETURN(ShardIndex s, ReadIndex(dir, m, rank));
  return ReadPinned(dir, s.user);
}

}  // namespace ztier::checkpoint
