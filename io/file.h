// Files for block I/O: one open file (with its direct-I/O alignment) and a
// logical file striped over several paths (several NVMe drives).
//
// Files are created 0600 and opened O_NOFOLLOW, with O_DIRECT unless the
// caller asks for buffered I/O. A File owns its fd (closed on destruction).
// Thread-safety: immutable after Open; share freely between threads.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "base/status.h"

namespace ztier::io {

struct OpenOptions {
  bool direct = true;      // O_DIRECT
  bool create = true;      // O_CREAT (mode 0600)
  bool writable = true;    // O_RDWR, else O_RDONLY
  bool truncate = false;   // O_TRUNC
};

class File {
 public:
  ~File();
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  // Opens `path`. Errors name the path and the reason (e.g. a filesystem that
  // refuses O_DIRECT, such as tmpfs on older kernels, says so and suggests
  // `direct: false`).
  static Result<std::unique_ptr<File>> Open(const std::string& path,
                                            const OpenOptions& options);

  int fd() const { return fd_; }
  const std::string& path() const { return path_; }
  bool direct() const { return direct_; }
  // Required alignment in bytes of buffer address, file offset and length for
  // direct I/O (1 when buffered). From statx(STATX_DIOALIGN) where the kernel
  // reports it, else the filesystem's logical block size, at least 512.
  uint32_t alignment() const { return alignment_; }

  Result<uint64_t> Size() const;
  // Reserves [0, bytes) on disk (fallocate); ENOSPC names the sizes.
  Status Allocate(uint64_t bytes) const;
  Status Truncate(uint64_t bytes) const;

 private:
  File(int fd, std::string path, bool direct, uint32_t alignment)
      : fd_(fd), path_(std::move(path)), direct_(direct), alignment_(alignment) {}
  int fd_;
  std::string path_;
  bool direct_;
  uint32_t alignment_;
};

// A logical byte range striped round-robin over one file per path, in units
// of `stripe_bytes`: logical offset o lives in file (o / stripe) % n at
// offset base + (o / (stripe * n)) * stripe + o % stripe, where `base` is a
// per-file header area left out of the logical range (0 by default).
class StripedFile {
 public:
  // `stripe_bytes` must be a multiple of every file's alignment.
  static Result<std::unique_ptr<StripedFile>> Open(
      const std::vector<std::string>& paths, uint64_t stripe_bytes,
      const OpenOptions& options);
  // Takes ownership of already open files.
  // `base_offset` (bytes, aligned) is skipped at the start of every file.
  static Result<std::unique_ptr<StripedFile>> FromFiles(
      std::vector<std::unique_ptr<File>> files, uint64_t stripe_bytes,
      uint64_t base_offset = 0);

  size_t file_count() const { return files_.size(); }
  const File& file(size_t i) const { return *files_[i]; }
  uint64_t stripe_bytes() const { return stripe_bytes_; }
  uint64_t base_offset() const { return base_offset_; }
  uint32_t alignment() const { return alignment_; }  // max over the files
  bool direct() const { return files_.front()->direct(); }
  // "a" or "a+b+c" for messages.
  std::string Describe() const;

  struct Location {
    size_t file_index;
    uint64_t offset;   // bytes in that file
    uint64_t length;   // bytes until the end of this stripe unit (capped)
  };
  // Maps logical [offset, offset+length) to the first physical piece.
  Location Map(uint64_t offset, uint64_t length) const;

  // Reserves `bytes` of logical space (each file gets its share, after its
  // header area).
  Status Allocate(uint64_t bytes) const;

 private:
  StripedFile(std::vector<std::unique_ptr<File>> files, uint64_t stripe_bytes,
              uint64_t base_offset, uint32_t alignment)
      : files_(std::move(files)),
        stripe_bytes_(stripe_bytes),
        base_offset_(base_offset),
        alignment_(alignment) {}
  std::vector<std::unique_ptr<File>> files_;
  uint64_t stripe_bytes_;
  uint64_t base_offset_;
  uint32_t alignment_;
};

}  // namespace ztier::io
