// Async block I/O backends: the backend-neutral request value and the thin
// interface that io_uring, libaio and psync implement.
//
// A backend moves single requests; it does not split, retry or validate them
// (the Engine does). It speaks -errno as liburing does: a submit error is the
// return of Submit(), kept apart from each op's result, which arrives in its
// Completion (bytes transferred, or -errno). Every result must be read.
//
// Ownership: the caller owns the buffers and fds and must keep them alive
// until the request's completion is reaped (Cancel() reaps everything).
// Thread-safety: a backend is driven by one thread at a time (Submit, Reap,
// Cancel from the same thread); psync's worker threads are internal.
#pragma once

#include <sys/uio.h>

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"

namespace ztier::io {

enum class Op : uint8_t { kRead = 0, kWrite = 1 };

std::string_view OpName(Op op);

// One contiguous transfer between a buffer and a file. Offsets and lengths
// are bytes.
struct Request {
  Op op = Op::kRead;
  int fd = -1;
  uint64_t offset = 0;   // bytes into the file
  uint32_t length = 0;   // bytes
  void* buf = nullptr;
  uint64_t user_data = 0;  // returned unchanged in the Completion
  // Index of the registered buffer that contains [buf, buf+length), or -1.
  int buf_index = -1;
};

struct Completion {
  uint64_t user_data = 0;
  int64_t result = 0;  // bytes transferred (>= 0) or -errno
};

enum class BackendKind : uint8_t { kAuto = 0, kIoUring, kLibaio, kPsync };

std::string_view BackendKindName(BackendKind kind);
// Parses "auto", "io_uring" (or "uring"), "libaio" (or "aio"), "psync".
Result<BackendKind> ParseBackendKind(std::string_view name);

struct BackendOptions {
  uint32_t queue_depth = 32;  // requests in flight at most
  bool sqpoll = false;        // io_uring: kernel submission-queue polling
  uint32_t sqpoll_idle_ms = 1000;
  uint32_t psync_threads = 0;  // psync: worker threads (0: = queue_depth, max 64)
};

class Backend {
 public:
  virtual ~Backend() = default;
  Backend(const Backend&) = delete;
  Backend& operator=(const Backend&) = delete;

  virtual BackendKind kind() const = 0;
  std::string_view name() const { return BackendKindName(kind()); }

  // Queues and submits the requests. Returns the number accepted (>= 0; may
  // be fewer than requests.size() when the queue is full) or -errno when
  // nothing could be submitted. At most queue_depth requests may be in flight.
  virtual int Submit(std::span<const Request> requests) = 0;

  // Reaps between min_complete and out.size() completions, blocking until at
  // least min_complete are available (min_complete <= in_flight()). Returns
  // the number written to `out` or -errno.
  virtual int Reap(std::span<Completion> out, uint32_t min_complete) = 0;

  // Requests submitted and not yet reaped.
  virtual uint32_t in_flight() const = 0;

  // Registers buffers (io_uring fixed buffers). Requests then name them by
  // buf_index. Backends without the notion accept and ignore. Returns -errno.
  virtual int RegisterBuffers(std::span<const iovec> buffers) {
    (void)buffers;
    return 0;
  }
  virtual int UnregisterBuffers() { return 0; }
  // Registers fds (io_uring fixed files); requests keep using plain fds, the
  // backend maps them. Returns -errno.
  virtual int RegisterFiles(std::span<const int> fds) {
    (void)fds;
    return 0;
  }
  virtual int UnregisterFiles() { return 0; }

  // Shutdown: cancels what can be cancelled and reaps every outstanding
  // request (their completions are returned, -ECANCELED or the real result),
  // so that buffers may be freed afterwards.
  virtual std::vector<Completion> Cancel() = 0;

 protected:
  Backend() = default;
};

// Creates a backend of `kind`. kAuto probes io_uring, libaio, psync in this
// order and logs its choice (and why earlier ones were skipped). An explicit
// kind that is not available is an error naming why (not built, kernel,
// sysctl io_uring_disabled, seccomp, memlock), never a silent fallback.
Result<std::unique_ptr<Backend>> CreateBackend(BackendKind kind,
                                               const BackendOptions& options);

// Individual factories (each returns kUnavailable with the reason).
Result<std::unique_ptr<Backend>> CreateIoUringBackend(const BackendOptions& o);
Result<std::unique_ptr<Backend>> CreateLibaioBackend(const BackendOptions& o);
Result<std::unique_ptr<Backend>> CreatePsyncBackend(const BackendOptions& o);

// Whether the backend was compiled in (not whether the kernel allows it).
bool BackendCompiled(BackendKind kind);

}  // namespace ztier::io
