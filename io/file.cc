#include "io/file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <string>

#include <fmt/format.h>

namespace ztier::io {
namespace {

constexpr uint32_t kMinDirectAlignment = 512;  // bytes: the smallest sector

// Direct-I/O alignment in bytes: statx(STATX_DIOALIGN) where the kernel and
// filesystem report it, else the filesystem's block size capped to 4096,
// never below 512.
uint32_t QueryDirectAlignment(int fd) {
#ifdef STATX_DIOALIGN
  struct statx stx {};
  if (statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) == 0 &&
      (stx.stx_mask & STATX_DIOALIGN) != 0 && stx.stx_dio_offset_align != 0) {
    uint32_t a = std::max(stx.stx_dio_offset_align, stx.stx_dio_mem_align);
    return std::max(a, kMinDirectAlignment);
  }
#endif
  struct stat st {};
  if (fstat(fd, &st) == 0 && st.st_blksize > 0) {
    uint32_t b = static_cast<uint32_t>(std::min<blksize_t>(st.st_blksize, 4096));
    return std::max(b, kMinDirectAlignment);
  }
  return 4096;
}

}  // namespace

File::~File() {
  if (fd_ >= 0) close(fd_);
}

Result<std::unique_ptr<File>> File::Open(const std::string& path,
                                         const OpenOptions& options) {
  int flags = O_CLOEXEC | O_NOFOLLOW;
  flags |= options.writable ? O_RDWR : O_RDONLY;
  if (options.create) flags |= O_CREAT;
  if (options.truncate) flags |= O_TRUNC;
  if (options.direct) flags |= O_DIRECT;
  int fd = open(path.c_str(), flags, 0600);
  if (fd < 0) {
    int err = errno;
    if (err == EINVAL && options.direct) {
      return Status::FromErrno(
          err, fmt::format("open {}: the filesystem refuses O_DIRECT (tmpfs "
                           "and some network filesystems do); put the file on "
                           "a disk-backed filesystem or set io.direct: false "
                           "(--no-direct)",
                           path));
    }
    if (err == ELOOP) {
      return Status::FromErrno(
          err, fmt::format("open {}: the path is a symbolic link, which ztier "
                           "refuses to follow; use the real path",
                           path));
    }
    return Status::FromErrno(err, fmt::format("open {}", path));
  }
  uint32_t alignment = options.direct ? QueryDirectAlignment(fd) : 1;
  return std::unique_ptr<File>(new File(fd, path, options.direct, alignment));
}

Result<uint64_t> File::Size() const {
  struct stat st {};
  if (fstat(fd_, &st) != 0) {
    return Status::FromErrno(errno, fmt::format("stat {}", path_));
  }
  return static_cast<uint64_t>(st.st_size);
}

Status File::Allocate(uint64_t bytes) const {
  if (bytes == 0) return Status::Ok();
  int rc = posix_fallocate(fd_, 0, static_cast<off_t>(bytes));
  if (rc != 0) {
    if (rc == ENOSPC) {
      return Status::FromErrno(
          rc, fmt::format("reserve {} bytes ({:.2f} GiB) for {}: not enough "
                          "free space on that filesystem; free space, use a "
                          "larger drive or add paths to stripe over",
                          bytes, bytes / double(1ull << 30), path_));
    }
    return Status::FromErrno(rc, fmt::format("reserve {} bytes for {}", bytes, path_));
  }
  return Status::Ok();
}

Status File::Truncate(uint64_t bytes) const {
  if (ftruncate(fd_, static_cast<off_t>(bytes)) != 0) {
    return Status::FromErrno(errno, fmt::format("truncate {} to {} bytes", path_, bytes));
  }
  return Status::Ok();
}

Result<std::unique_ptr<StripedFile>> StripedFile::Open(
    const std::vector<std::string>& paths, uint64_t stripe_bytes,
    const OpenOptions& options) {
  std::vector<std::unique_ptr<File>> files;
  for (const std::string& p : paths) {
    ZTIER_ASSIGN_OR_RETURN(std::unique_ptr<File> f, File::Open(p, options));
    files.push_back(std::move(f));
  }
  return FromFiles(std::move(files), stripe_bytes);
}

Result<std::unique_ptr<StripedFile>> StripedFile::FromFiles(
    std::vector<std::unique_ptr<File>> files, uint64_t stripe_bytes,
    uint64_t base_offset) {
  if (files.empty()) {
    return Status::InvalidArgument("a striped file needs at least one path");
  }
  uint32_t alignment = 1;
  for (const auto& f : files) alignment = std::max(alignment, f->alignment());
  if (stripe_bytes == 0 || stripe_bytes % alignment != 0) {
    return Status::InvalidArgument(fmt::format(
        "stripe size {} bytes must be a positive multiple of the direct-I/O "
        "alignment {} bytes",
        stripe_bytes, alignment));
  }
  if (base_offset % alignment != 0) {
    return Status::InvalidArgument(fmt::format(
        "header area {} bytes must be a multiple of the direct-I/O alignment {} bytes",
        base_offset, alignment));
  }
  return std::unique_ptr<StripedFile>(
      new StripedFile(std::move(files), stripe_bytes, base_offset, alignment));
}

std::string StripedFile::Describe() const {
  std::string s;
  for (size_t i = 0; i < files_.size(); ++i) {
    if (i) s += '+';
    s += files_[i]->path();
  }
  return s;
}

StripedFile::Location StripedFile::Map(uint64_t offset, uint64_t length) const {
  const uint64_t n = files_.size();
  if (n == 1) return {0, base_offset_ + offset, length};
  const uint64_t unit = offset / stripe_bytes_;
  const uint64_t within = offset % stripe_bytes_;
  Location loc;
  loc.file_index = unit % n;
  loc.offset = base_offset_ + (unit / n) * stripe_bytes_ + within;
  loc.length = std::min(length, stripe_bytes_ - within);
  return loc;
}

Status StripedFile::Allocate(uint64_t bytes) const {
  const uint64_t n = files_.size();
  const uint64_t units = (bytes + stripe_bytes_ - 1) / stripe_bytes_;
  for (uint64_t i = 0; i < n; ++i) {
    // File i holds units i, i+n, i+2n, ...: ceil((units - i) / n) of them.
    uint64_t mine = units > i ? (units - i + n - 1) / n : 0;
    ZTIER_RETURN_IF_ERROR(files_[i]->Allocate(base_offset_ + mine * stripe_bytes_));
  }
  return Status::Ok();
}

}  // namespace ztier::io
