#include "io/engine.h"

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <fmt/format.h>

#include "base/log.h"

namespace ztier::io {

// One logical transfer while it is in the engine.
struct Engine::TransferState {
  Transfer t;
  uint64_t issued = 0;         // bytes of t handed out as pieces so far
  uint32_t live_pieces = 0;    // pieces in flight or waiting to be resubmitted
  bool in_queue = true;        // still in queue_ (has bytes left to issue)
  Status status;               // first error, if any
};

// One backend request (at most block_size bytes, within one stripe unit).
struct Engine::Piece {
  TransferState* owner = nullptr;
  Request req;
  uint32_t retries = 0;
};

namespace {

bool IsTransient(int64_t res) { return res == -EAGAIN || res == -EINTR; }

constexpr uint64_t kSmallPieceBytes = 64 * 1024;  // below this, submit in small batches
constexpr size_t kSmallBatch = 4;                 // requests per submit for small pieces

std::string Where(const StripedFile& file, const Request& r,
                  const Transfer& t) {
  // The physical file of the piece, and the logical transfer it belongs to.
  std::string path;
  for (size_t i = 0; i < file.file_count(); ++i) {
    if (file.file(i).fd() == r.fd) path = file.file(i).path();
  }
  return fmt::format("{} of {} at offset {}, length {} (transfer at offset {}, length {})",
                     OpName(r.op), path, r.offset, r.length, t.offset, t.length);
}

}  // namespace

Engine::Engine(std::unique_ptr<Backend> backend, const EngineOptions& options)
    : backend_(std::move(backend)), options_(options) {
  reaped_.resize(options_.queue_depth);
  batch_.reserve(options_.queue_depth);
  ready_.reserve(options_.queue_depth);
}

Result<std::unique_ptr<Engine>> Engine::Create(std::unique_ptr<Backend> backend,
                                               const EngineOptions& options) {
  if (!backend) return Status::InvalidArgument("engine needs a backend");
  if (options.block_size == 0 || options.block_size > (1u << 30)) {
    return Status::InvalidArgument(fmt::format(
        "io.block_size {} bytes is out of range (1 byte to 1 GiB)", options.block_size));
  }
  if (options.queue_depth == 0 || options.queue_depth > 4096) {
    return Status::InvalidArgument(fmt::format(
        "io.queue_depth {} is out of range (1 to 4096)", options.queue_depth));
  }
  return std::unique_ptr<Engine>(new Engine(std::move(backend), options));
}

Engine::~Engine() {
  // Nothing may be in flight when buffers are freed: cancel and reap all.
  if (backend_ && backend_->in_flight() > 0) backend_->Cancel();
  in_flight_ = 0;
  std::vector<TransferState*> left(queue_.begin(), queue_.end());
  queue_.clear();
  // Transfers with pieces in flight are not in queue_ once fully issued;
  // collect them through their pieces.
  for (auto& p : piece_storage_) {
    if (p->owner && std::find(left.begin(), left.end(), p->owner) == left.end()) {
      left.push_back(p->owner);
    }
  }
  for (TransferState* s : left) {
    if (s->t.on_done) s->t.on_done(Status::Cancelled("I/O engine shut down"));
    delete s;
  }
}

Status Engine::RegisterBuffers(std::span<const iovec> regions) {
  if (!registered_.empty()) {
    return Status::FailedPrecondition("buffers are already registered with this engine");
  }
  int rc = backend_->RegisterBuffers(regions);
  if (rc < 0) {
    return Status::FromErrno(-rc, fmt::format(
        "register {} buffer region(s) with {} (fixed buffers are pinned and "
        "count against RLIMIT_MEMLOCK; raise it with `ulimit -l` or set "
        "io.register_buffers: false)",
        regions.size(), backend_->name()));
  }
  registered_.assign(regions.begin(), regions.end());
  return Status::Ok();
}

Status Engine::RegisterFiles(const std::vector<const StripedFile*>& files) {
  std::vector<int> fds;
  for (const StripedFile* f : files) {
    for (size_t i = 0; i < f->file_count(); ++i) fds.push_back(f->file(i).fd());
  }
  int rc = backend_->RegisterFiles(fds);
  if (rc < 0) {
    return Status::FromErrno(-rc, fmt::format("register {} file(s) with {}",
                                              fds.size(), backend_->name()));
  }
  return Status::Ok();
}

int Engine::BufferIndex(const void* buf, uint64_t len) const {
  const auto* p = static_cast<const uint8_t*>(buf);
  for (size_t i = 0; i < registered_.size(); ++i) {
    const auto* base = static_cast<const uint8_t*>(registered_[i].iov_base);
    if (p >= base && p + len <= base + registered_[i].iov_len) {
      return static_cast<int>(i);
    }
  }
  return -1;
}

Status Engine::Validate(const Transfer& t) const {
  if (t.file == nullptr) return Status::InvalidArgument("transfer has no file");
  if (t.buf == nullptr) return Status::InvalidArgument("transfer has no buffer");
  if (t.length == 0) return Status::InvalidArgument("transfer has length 0 bytes");
  const uint64_t a = t.file->alignment();
  if (a <= 1) return Status::Ok();
  const auto addr = reinterpret_cast<uintptr_t>(t.buf);
  const char* what = nullptr;
  uint64_t value = 0;
  if (addr % a != 0) {
    what = "buffer address";
    value = addr;
  } else if (t.offset % a != 0) {
    what = "file offset";
    value = t.offset;
  } else if (t.length % a != 0) {
    what = "length";
    value = t.length;
  }
  if (what != nullptr) {
    return Status::InvalidArgument(fmt::format(
        "{} of {}: {} {:#x} ({}) is not a multiple of {} bytes, the direct-I/O "
        "alignment of that file; align it or use buffered I/O (io.direct: false)",
        OpName(t.op), t.file->Describe(), what, value, value, a));
  }
  if (options_.block_size % a != 0) {
    return Status::InvalidArgument(fmt::format(
        "io.block_size {} bytes is not a multiple of the direct-I/O alignment "
        "{} bytes of {}",
        options_.block_size, a, t.file->Describe()));
  }
  return Status::Ok();
}

Status Engine::Submit(Transfer transfer) {
  ZTIER_RETURN_IF_ERROR(Validate(transfer));
  auto* s = new TransferState{std::move(transfer)};
  queue_.push_back(s);
  ++active_transfers_;
  return Status::Ok();
}

Engine::Piece* Engine::AllocPiece() {
  if (free_pieces_.empty()) {
    piece_storage_.push_back(std::make_unique<Piece>());
    return piece_storage_.back().get();
  }
  Piece* p = free_pieces_.back();
  free_pieces_.pop_back();
  return p;
}

void Engine::FreePiece(Piece* p) {
  p->owner = nullptr;
  p->retries = 0;
  free_pieces_.push_back(p);
}

// Cuts new pieces from queued transfers until queue_depth are in flight or
// waiting. Pieces are cut in submission order: transfer by transfer.
void Engine::Refill() {
  while (in_flight_ + ready_.size() < options_.queue_depth && !queue_.empty()) {
    TransferState* s = queue_.front();
    const Transfer& t = s->t;
    const uint64_t logical = t.offset + s->issued;
    const uint64_t want = std::min<uint64_t>(options_.block_size, t.length - s->issued);
    const StripedFile::Location loc = t.file->Map(logical, want);
    Piece* p = AllocPiece();
    p->owner = s;
    p->req.op = t.op;
    p->req.fd = t.file->file(loc.file_index).fd();
    p->req.offset = loc.offset;
    p->req.length = static_cast<uint32_t>(loc.length);
    p->req.buf = static_cast<uint8_t*>(t.buf) + s->issued;
    p->req.user_data = reinterpret_cast<uint64_t>(p);
    p->req.buf_index = registered_.empty() ? -1 : BufferIndex(p->req.buf, loc.length);
    s->issued += loc.length;
    ++s->live_pieces;
    ready_.push_back(p);
    if (s->issued == t.length) {
      s->in_queue = false;
      queue_.pop_front();
    }
  }
}

Status Engine::SubmitReady() {
  while (!ready_.empty()) {
    // Small pieces go to the kernel a few at a time: a large batch holds
    // its first request back until the last one is prepared (block-layer
    // plugging), which costs IOPS at 4 KiB. Large pieces go all at once.
    const size_t max_batch = options_.block_size < kSmallPieceBytes ? kSmallBatch : ready_.size();
    batch_.clear();
    for (size_t i = 0; i < ready_.size() && i < max_batch; ++i) batch_.push_back(ready_[i]->req);
    int n = backend_->Submit(batch_);
    if (n == -EAGAIN || n == -EBUSY || n == -EINTR || n == 0) {
      // The kernel wants completions reaped first; Poll will do that.
      if (in_flight_ > 0) return Status::Ok();
      if (n == -EINTR) continue;
      return Status::IoError(fmt::format(
          "{} backend accepts no request with none in flight ({})",
          backend_->name(), n == 0 ? "0 accepted" : std::string(strerror(-n))));
    }
    if (n < 0) {
      // A submit error belongs to the first request (e.g. -EBADF): fail it
      // and go on with the others.
      Piece* p = ready_.front();
      ready_.erase(ready_.begin());
      FinishPiece(p, Status::FromErrno(
                         -n, "submit " + Where(*p->owner->t.file, p->req, p->owner->t)));
      continue;
    }
    stats_.requests += static_cast<uint64_t>(n);
    in_flight_ += static_cast<uint32_t>(n);
    ready_.erase(ready_.begin(), ready_.begin() + n);
  }
  return Status::Ok();
}

void Engine::FinishPiece(Piece* piece, const Status& status) {
  TransferState* s = piece->owner;
  FreePiece(piece);
  if (!status.ok() && s->status.ok()) {
    s->status = status;
    ++stats_.failed_transfers;
    if (s->in_queue) {
      // Stop cutting pieces of a failed transfer.
      queue_.erase(std::find(queue_.begin(), queue_.end(), s));
      s->in_queue = false;
    }
  }
  --s->live_pieces;
  if (s->live_pieces > 0 || s->in_queue) return;
  --active_transfers_;
  if (s->t.on_done) s->t.on_done(s->status);
  delete s;
}

void Engine::HandleCompletion(const Completion& c) {
  auto* p = reinterpret_cast<Piece*>(c.user_data);
  --in_flight_;
  TransferState* s = p->owner;
  const int64_t res = c.result;
  if (!s->status.ok()) {
    // The transfer already failed: drop the rest of its pieces.
    FinishPiece(p, Status::Ok());
    return;
  }
  if (res < 0) {
    if (IsTransient(res) && p->retries < options_.max_retries) {
      ++p->retries;
      ++stats_.retries;
      ready_.push_back(p);
      return;
    }
    FinishPiece(p, Status::FromErrno(static_cast<int>(-res), Where(*s->t.file, p->req, s->t)));
    return;
  }
  const auto done = static_cast<uint64_t>(res);
  if (done > p->req.length) {
    FinishPiece(p, Status::Internal(fmt::format(
                       "{}: backend reported {} bytes for a {}-byte request",
                       Where(*s->t.file, p->req, s->t), done, p->req.length)));
    return;
  }
  stats_.bytes += done;
  if (done == p->req.length) {
    FinishPiece(p, Status::Ok());
    return;
  }
  // Short transfer (including 0 bytes): continue with the remainder.
  ++stats_.short_transfers;
  const uint32_t align = s->t.file->alignment();
  if (done == 0 && p->req.op == Op::kRead) {
    FinishPiece(p, Status::IoError(fmt::format(
                       "{}: read past end of file (0 bytes returned); the file "
                       "is shorter than the data expected in it",
                       Where(*s->t.file, p->req, s->t))));
    return;
  }
  if (done == 0 && ++p->retries > options_.max_retries) {
    FinishPiece(p, Status::IoError(fmt::format(
                       "{}: the device accepted 0 bytes {} times in a row",
                       Where(*s->t.file, p->req, s->t), p->retries), EIO));
    return;
  }
  if (align > 1 && done % align != 0) {
    // A direct-I/O remainder would be misaligned: for a read this means the
    // file ended inside the block.
    FinishPiece(p, Status::IoError(fmt::format(
                       "{}: only {} bytes transferred, and the remainder is not "
                       "{}-byte aligned (file ends mid-block?)",
                       Where(*s->t.file, p->req, s->t), done, align), EIO));
    return;
  }
  p->req.offset += done;
  p->req.length -= static_cast<uint32_t>(done);
  p->req.buf = static_cast<uint8_t*>(p->req.buf) + done;
  ready_.push_back(p);
}

Status Engine::Poll(bool wait) {
  Refill();
  ZTIER_RETURN_IF_ERROR(SubmitReady());
  if (in_flight_ == 0) return Status::Ok();
  const uint32_t min_complete = wait ? 1 : 0;
  int n;
  do {
    n = backend_->Reap(std::span<Completion>(reaped_.data(), reaped_.size()), min_complete);
  } while (n == -EINTR);
  if (n < 0) {
    return Status::FromErrno(-n, fmt::format("reap completions from {}", backend_->name()));
  }
  for (int i = 0; i < n; ++i) HandleCompletion(reaped_[i]);
  // Keep the device's queue full before the caller's next Poll.
  Refill();
  return SubmitReady();
}

Status Engine::Drain() {
  while (active_transfers_ > 0) {
    ZTIER_RETURN_IF_ERROR(Poll(true));
  }
  return Status::Ok();
}

namespace {
Status RunOne(Engine& engine, Transfer t) {
  Status result;
  bool done = false;
  t.on_done = [&](const Status& s) {
    result = s;
    done = true;
  };
  ZTIER_RETURN_IF_ERROR(engine.Submit(std::move(t)));
  while (!done) ZTIER_RETURN_IF_ERROR(engine.Poll(true));
  return result;
}
}  // namespace

Status Engine::Read(const StripedFile& file, uint64_t offset, uint64_t length,
                    void* buf) {
  return RunOne(*this, Transfer{Op::kRead, &file, offset, length, buf, nullptr});
}

Status Engine::Write(const StripedFile& file, uint64_t offset, uint64_t length,
                     const void* buf) {
  return RunOne(*this, Transfer{Op::kWrite, &file, offset, length,
                                const_cast<void*>(buf), nullptr});
}

}  // namespace ztier::io
