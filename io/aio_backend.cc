// libaio backend: Linux native AIO (io_setup / io_submit / io_getevents).
// Only truly asynchronous with O_DIRECT; buffered requests complete inside
// io_submit, which is still correct.
//
// Each request in flight owns one iocb of a fixed array of queue_depth; the
// caller's user_data is kept beside it. io_submit reports an error on a
// single request (bad fd, bad opcode) as its own return value and stops
// there; that error is turned into the request's completion so that, as with
// io_uring, Submit() fails only when the backend took nothing (EAGAIN).
#include <libaio.h>
#include <sys/utsname.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <deque>
#include <string>
#include <utility>
#include <vector>

#include "base/log.h"
#include "io/backend.h"

namespace ztier::io {
namespace {

// First line of a /proc file without its newline, or "" if unreadable.
std::string ReadProcLine(const char* path) {
  FILE* f = std::fopen(path, "re");
  if (f == nullptr) return "";
  char buf[128];
  std::string line;
  if (std::fgets(buf, sizeof(buf), f) != nullptr) line = buf;
  std::fclose(f);
  while (!line.empty() && line.back() == '\n') line.pop_back();
  return line;
}

Status ExplainSetupError(int err, uint32_t queue_depth) {
  const std::string what = fmt::format("io_setup({})", queue_depth);
  switch (err) {
    case EAGAIN:
      return Status::Unavailable(fmt::format(
          "{} failed with EAGAIN: the system-wide AIO event limit is reached "
          "(fs.aio-nr {} of fs.aio-max-nr {} in use); raise it with `sysctl "
          "-w fs.aio-max-nr=<more>` or lower io.queue_depth",
          what, ReadProcLine("/proc/sys/fs/aio-nr"),
          ReadProcLine("/proc/sys/fs/aio-max-nr")));
    case ENOSYS: {
      utsname u{};
      const std::string release = uname(&u) == 0 ? u.release : "unknown";
      return Status::Unavailable(
          fmt::format("{} failed with ENOSYS: kernel {} is built without AIO "
                      "(CONFIG_AIO); choose backend io_uring or psync",
                      what, release));
    }
    case EPERM:
      return Status::Unavailable(fmt::format(
          "{} failed with EPERM: a seccomp filter or container policy blocks "
          "the AIO system calls; allow io_setup/io_submit/io_getevents/"
          "io_cancel/io_destroy in the profile, or choose backend psync",
          what));
    case ENOMEM:
      return Status::Unavailable(fmt::format(
          "{} failed with ENOMEM: the kernel could not allocate the AIO ring; "
          "lower io.queue_depth",
          what));
    default:
      return Status::FromErrno(err, what).WithContext("libaio unavailable");
  }
}

class AioBackend final : public Backend {
 public:
  explicit AioBackend(uint32_t queue_depth)
      : queue_depth_(queue_depth),
        iocbs_(queue_depth),
        user_data_(queue_depth),
        batch_(queue_depth),
        events_(queue_depth) {
    free_.reserve(queue_depth);
    for (uint32_t i = queue_depth; i > 0; --i) free_.push_back(&iocbs_[i - 1]);
  }

  ~AioBackend() override {
    if (!ctx_ready_) return;
    if (in_flight() > 0) {
      Log(LogLevel::kWarning,
          "libaio backend destroyed with {} requests in flight: cancelling",
          in_flight());
      std::vector<Completion> dropped = Cancel();
      (void)dropped;  // their owner is gone; the requests are finished
    }
    const int r = io_destroy(ctx_);
    if (r < 0) Log(LogLevel::kError, "io_destroy failed: errno {}", -r);
  }

  Status Init() {
    const int r = io_setup(static_cast<int>(queue_depth_), &ctx_);
    if (r < 0) return ExplainSetupError(-r, queue_depth_);
    ctx_ready_ = true;
    return Status::Ok();
  }

  BackendKind kind() const override { return BackendKind::kLibaio; }

  int Submit(std::span<const Request> requests) override {
    const size_t n = std::min(requests.size(), free_.size());
    if (n == 0) return 0;
    for (size_t i = 0; i < n; ++i) {
      iocb* cb = free_.back();
      free_.pop_back();
      const Request& req = requests[i];
      const auto offset = static_cast<long long>(req.offset);
      if (req.op == Op::kRead) {
        io_prep_pread(cb, req.fd, req.buf, req.length, offset);
      } else {
        io_prep_pwrite(cb, req.fd, req.buf, req.length, offset);
      }
      user_data_[Index(cb)] = req.user_data;
      batch_[i] = cb;
    }

    size_t done = 0;  // batch_[0, done) accepted
    int last_error = 0;
    while (done < n) {
      const int r = io_submit(ctx_, static_cast<long>(n - done), &batch_[done]);
      if (r > 0) {
        done += static_cast<size_t>(r);
        continue;
      }
      if (r == -EINTR) continue;
      if (r == 0 || r == -EAGAIN) {
        // Out of kernel resources: stop here, the rest is not accepted.
        last_error = r == 0 ? -EAGAIN : r;
        break;
      }
      // batch_[done] itself was refused (EBADF, EINVAL, ...): that is its
      // result, delivered as a completion; go on with the ones after it.
      failed_.push_back(Failed{batch_[done], r});
      ++done;
    }
    // Hand back the iocbs that were not accepted.
    for (size_t i = n; i > done; --i) free_.push_back(batch_[i - 1]);
    if (done == 0) return last_error;
    return static_cast<int>(done);
  }

  int Reap(std::span<Completion> out, uint32_t min_complete) override {
    // Waiting for more than can ever arrive would block forever.
    if (min_complete > out.size() || min_complete > in_flight()) return -EINVAL;
    size_t n = 0;
    // Requests refused at submit are complete already.
    while (n < out.size() && !failed_.empty()) {
      const Failed f = failed_.front();
      failed_.pop_front();
      out[n++] = Completion{user_data_[Index(f.cb)], f.result};
      free_.push_back(f.cb);
    }
    const uint32_t in_kernel = InKernel();
    while (n < out.size() && in_kernel > 0) {
      const long want = static_cast<long>(
          std::min<size_t>({out.size() - n, in_kernel, events_.size()}));
      const long min_nr = n >= min_complete ? 0 : min_complete - n;
      const int r = io_getevents(ctx_, min_nr, want, events_.data(), nullptr);
      if (r == -EINTR) continue;
      if (r < 0) return n > 0 ? static_cast<int>(n) : r;
      for (int i = 0; i < r; ++i) {
        out[n++] = Take(events_[i]);
      }
      break;
    }
    return static_cast<int>(n);
  }

  uint32_t in_flight() const override {
    return queue_depth_ - static_cast<uint32_t>(free_.size());
  }

  std::vector<Completion> Cancel() override {
    std::vector<Completion> out;
    out.reserve(in_flight());
    while (!failed_.empty()) {
      const Failed f = failed_.front();
      failed_.pop_front();
      out.push_back(Completion{user_data_[Index(f.cb)], f.result});
      free_.push_back(f.cb);
    }
    if (InKernel() == 0) return out;
    // Ask the kernel to cancel each request. Regular-file I/O is not
    // cancellable (EINVAL); where a cancel starts (EINPROGRESS, or 0 on
    // some kernels) the completion still comes through the event ring, so
    // everything is reaped the same way below.
    std::vector<bool> busy(queue_depth_, true);
    for (iocb* cb : free_) busy[Index(cb)] = false;
    for (uint32_t i = 0; i < queue_depth_; ++i) {
      if (!busy[i]) continue;
      io_event ignored{};
      const int r = io_cancel(ctx_, &iocbs_[i], &ignored);
      (void)r;  // any outcome: the event is still reaped below
    }
    while (InKernel() > 0) {
      const long want = static_cast<long>(InKernel());
      const int r = io_getevents(ctx_, want, want, events_.data(), nullptr);
      if (r == -EINTR) continue;
      if (r < 0) {
        // io_destroy still waits for the kernel to finish the requests.
        Log(LogLevel::kError,
            "libaio cancel: waiting for {} requests failed: errno {}",
            InKernel(), -r);
        break;
      }
      for (int i = 0; i < r; ++i) out.push_back(Take(events_[i]));
    }
    return out;
  }

 private:
  struct Failed {
    iocb* cb;
    int64_t result;  // -errno from io_submit
  };

  size_t Index(const iocb* cb) const {
    return static_cast<size_t>(cb - iocbs_.data());
  }

  // Requests the kernel holds (accepted, not refused at submit, not reaped).
  uint32_t InKernel() const {
    return in_flight() - static_cast<uint32_t>(failed_.size());
  }

  Completion Take(const io_event& ev) {
    iocb* cb = ev.obj;
    free_.push_back(cb);
    // res carries bytes or a negative errno in an unsigned field.
    return Completion{user_data_[Index(cb)], static_cast<long>(ev.res)};
  }

  io_context_t ctx_ = nullptr;
  bool ctx_ready_ = false;
  const uint32_t queue_depth_;
  std::vector<iocb> iocbs_;
  std::vector<uint64_t> user_data_;  // caller's user_data, by iocb index
  std::vector<iocb*> free_;
  std::vector<iocb*> batch_;      // scratch for io_submit
  std::vector<io_event> events_;  // scratch for io_getevents
  std::deque<Failed> failed_;     // refused at submit, not yet reaped
};

}  // namespace

Result<std::unique_ptr<Backend>> CreateLibaioBackend(const BackendOptions& o) {
  // io_setup takes an int; larger depths also exceed the default aio-max-nr.
  if (o.queue_depth == 0 || o.queue_depth > 65536) {
    return Status::InvalidArgument(fmt::format(
        "libaio backend: queue_depth {} is outside 1..65536", o.queue_depth));
  }
  auto backend = std::make_unique<AioBackend>(o.queue_depth);
  ZTIER_RETURN_IF_ERROR(backend->Init());
  return std::unique_ptr<Backend>(std::move(backend));
}

}  // namespace ztier::io
