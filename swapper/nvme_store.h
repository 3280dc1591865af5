// NvmeStore: this rank's swap space, one preallocated file per NVMe path,
// striped, with a header block per file. Layout: docs/swap_format.md.
//
// A store is created fresh for each run: files are truncated, stamped with a
// new random run id and reserved in full with fallocate, so a disk that is
// too small fails at start with the sizes, and nothing left by an earlier run
// is ever read as data (the in-memory extent table, not the disk, says what
// has been written in this run). Each file is locked (flock) so that two live
// processes cannot share one store. Directories are created 0700, files 0600,
// opened O_NOFOLLOW. Extents are allocated bump-style, aligned to the
// direct-I/O alignment, in the order asked for.
//
// Thread-safety: Create/Allocate from one thread during set-up; file() and
// the extent values are immutable afterwards.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "base/status.h"
#include "io/file.h"

namespace ztier::swapper {

struct StoreOptions {
  std::vector<std::string> paths;  // directories, one per NVMe drive
  std::string tag = "params";      // file name part: params, optimizer, ...
  uint32_t rank = 0;
  uint32_t world_size = 1;
  uint64_t stripe_bytes = 1u << 20;  // bytes per stripe unit (io.block_size)
  bool direct = true;                // O_DIRECT
  // Delete the files when the store is destroyed (a store in a memory
  // filesystem, whose files would otherwise hold host memory after exit).
  bool remove_on_close = false;
};

struct Extent {
  uint64_t offset = 0;  // logical bytes into the striped file
  uint64_t bytes = 0;   // aligned length in bytes
};

// Bytes at the start of each file holding its header (one aligned block).
inline constexpr uint64_t kStoreHeaderBytes = 4096;

class NvmeStore {
 public:
  // Creates the directories and files and reserves `capacity_bytes` of
  // logical space (rounded up to whole stripe units).
  static Result<std::unique_ptr<NvmeStore>> Create(const StoreOptions& options,
                                                   uint64_t capacity_bytes);
  ~NvmeStore();

  const io::StripedFile& file() const { return *file_; }
  uint64_t capacity() const { return capacity_; }
  uint64_t used() const { return used_; }
  uint64_t run_id() const { return run_id_; }
  uint32_t alignment() const { return file_->alignment(); }
  const std::vector<std::string>& file_paths() const { return file_paths_; }

  // Reserves `bytes` (rounded up to the alignment) at the next free offset.
  Result<Extent> Allocate(uint64_t bytes);

  // "path at offset N" of the first byte of logical `offset`, for messages.
  std::string Locate(uint64_t offset) const;

  // Path of the file for path index `i` (exposed for tools and tests).
  static std::string FileName(const StoreOptions& options, size_t i);

 private:
  NvmeStore() = default;
  std::unique_ptr<io::StripedFile> file_;
  std::vector<std::string> file_paths_;
  uint64_t capacity_ = 0;
  uint64_t used_ = 0;
  uint64_t run_id_ = 0;
  bool remove_on_close_ = false;
};

}  // namespace ztier::swapper
