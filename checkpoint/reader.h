// Internal to checkpoint/: a checkpoint opened for reading (the manifest,
// every index, range reads over the extents of any rank), shared by load,
// verify and export; and which elements a rank's partition holds.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "base/status.h"
#include "checkpoint/checkpoint.h"
#include "checkpoint/format.h"
#include "checkpoint/shard.h"

namespace ztier::checkpoint {

// A small file of the checkpoint, checked against its size and CRC32C.
Result<std::string> ReadPinned(const std::string& dir, const FileRef& f);
// Rank `rank`'s index (< m.world_size), checked against the manifest.
Result<ShardIndex> ReadIndex(const std::string& dir, const Manifest& m, uint32_t rank);

// Elements [start, start + count) of the full parameter that rank `rank`'s
// partition holds (the padding past numel is not saved).
struct Span {
  uint64_t start = 0, count = 0;
};
Span Owned(const RankParam& p, uint32_t rank);

// A checkpoint opened for reading: the manifest and indexes, checked (CRCs,
// ranges, data file sizes); range reads over the extents of any rank.
class CheckpointReader {
 public:
  static Result<std::unique_ptr<CheckpointReader>> Open(const std::string& dir);

  const Manifest& manifest() const { return m_; }
  const std::vector<ShardIndex>& shards() const { return shards_; }
  // Copies elements [lo, hi) of (param, kind) into `out`, which must be
  // fully covered by saved extents. With `out` null: only checks that they
  // are (nothing is read).
  Status ReadRange(const ParamMeta& p, Kind kind, uint64_t lo, uint64_t hi, uint8_t* out);
  // Rank r's data file, opened on first use. At most kOpenReaders are open
  // at once (each holds two read windows), whatever the saved world size:
  // the least recently used is closed.
  Result<ShardReader*> Reader(uint32_t r);

 private:
  struct Ref {
    uint32_t rank;
    const Extent* e;
  };
  static constexpr size_t kOpenReaders = 2;
  std::string dir_;
  Manifest m_;
  std::vector<ShardIndex> shards_;
  std::map<std::pair<uint64_t, Kind>, std::vector<Ref>> by_key_;
  std::vector<std::unique_ptr<ShardReader>> readers_;
  std::vector<uint32_t> recent_;  // open readers, least recently used first
};

}  // namespace ztier::checkpoint
