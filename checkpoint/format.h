// The checkpoint format (docs/checkpoint.md): what a checkpoint directory
// holds and how its two JSON documents are read and checked.
//
//   DIR/manifest.json      ztier-checkpoint-v1: world size, step, every
//                          parameter (id, name, numel, dtype, group, update
//                          count), the optimizer's groups, and for each rank
//                          its index file (bytes, CRC32C); the user blob and
//                          the config likewise; a CRC32C of itself.
//   DIR/rank-NNNNN.json    ztier-checkpoint-shard-v1: one rank's data file
//                          (bytes, chunk size, a CRC32C per chunk) and its
//                          extents: which elements of which parameter and
//                          kind lie where in the data file.
//   DIR/rank-NNNNN.bin     the data, extents end to end.
//   DIR/user-NNNNN.bin     one rank's user data (its index pins it)
//   DIR/config.yaml
//
// An extent names elements by their index in the full (unpartitioned)
// parameter, so a checkpoint loads at any world size: each rank of the
// loading run reads the overlap of its own partition with every extent.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "base/status.h"
#include "coordinator/collective.h"
#include "optim/adam.h"

namespace ztier::checkpoint {

inline constexpr const char* kManifestFormat = "ztier-checkpoint-v1";
inline constexpr const char* kShardFormat = "ztier-checkpoint-shard-v1";
inline constexpr const char* kManifestName = "manifest.json";
inline constexpr const char* kConfigName = "config.yaml";
// Bytes covered by one CRC32C of a data file.
inline constexpr uint64_t kChunkBytes = 4ull << 20;
// Limits on what a reader accepts (a damaged or hostile file is refused
// before anything is sized from it).
inline constexpr uint64_t kMaxJsonBytes = 1ull << 30;
inline constexpr uint32_t kMaxWorld = 1u << 16;

// What an extent holds. Parameter and gradient elements are in the
// parameter's dtype; the optimizer state is float32.
enum class Kind : uint8_t { kParam = 0, kGrad, kMaster, kExpAvg, kExpAvgSq };
inline constexpr int kKinds = 5;
const char* KindName(Kind k);

// Elements [start, start + count) of parameter `param` (its full index
// space), kind `kind`, at byte `offset` of the rank's data file.
struct Extent {
  uint64_t param = 0;
  Kind kind = Kind::kParam;
  uint64_t start = 0, count = 0;
  uint64_t offset = 0;
};

// A file of the checkpoint pinned by the manifest.
struct FileRef {
  std::string name;
  uint64_t bytes = 0;
  uint32_t crc32c = 0;
};

struct ShardIndex {
  uint32_t rank = 0;
  std::string data_file;        // relative to the checkpoint directory
  uint64_t data_bytes = 0;      // logical size (the file may be padded)
  uint64_t chunk_bytes = kChunkBytes;
  std::vector<uint32_t> crc32c;  // one per chunk of data_bytes
  std::vector<Extent> extents;
  FileRef user;  // this rank's user data (user-NNNNN.bin)
};

struct ParamMeta {
  uint64_t id = 0;
  std::string name;             // may be empty
  // Its shape (product numel; empty: a 0-d tensor), or none given (flat).
  std::optional<std::vector<uint64_t>> shape;
  uint64_t numel = 0;
  coordinator::DType dtype = coordinator::DType::kFloat32;
  bool has_state = false;  // the optimizer keeps state for it
  uint32_t group = 0;      // its parameter group
  uint64_t updates = 0;    // optimizer steps that updated it (bias correction)
  bool has_grad = false;   // a gradient was pending at the save
};


struct Manifest {
  uint32_t world_size = 1;
  uint64_t step = 0;           // optimizer steps taken
  std::string created;         // UTC, ISO 8601
  std::string library_version;
  std::vector<ParamMeta> params;  // registration order
  bool has_optimizer = false;
  std::vector<optim::AdamHyper> groups;  // the optimizer's groups
  std::vector<FileRef> ranks;  // index files, rank order
  FileRef user;  // rank 0's user data (its index names every rank's)
  FileRef config;
};

// Serialises with the manifest's own CRC32C (of the document without it).
std::string ManifestToJson(const Manifest& m);
// Parses and checks a manifest read from `path` (for messages): format,
// CRC, every field's type and range, ids unique.
Result<Manifest> ManifestFromJson(const std::string& text, const std::string& path);

std::string ShardToJson(const ShardIndex& s);
// Parses and checks an index; extents must lie inside the data and name
// parameters of `m` within their element count.
Result<ShardIndex> ShardFromJson(const std::string& text, const std::string& path,
                                 const Manifest& m);

// "rank-00003.json" / "rank-00003.bin" / "user-00003.bin".
std::string IndexFileName(uint32_t rank);
std::string DataFileName(uint32_t rank);
std::string UserFileName(uint32_t rank);

// Bytes per element of `kind` for a parameter of `dtype`.
uint32_t KindBytes(Kind kind, coordinator::DType dtype);

}  // namespace ztier::checkpoint
