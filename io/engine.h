// The I/O engine: moves byte ranges between host buffers and (striped) files
// through one Backend, as fast as the drive allows.
//
// It splits each transfer into block_size pieces (also cut at stripe
// boundaries), keeps up to queue_depth pieces in flight, checks direct-I/O
// alignment up front (buffer, offset, length: the message says which and the
// required alignment), and reads every completion's result: a short transfer
// continues with its remainder, EAGAIN/EINTR are retried (bounded), a
// zero-byte read is end of file, and any other error fails that transfer
// with a Status naming file, offset, length and the errno text. A failed
// transfer stops issuing its remaining pieces and completes once the ones in
// flight are reaped; the engine stays usable for other transfers.
//
// Thread-safety: an Engine is driven by one thread (Submit, Poll, Drain).
// Completion callbacks run on that thread, inside Poll/Drain.
#pragma once

#include <sys/uio.h>

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <vector>

#include "base/status.h"
#include "io/backend.h"
#include "io/file.h"

namespace ztier::io {

struct EngineOptions {
  uint64_t block_size = 1u << 20;  // bytes per request (1 MiB)
  uint32_t queue_depth = 32;       // requests in flight at most
  uint32_t max_retries = 16;       // per piece, for EAGAIN/EINTR/0-byte writes
};

struct Transfer {
  Op op = Op::kRead;
  const StripedFile* file = nullptr;
  uint64_t offset = 0;  // logical bytes
  uint64_t length = 0;  // bytes
  void* buf = nullptr;
  // Called once, inside Poll/Drain, with the outcome of the whole transfer.
  std::function<void(const Status&)> on_done;
};

struct EngineStats {
  uint64_t requests = 0;        // pieces submitted to the backend
  uint64_t bytes = 0;           // bytes completed
  uint64_t short_transfers = 0; // completions shorter than asked
  uint64_t retries = 0;         // EAGAIN / EINTR / zero-byte write resubmits
  uint64_t failed_transfers = 0;
};

class Engine {
 public:
  static Result<std::unique_ptr<Engine>> Create(std::unique_ptr<Backend> backend,
                                                const EngineOptions& options);
  ~Engine();  // cancels and reaps everything in flight
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Registers [base, base+bytes) with the backend (io_uring fixed buffers);
  // later requests whose buffer lies inside use the registered index. May be
  // called once per region; fails with the backend's reason (e.g. memlock).
  Status RegisterBuffers(std::span<const iovec> regions);
  // Registers the files' fds (io_uring fixed files).
  Status RegisterFiles(const std::vector<const StripedFile*>& files);

  // Checks a transfer without queueing it (alignment, buffer, length). Reads
  // only immutable state: safe from any thread.
  Status Validate(const Transfer& t) const;

  // Validates and queues a transfer. Errors (misalignment, null buffer,
  // zero length) are returned here and on_done is not called.
  Status Submit(Transfer transfer);

  // Submits queued pieces (up to queue_depth in flight) and reaps completions.
  // With `wait`, blocks until at least one piece completes if any is in
  // flight. Returns an error only if the backend itself failed.
  Status Poll(bool wait);
  // Polls until every submitted transfer has completed.
  Status Drain();

  // Synchronous helpers: submit one transfer and drain.
  Status Read(const StripedFile& file, uint64_t offset, uint64_t length, void* buf);
  Status Write(const StripedFile& file, uint64_t offset, uint64_t length,
               const void* buf);

  // Transfers submitted and not completed.
  size_t pending() const { return active_transfers_; }
  const EngineStats& stats() const { return stats_; }
  const EngineOptions& options() const { return options_; }
  Backend& backend() { return *backend_; }

 private:
  struct TransferState;
  struct Piece;
  Engine(std::unique_ptr<Backend> backend, const EngineOptions& options);
  void Refill();
  Status SubmitReady();
  void HandleCompletion(const Completion& c);
  void FinishPiece(Piece* piece, const Status& status);
  int BufferIndex(const void* buf, uint64_t len) const;
  Piece* AllocPiece();
  void FreePiece(Piece* p);

  std::unique_ptr<Backend> backend_;
  EngineOptions options_;
  std::vector<iovec> registered_;
  std::deque<TransferState*> queue_;  // transfers with pieces left to issue
  std::vector<Piece*> ready_;         // pieces to (re)submit
  std::vector<std::unique_ptr<Piece>> piece_storage_;
  std::vector<Piece*> free_pieces_;
  std::vector<Completion> reaped_;
  std::vector<Request> batch_;
  size_t active_transfers_ = 0;
  uint32_t in_flight_ = 0;
  EngineStats stats_;
};

}  // namespace ztier::io
