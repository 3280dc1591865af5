// The file operations a checkpoint makes, behind one seam: the POSIX ones,
// and in tests an implementation that fails any one of them (every write,
// fsync, truncate, mkdir and rename is a point a crash or an error can hit).
// Every error names the path and the system's reason.
#pragma once

#include <cstdint>
#include <string>

#include "base/status.h"

namespace ztier::checkpoint {

class Fs {
 public:
  virtual ~Fs() = default;
  // A new file for writing (O_EXCL, no symbolic link followed, mode 0600),
  // with O_DIRECT when `direct` and the filesystem takes it (`*is_direct`
  // says which).
  virtual Result<int> Create(const std::string& path, bool direct, bool* is_direct);
  virtual Status Write(int fd, const void* data, uint64_t bytes, uint64_t offset,
                       const std::string& path);
  virtual Status Truncate(int fd, uint64_t bytes, const std::string& path);
  // Reserves `bytes` for the file (fallocate; its size becomes `bytes`).
  virtual Status Allocate(int fd, uint64_t bytes, const std::string& path);
  virtual Status Fsync(int fd, const std::string& path);
  virtual Status Close(int fd, const std::string& path);
  virtual Status Mkdir(const std::string& path);  // mode 0700
  virtual Status FsyncDir(const std::string& path);
  // rename(2) that refuses to replace `to`; with `exchange`, `to` must
  // exist and the two are swapped atomically (renameat2 RENAME_EXCHANGE).
  virtual Status Rename(const std::string& from, const std::string& to, bool exchange);
  // Removes a directory tree (best effort for what is already gone).
  virtual Status RemoveAll(const std::string& path);

  // The process-wide POSIX implementation.
  static Fs& Posix();
};

// Writes `text` to a new file at `path` and fsyncs it.
Status WriteSmallFile(Fs& fs, const std::string& path, const std::string& text);
// Reads a whole file of at most `max_bytes`.
Result<std::string> ReadSmallFile(const std::string& path, uint64_t max_bytes);

}  // namespace ztier::checkpoint
