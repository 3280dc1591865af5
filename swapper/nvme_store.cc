#include "swapper/nvme_store.h"

#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <random>

#include <fmt/format.h>

namespace ztier::swapper {
namespace {

// The header's fixed part (little-endian, at offset 0 of each file; the rest
// of the 4096-byte block is zero). See docs/swap_format.md.
struct Header {
  char magic[8];          // "ZTIERSWP"
  uint32_t version;       // 1
  uint32_t header_bytes;  // 4096
  uint64_t run_id;        // random per store creation
  uint32_t rank, world_size;
  uint32_t file_index, file_count;
  uint64_t stripe_bytes;
  uint64_t capacity_bytes;  // logical bytes of the whole store
  char tag[32];
};
static_assert(sizeof(Header) <= kStoreHeaderBytes);

Status MakeDir(const std::string& dir) {
  std::error_code ec;
  std::filesystem::path p(dir);
  if (std::filesystem::is_directory(p, ec)) return Status::Ok();
  if (!p.parent_path().empty() && !std::filesystem::is_directory(p.parent_path(), ec)) {
    return Status::NotFound(fmt::format(
        "NVMe path {}: its parent directory {} does not exist; create it or "
        "point tiers.nvme.paths at a mounted drive",
        dir, p.parent_path().string()));
  }
  if (mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
    return Status::FromErrno(errno, fmt::format("create NVMe directory {}", dir));
  }
  return Status::Ok();
}

}  // namespace

std::string NvmeStore::FileName(const StoreOptions& o, size_t i) {
  return fmt::format("{}/ztier-{}-rank{}-of{}.swp", o.paths[i], o.tag, o.rank, o.world_size);
}

NvmeStore::~NvmeStore() {
  // Closing the fds (with file_) drops the locks.
  if (!remove_on_close_) return;
  for (const auto& path : file_paths_) unlink(path.c_str());
}

Result<std::unique_ptr<NvmeStore>> NvmeStore::Create(const StoreOptions& o,
                                                     uint64_t capacity_bytes) {
  if (o.paths.empty()) {
    return Status::InvalidArgument("the NVMe store needs at least one path (tiers.nvme.paths)");
  }
  if (o.rank >= o.world_size) {
    return Status::InvalidArgument(fmt::format("rank {} is not below world size {}",
                                               o.rank, o.world_size));
  }
  std::unique_ptr<NvmeStore> store(new NvmeStore());
  std::vector<std::unique_ptr<io::File>> files;
  io::OpenOptions open;
  open.direct = o.direct;
  open.truncate = true;  // fresh each run: never mistake old data for current
  for (size_t i = 0; i < o.paths.size(); ++i) {
    ZTIER_RETURN_IF_ERROR(MakeDir(o.paths[i]));
    std::string name = FileName(o, i);
    // Lock before truncating, so a live store of another process is not
    // clobbered: open without O_TRUNC first.
    io::OpenOptions probe = open;
    probe.truncate = false;
    ZTIER_ASSIGN_OR_RETURN(auto f, io::File::Open(name, probe));
    if (flock(f->fd(), LOCK_EX | LOCK_NB) != 0) {
      int err = errno;
      if (err == EWOULDBLOCK) {
        return Status::FailedPrecondition(fmt::format(
            "swap file {} is in use by another live process (locked); give "
            "each job its own NVMe path or rank",
            name));
      }
      return Status::FromErrno(err, fmt::format("lock {}", name));
    }
    ZTIER_RETURN_IF_ERROR(f->Truncate(0));
    store->file_paths_.push_back(name);
    store->remove_on_close_ = o.remove_on_close;
    files.push_back(std::move(f));
  }
  ZTIER_ASSIGN_OR_RETURN(store->file_,
                         io::StripedFile::FromFiles(std::move(files), o.stripe_bytes,
                                                    kStoreHeaderBytes));
  const uint64_t unit = o.stripe_bytes;
  store->capacity_ = (capacity_bytes + unit - 1) / unit * unit;
  std::random_device rd;
  store->run_id_ = (uint64_t{rd()} << 32) ^ rd() ^ static_cast<uint64_t>(getpid());

  // Reserve everything now: a disk too small fails here, with the sizes.
  Status reserved = store->file_->Allocate(store->capacity_);
  if (!reserved.ok()) {
    return reserved.WithContext(fmt::format(
        "NVMe store needs {} bytes ({:.2f} GiB) over {} path(s)", store->capacity_,
        store->capacity_ / double(1ull << 30), o.paths.size()));
  }
  // Headers: written with plain pwrite through an aligned block.
  void* block = nullptr;
  if (posix_memalign(&block, 4096, kStoreHeaderBytes) != 0) {
    return Status::ResourceExhausted("allocate a 4096-byte header block");
  }
  std::unique_ptr<void, decltype(&free)> guard(block, &free);
  for (size_t i = 0; i < store->file_->file_count(); ++i) {
    memset(block, 0, kStoreHeaderBytes);
    Header h{};
    memcpy(h.magic, "ZTIERSWP", 8);
    h.version = 1;
    h.header_bytes = kStoreHeaderBytes;
    h.run_id = store->run_id_;
    h.rank = o.rank;
    h.world_size = o.world_size;
    h.file_index = static_cast<uint32_t>(i);
    h.file_count = static_cast<uint32_t>(store->file_->file_count());
    h.stripe_bytes = o.stripe_bytes;
    h.capacity_bytes = store->capacity_;
    strncpy(h.tag, o.tag.c_str(), sizeof(h.tag) - 1);
    memcpy(block, &h, sizeof(h));
    const io::File& f = store->file_->file(i);
    ssize_t n = pwrite(f.fd(), block, kStoreHeaderBytes, 0);
    if (n != static_cast<ssize_t>(kStoreHeaderBytes)) {
      int err = n < 0 ? errno : EIO;
      return Status::FromErrno(err, fmt::format("write header of {}", f.path()));
    }
  }
  return store;
}

Result<Extent> NvmeStore::Allocate(uint64_t bytes) {
  const uint64_t a = std::max<uint64_t>(alignment(), 4096);
  const uint64_t aligned = (bytes + a - 1) / a * a;
  if (used_ + aligned > capacity_) {
    return Status::ResourceExhausted(fmt::format(
        "NVMe store is full: {} bytes asked, {} of {} bytes used", aligned, used_,
        capacity_));
  }
  Extent e{used_, aligned};
  used_ += aligned;
  return e;
}

std::string NvmeStore::Locate(uint64_t offset) const {
  io::StripedFile::Location loc = file_->Map(offset, 1);
  return fmt::format("{} at offset {}", file_->file(loc.file_index).path(), loc.offset);
}

}  // namespace ztier::swapper
