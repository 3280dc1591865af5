#include "checkpoint/shard.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <future>

#include "base/crc32c.h"

namespace ztier::checkpoint {
namespace {

constexpr uint64_t kAlign = 4096;  // direct-I/O alignment (bytes)

uint8_t* AlignedAlloc(uint64_t bytes) {
  void* p = nullptr;
  if (posix_memalign(&p, kAlign, bytes) != 0) return nullptr;
  return static_cast<uint8_t*>(p);
}

}  // namespace

// ---------------------------------------------------------------- writer

ShardWriter::ShardWriter(Fs& fs, std::string path, uint64_t chunk_bytes, uint64_t buffer_bytes)
    : fs_(fs), path_(std::move(path)), chunk_bytes_(chunk_bytes), buffer_bytes_(buffer_bytes) {}

Result<std::unique_ptr<ShardWriter>> ShardWriter::Create(Fs& fs, const std::string& path,
                                                         uint64_t chunk_bytes,
                                                         uint64_t buffer_bytes, uint32_t buffers) {
  if (chunk_bytes == 0 || chunk_bytes % kAlign != 0 || buffer_bytes % chunk_bytes != 0 ||
      buffer_bytes == 0 || buffer_bytes / chunk_bytes > 64 || buffers < 2) {
    return Status::InvalidArgument(fmt::format(
        "shard writer: chunk {} / buffer {} bytes / {} buffers", chunk_bytes, buffer_bytes, buffers));
  }
  std::unique_ptr<ShardWriter> w(new ShardWriter(fs, path, chunk_bytes, buffer_bytes));
  for (uint32_t k = 0; k < buffers; ++k) {
    uint8_t* p = AlignedAlloc(buffer_bytes);
    if (p == nullptr) {
      return Status::ResourceExhausted(
          fmt::format("out of host memory for checkpoint write buffers ({} x {} bytes)", buffers,
                      buffer_bytes));
    }
    w->storage_.emplace_back(p, free);
    w->free_.push_back({p, 0, 0});
  }
  ZTIER_ASSIGN_OR_RETURN(w->fd_, fs.Create(path, /*direct=*/true, &w->direct_));
  w->current_ = w->free_.front();
  w->free_.pop_front();
  // Two writes in flight: one request at a time leaves the drive idle
  // between them.
  for (int k = 0; k < 2; ++k) w->threads_.emplace_back([p = w.get()] { p->Loop(); });
  return w;
}

ShardWriter::~ShardWriter() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();
  if (fd_ >= 0) close(fd_);
}

void ShardWriter::Loop() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stopping with nothing left
    Buffer b = queue_.front();
    queue_.pop_front();
    ++in_flight_;
    Status s;
    if (error_.ok()) {
      lock.unlock();
      // The chunks' CRCs here, off the thread that fills the buffers: a
      // buffer starts on a chunk boundary (its size is whole chunks).
      const uint64_t first = b.file_offset / chunk_bytes_;
      const uint64_t chunks = (b.bytes + chunk_bytes_ - 1) / chunk_bytes_;
      uint32_t crcs[64];
      for (uint64_t c = 0; c < chunks; ++c) {
        const uint64_t off = c * chunk_bytes_;
        crcs[c] = Crc32c(b.data + off, std::min(chunk_bytes_, b.bytes - off));
      }
      // O_DIRECT needs an aligned length: the tail is padded, and Finish
      // cuts the file back to its logical size.
      const uint64_t len = direct_ ? (b.bytes + kAlign - 1) / kAlign * kAlign : b.bytes;
      if (len > b.bytes) memset(b.data + b.bytes, 0, len - b.bytes);
      s = fs_.Write(fd_, b.data, len, b.file_offset, path_);
      lock.lock();
      if (crcs_.size() < first + chunks) crcs_.resize(first + chunks);
      std::copy(crcs, crcs + chunks, crcs_.begin() + static_cast<int64_t>(first));
    }
    --in_flight_;
    if (!s.ok() && error_.ok()) error_ = s;
    free_.push_back(b);
    cv_.notify_all();
  }
}

Status ShardWriter::Error() {
  std::lock_guard<std::mutex> lock(mu_);
  return error_;
}

Status ShardWriter::Submit() {
  std::unique_lock<std::mutex> lock(mu_);
  queue_.push_back(current_);
  cv_.notify_all();
  cv_.wait(lock, [&] { return !free_.empty(); });
  current_ = free_.front();
  free_.pop_front();
  current_.file_offset = offset_;
  current_.bytes = 0;
  return error_;
}

Status ShardWriter::Reserve(uint64_t bytes) {
  // O_DIRECT writes whole blocks: the reserve covers the padded tail.
  return fs_.Allocate(fd_, (bytes + kAlign - 1) / kAlign * kAlign, path_);
}

Status ShardWriter::Append(const void* data, uint64_t bytes) {
  const auto* p = static_cast<const uint8_t*>(data);
  while (bytes > 0) {
    if (current_.bytes == buffer_bytes_) ZTIER_RETURN_IF_ERROR(Submit());
    // Copy up to the end of the buffer (whole chunks: the writer threads
    // take each chunk's CRC32C).
    const uint64_t n = std::min(bytes, buffer_bytes_ - current_.bytes);
    memcpy(current_.data + current_.bytes, p, n);
    current_.bytes += n;
    offset_ += n;
    p += n;
    bytes -= n;
  }
  return Status::Ok();
}

Status ShardWriter::Finish() {
  if (current_.bytes > 0) ZTIER_RETURN_IF_ERROR(Submit());
  {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return queue_.empty() && in_flight_ == 0; });
  }
  ZTIER_RETURN_IF_ERROR(Error());
  ZTIER_RETURN_IF_ERROR(fs_.Truncate(fd_, offset_, path_));
  ZTIER_RETURN_IF_ERROR(fs_.Fsync(fd_, path_));
  const int fd = fd_;
  fd_ = -1;
  return fs_.Close(fd, path_);
}

// ---------------------------------------------------------------- reader

Result<std::unique_ptr<ShardReader>> ShardReader::Open(const std::string& path,
                                                       uint64_t data_bytes, uint64_t chunk_bytes,
                                                       std::vector<uint32_t> crcs) {
  std::unique_ptr<ShardReader> r(new ShardReader());
  r->path_ = path;
  r->data_bytes_ = data_bytes;
  r->chunk_bytes_ = chunk_bytes;
  r->crcs_ = std::move(crcs);
  r->fd_ = open(path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
  r->direct_ = r->fd_ >= 0;
  if (r->fd_ < 0) r->fd_ = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (r->fd_ < 0) {
    return Status::IoError(fmt::format("checkpoint data file {}: {}", path, strerror(errno)));
  }
  const off_t size = lseek(r->fd_, 0, SEEK_END);
  if (size < 0 || static_cast<uint64_t>(size) < data_bytes) {
    return Status::Corruption(fmt::format(
        "checkpoint data file {} holds {} bytes, its index says {} (truncated)", path,
        static_cast<long long>(size), data_bytes));
  }
  // A window of 16 MiB (at least one chunk) per read: few, large requests.
  r->window_chunks_ = std::max<uint64_t>(1, (16ull << 20) / chunk_bytes);
  r->window_.reset(AlignedAlloc(r->window_chunks_ * chunk_bytes));
  r->spare_.reset(AlignedAlloc(r->window_chunks_ * chunk_bytes));
  if (r->window_ == nullptr || r->spare_ == nullptr) {
    return Status::ResourceExhausted("out of host memory for a checkpoint read window");
  }
  return r;
}

ShardReader::~ShardReader() {
  if (ahead_.valid()) (void)ahead_.get();
  if (fd_ >= 0) close(fd_);
}

Status ShardReader::LoadInto(uint64_t k, uint8_t* buf, uint64_t* chunks_loaded) const {
  const uint64_t chunks = crcs_.size();
  const uint64_t n = std::min(window_chunks_, chunks - k);
  const uint64_t begin = k * chunk_bytes_;
  const uint64_t logical = std::min(n * chunk_bytes_, data_bytes_ - begin);
  const uint64_t len = direct_ ? (logical + kAlign - 1) / kAlign * kAlign : logical;
  uint64_t done = 0;
  while (done < len) {
    const ssize_t got = pread(fd_, buf + done, len - done, static_cast<off_t>(begin + done));
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) {
      return Status::IoError(fmt::format("read {} bytes at offset {} of {}: {}", len - done,
                                         begin + done, path_, strerror(errno)));
    }
    if (got == 0) break;  // end of file: the padding of the last block
    done += static_cast<uint64_t>(got);
  }
  if (done < logical) {
    return Status::Corruption(fmt::format("checkpoint data file {}: short read at offset {}",
                                          path_, begin + done));
  }
  for (uint64_t c = 0; c < n; ++c) {
    const uint64_t off = c * chunk_bytes_;
    const uint64_t bytes = std::min(chunk_bytes_, logical - off);
    if (Crc32c(buf + off, bytes) != crcs_[k + c]) {
      return Status::Corruption(fmt::format(
          "checkpoint data file {}: chunk {} (bytes [{}, {})) fails its CRC32C: the file is "
          "damaged; nothing of it is used",
          path_, k + c, begin + off, begin + off + bytes));
    }
  }
  *chunks_loaded = n;
  return Status::Ok();
}

Status ShardReader::Load(uint64_t k) {
  first_ = UINT64_MAX;  // invalid until checked
  Status s;
  uint64_t n = 0;
  if (ahead_.valid() && ahead_first_ == k) {
    s = ahead_.get();  // the window read ahead: swap it in
    std::swap(window_, spare_);
    n = ahead_chunks_;
  } else {
    if (ahead_.valid()) (void)ahead_.get();  // a guess that missed
    s = LoadInto(k, window_.get(), &n);
  }
  ZTIER_RETURN_IF_ERROR(s);
  first_ = k;
  loaded_ = n;
  // Reads are mostly front to back: the next window is read (and checked)
  // while this one is used.
  const uint64_t next = k + n;
  if (next < crcs_.size()) {
    ahead_first_ = next;
    ahead_ = std::async(std::launch::async,
                        [this, next] { return LoadInto(next, spare_.get(), &ahead_chunks_); });
  }
  return Status::Ok();
}

Status ShardReader::Read(uint64_t offset, uint64_t bytes, void* out) {
  if (offset > data_bytes_ || bytes > data_bytes_ - offset) {
    return Status::Corruption(fmt::format("checkpoint data file {}: bytes [{}, +{}) lie past its {}",
                                          path_, offset, bytes, data_bytes_));
  }
  auto* dst = static_cast<uint8_t*>(out);
  while (bytes > 0) {
    const uint64_t k = offset / chunk_bytes_;
    if (first_ == UINT64_MAX || k < first_ || k >= first_ + loaded_) ZTIER_RETURN_IF_ERROR(Load(k));
    const uint64_t in_window = offset - first_ * chunk_bytes_;
    const uint64_t window_end = std::min(loaded_ * chunk_bytes_, data_bytes_ - first_ * chunk_bytes_);
    const uint64_t n = std::min(bytes, window_end - in_window);
    memcpy(dst, window_.get() + in_window, n);
    dst += n;
    offset += n;
    bytes -= n;
  }
  return Status::Ok();
}

Status ShardReader::CheckAll() {
  for (uint64_t k = 0; k < crcs_.size(); k += window_chunks_) ZTIER_RETURN_IF_ERROR(Load(k));
  return Status::Ok();
}

}  // namespace ztier::checkpoint
