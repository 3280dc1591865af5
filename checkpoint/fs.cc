#include "checkpoint/fs.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

namespace ztier::checkpoint {
namespace {

Status Errno(const std::string& what, const std::string& path, int err) {
  std::string msg = fmt::format("{} {}: {}", what, path, strerror(err));
  if (err == ENOSPC) msg += " (the drive is full: free space or save elsewhere)";
  return Status::IoError(msg);
}

}  // namespace

Result<int> Fs::Create(const std::string& path, bool direct, bool* is_direct) {
  const int base = O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW;
  int fd = -1;
  if (direct) fd = open(path.c_str(), base | O_DIRECT, 0600);
  if (fd >= 0) {
    if (is_direct != nullptr) *is_direct = true;
    return fd;
  }
  if (direct && errno != EINVAL) return Errno("create", path, errno);
  fd = open(path.c_str(), base, 0600);
  if (fd < 0) return Errno("create", path, errno);
  if (is_direct != nullptr) *is_direct = false;
  return fd;
}

Status Fs::Write(int fd, const void* data, uint64_t bytes, uint64_t offset,
                 const std::string& path) {
  const auto* p = static_cast<const uint8_t*>(data);
  while (bytes > 0) {
    const ssize_t n = pwrite(fd, p, bytes, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Errno(fmt::format("write {} bytes at offset {} of", bytes, offset), path, errno);
    }
    if (n == 0) return Status::IoError(fmt::format("write to {} made no progress", path));
    p += n;
    bytes -= static_cast<uint64_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return Status::Ok();
}

Status Fs::Truncate(int fd, uint64_t bytes, const std::string& path) {
  if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) return Errno("truncate", path, errno);
  return Status::Ok();
}

Status Fs::Allocate(int fd, uint64_t bytes, const std::string& path) {
  if (bytes == 0) return Status::Ok();
  const int rc = posix_fallocate(fd, 0, static_cast<off_t>(bytes));
  if (rc != 0) return Errno(fmt::format("reserve {} bytes for", bytes), path, rc);
  return Status::Ok();
}

Status Fs::Fsync(int fd, const std::string& path) {
  if (fsync(fd) != 0) return Errno("fsync", path, errno);
  return Status::Ok();
}

Status Fs::Close(int fd, const std::string& path) {
  if (close(fd) != 0) return Errno("close", path, errno);
  return Status::Ok();
}

Status Fs::Mkdir(const std::string& path) {
  if (mkdir(path.c_str(), 0700) != 0) return Errno("create directory", path, errno);
  return Status::Ok();
}

Status Fs::FsyncDir(const std::string& path) {
  const int fd = open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return Errno("open directory", path, errno);
  const int rc = fsync(fd);
  const int err = errno;
  close(fd);
  if (rc != 0) return Errno("fsync directory", path, err);
  return Status::Ok();
}

Status Fs::Rename(const std::string& from, const std::string& to, bool exchange) {
  const unsigned flags = exchange ? RENAME_EXCHANGE : RENAME_NOREPLACE;
  if (renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), flags) != 0) {
    return Errno(fmt::format("rename {} to", from), to, errno);
  }
  return Status::Ok();
}

Status Fs::RemoveAll(const std::string& path) {
  std::error_code ec;
  std::filesystem::remove_all(path, ec);
  if (ec) return Status::IoError(fmt::format("remove {}: {}", path, ec.message()));
  return Status::Ok();
}

Fs& Fs::Posix() {
  static Fs* fs = new Fs();  // never destroyed: usable from any static destructor
  return *fs;
}

Status WriteSmallFile(Fs& fs, const std::string& path, const std::string& text) {
  ZTIER_ASSIGN_OR_RETURN(int fd, fs.Create(path, /*direct=*/false, nullptr));
  Status s = fs.Write(fd, text.data(), text.size(), 0, path);
  if (s.ok()) s = fs.Fsync(fd, path);
  Status c = fs.Close(fd, path);
  ZTIER_RETURN_IF_ERROR(s);
  return c;
}

Result<std::string> ReadSmallFile(const std::string& path, uint64_t max_bytes) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Errno("open", path, errno);
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    close(fd);
    return Errno("stat", path, err);
  }
  if (!S_ISREG(st.st_mode) || static_cast<uint64_t>(st.st_size) > max_bytes) {
    close(fd);
    return Status::Corruption(fmt::format("{} is not a regular file of at most {} bytes", path,
                                          max_bytes));
  }
  std::string text(static_cast<size_t>(st.st_size), '\0');
  uint64_t done = 0;
  while (done < text.size()) {
    const ssize_t n = pread(fd, text.data() + done, text.size() - done, static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = n < 0 ? errno : EIO;
      close(fd);
      return Errno("read", path, err);
    }
    done += static_cast<uint64_t>(n);
  }
  close(fd);
  return text;
}

}  // namespace ztier::checkpoint
