// io_uring backend: one ring of queue_depth entries, one io_uring_submit per
// Submit() batch, completions reaped in batches straight from the CQ ring.
//
// Each request in flight holds a slot (0 .. queue_depth-1) that is its
// user_data inside the ring; the caller's user_data is kept in the slot. This
// keeps every 64-bit user_data value usable by the caller and leaves
// kCancelTag for the ring's own cancel operations, whose completions are
// never shown to the caller.
#include <liburing.h>
#include <sys/resource.h>
#include <sys/utsname.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "base/log.h"
#include "io/backend.h"

namespace ztier::io {
namespace {

// user_data of cancel SQEs; slots are < queue_depth, so they never collide.
constexpr uint64_t kCancelTag = ~uint64_t{0};
// The kernel's limit on SQ entries (IORING_MAX_ENTRIES).
constexpr uint32_t kMaxRingEntries = 32768;
// CQEs taken from the ring per peek.
constexpr unsigned kPeekBatch = 64;

// First line of a /proc file without its newline, or "" if unreadable.
std::string ReadProcLine(const char* path) {
  FILE* f = std::fopen(path, "re");
  if (f == nullptr) return "";
  char buf[256];
  std::string line;
  if (std::fgets(buf, sizeof(buf), f) != nullptr) line = buf;
  std::fclose(f);
  while (!line.empty() && (line.back() == '\n' || line.back() == ' ')) {
    line.pop_back();
  }
  return line;
}

// "Seccomp: 2" from /proc/self/status: 0 none, 1 strict, 2 filter.
std::string SeccompMode() {
  FILE* f = std::fopen("/proc/self/status", "re");
  if (f == nullptr) return "";
  char buf[256];
  std::string mode;
  while (std::fgets(buf, sizeof(buf), f) != nullptr) {
    std::string line(buf);
    if (line.rfind("Seccomp:", 0) == 0) {
      mode = line.substr(8);
      mode.erase(0, mode.find_first_not_of(" \t"));
      while (!mode.empty() && mode.back() == '\n') mode.pop_back();
      break;
    }
  }
  std::fclose(f);
  return mode;
}

std::string KernelRelease() {
  utsname u{};
  if (uname(&u) != 0) return "unknown";
  return u.release;
}

std::string LimitText(rlim_t v) {
  return v == RLIM_INFINITY
             ? std::string("unlimited")
             : std::to_string(static_cast<uint64_t>(v)) + " bytes";
}

// Whether a plain ring (no SQPOLL) can be set up: tells an SQPOLL-only
// refusal apart from io_uring being refused altogether.
bool PlainRingWorks() {
  io_uring ring;
  if (io_uring_queue_init(2, &ring, 0) != 0) return false;
  io_uring_queue_exit(&ring);
  return true;
}

// Turns a failed io_uring_setup into a message that says why and what to do.
Status ExplainSetupError(int err, const BackendOptions& o) {
  const std::string what =
      fmt::format("io_uring_setup(entries={}{})", o.queue_depth,
                  o.sqpoll ? ", SQPOLL" : "");
  switch (err) {
    case ENOSYS:
      return Status::Unavailable(fmt::format(
          "{} failed with ENOSYS: kernel {} lacks io_uring (it needs Linux "
          "5.1+ built with CONFIG_IO_URING); choose backend libaio or psync",
          what, KernelRelease()));
    case EPERM: {
      const std::string disabled =
          ReadProcLine("/proc/sys/kernel/io_uring_disabled");
      if (disabled == "2") {
        return Status::Unavailable(fmt::format(
            "{} failed with EPERM: sysctl kernel.io_uring_disabled=2 disables "
            "io_uring for every process; as root run `sysctl -w "
            "kernel.io_uring_disabled=0`, or choose backend libaio or psync",
            what));
      }
      if (disabled == "1") {
        std::string group = ReadProcLine("/proc/sys/kernel/io_uring_group");
        return Status::Unavailable(fmt::format(
            "{} failed with EPERM: sysctl kernel.io_uring_disabled=1 allows "
            "io_uring only to CAP_SYS_ADMIN and to members of group "
            "kernel.io_uring_group (gid {}); add the user to that group, or "
            "as root run `sysctl -w kernel.io_uring_disabled=0`, or choose "
            "backend libaio or psync",
            what, group.empty() ? "unknown" : group));
      }
      if (o.sqpoll && PlainRingWorks()) {
        return Status::Unavailable(fmt::format(
            "{} failed with EPERM: a ring without SQPOLL works, so SQPOLL "
            "itself is refused (kernels before 5.11 reserve it to root / "
            "CAP_SYS_ADMIN); run as root or set io.sqpoll: false",
            what));
      }
      const std::string seccomp = SeccompMode();
      return Status::Unavailable(fmt::format(
          "{} failed with EPERM although kernel.io_uring_disabled={}: a "
          "seccomp filter or container policy blocks io_uring (this process "
          "has Seccomp: {}; container runtimes' default profiles often deny "
          "io_uring_setup), or a security module (SELinux, AppArmor) does; "
          "allow io_uring_setup/io_uring_enter/io_uring_register in the "
          "profile, or choose backend libaio or psync",
          what, disabled.empty() ? "unset" : disabled,
          seccomp.empty() ? "unknown" : seccomp));
    }
    case ENOMEM: {
      rlimit lim{};
      std::string limits = "unknown";
      if (getrlimit(RLIMIT_MEMLOCK, &lim) == 0) {
        limits = fmt::format("soft {}, hard {}", LimitText(lim.rlim_cur),
                             LimitText(lim.rlim_max));
      }
      return Status::Unavailable(fmt::format(
          "{} failed with ENOMEM: the rings could not be allocated or locked; "
          "RLIMIT_MEMLOCK is {} (kernels before 5.12 charge rings to it); "
          "raise it (ulimit -l, LimitMEMLOCK= in systemd, --ulimit "
          "memlock=-1 in Docker) or lower io.queue_depth",
          what, limits));
    }
    case EINVAL:
      return Status::Unavailable(fmt::format(
          "{} failed with EINVAL: kernel {} rejects these ring parameters "
          "(an SQPOLL idle of {} ms or a setup flag it does not know)",
          what, KernelRelease(), o.sqpoll_idle_ms));
    default:
      return Status::FromErrno(err, what).WithContext("io_uring unavailable");
  }
}

class UringBackend final : public Backend {
 public:
  explicit UringBackend(uint32_t queue_depth)
      : queue_depth_(queue_depth), slot_user_data_(queue_depth) {
    free_slots_.reserve(queue_depth);
    // Hand out low slots first (pop_back takes the last).
    for (uint32_t i = queue_depth; i > 0; --i) free_slots_.push_back(i - 1);
  }

  ~UringBackend() override {
    if (!ring_ready_) return;
    if (in_flight_ > 0) {
      Log(LogLevel::kWarning,
          "io_uring backend destroyed with {} requests in flight: cancelling",
          in_flight_);
      std::vector<Completion> dropped = Cancel();
      (void)dropped;  // their owner is gone; the requests are finished
    }
    io_uring_queue_exit(&ring_);
  }

  // Sets up the ring; on failure returns the reason as kUnavailable.
  Status Init(const BackendOptions& o) {
    io_uring_params params{};
    if (o.sqpoll) {
      params.flags |= IORING_SETUP_SQPOLL;
      params.sq_thread_idle = o.sqpoll_idle_ms;
    }
    int r = io_uring_queue_init_params(o.queue_depth, &ring_, &params);
    if (r < 0) return ExplainSetupError(-r, o);
    ring_ready_ = true;
    sqpoll_ = o.sqpoll;

    // IORING_OP_READ/WRITE arrived in 5.6, with the probe interface; a
    // kernel without the probe lacks them too.
    io_uring_probe* probe = io_uring_get_probe_ring(&ring_);
    const bool has_rw = probe != nullptr &&
                        io_uring_opcode_supported(probe, IORING_OP_READ) &&
                        io_uring_opcode_supported(probe, IORING_OP_WRITE);
    if (probe != nullptr) io_uring_free_probe(probe);
    if (!has_rw) {
      return Status::Unavailable(fmt::format(
          "kernel {} has io_uring without IORING_OP_READ/WRITE (Linux 5.6+ "
          "needed); choose backend libaio or psync",
          KernelRelease()));
    }
    Log(LogLevel::kDebug,
        "io_uring ring: {} SQ / {} CQ entries, features {:#x}{}",
        params.sq_entries, params.cq_entries, params.features,
        o.sqpoll ? ", SQPOLL" : "");
    return Status::Ok();
  }

  BackendKind kind() const override { return BackendKind::kIoUring; }

  int Submit(std::span<const Request> requests) override {
    const size_t n = std::min(requests.size(), free_slots_.size());
    size_t queued = 0;
    for (; queued < n; ++queued) {
      io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
      // Cannot happen while in_flight <= queue_depth <= SQ entries, unless
      // the SQPOLL thread has not yet consumed earlier entries.
      if (sqe == nullptr) break;
      Prepare(sqe, requests[queued]);
    }
    if (queued == 0) return 0;
    in_flight_ += static_cast<uint32_t>(queued);
    const int r = io_uring_submit(&ring_);
    // The SQEs are in the ring now and cannot be taken back. After a
    // transient refusal they stay there and the next io_uring_enter (the
    // next Submit or Reap) takes them, so they count as accepted. Errors on
    // a single request arrive in its CQE, not here.
    if (r < 0 && r != -EAGAIN && r != -EBUSY && r != -EINTR) {
      Log(LogLevel::kError, "io_uring_submit failed: errno {} ({} queued)", -r,
          queued);
      return r;
    }
    return static_cast<int>(queued);
  }

  int Reap(std::span<Completion> out, uint32_t min_complete) override {
    // Waiting for more than can ever arrive would block forever.
    if (min_complete > out.size() || min_complete > in_flight_) return -EINVAL;
    if (min_complete == 0 && io_uring_sq_ready(&ring_) > 0) {
      // Entries left by a transient submit refusal: push them on.
      const int r = io_uring_submit(&ring_);
      (void)r;  // on failure they stay queued; nothing is lost
    }
    size_t n = Harvest(out);
    while (n < min_complete) {
      const int r = WaitForCqes(min_complete - static_cast<uint32_t>(n));
      if (r < 0) return n > 0 ? static_cast<int>(n) : r;
      n += Harvest(out.subspan(n));
    }
    return static_cast<int>(n);
  }

  uint32_t in_flight() const override { return in_flight_; }

  int RegisterBuffers(std::span<const iovec> buffers) override {
    const int r = io_uring_register_buffers(
        &ring_, buffers.data(), static_cast<unsigned>(buffers.size()));
    if (r == 0) buffers_registered_ = true;
    return r;
  }

  int UnregisterBuffers() override {
    if (!buffers_registered_) return 0;
    const int r = io_uring_unregister_buffers(&ring_);
    if (r == 0) buffers_registered_ = false;
    return r;
  }

  int RegisterFiles(std::span<const int> fds) override {
    const int r = io_uring_register_files(&ring_, fds.data(),
                                          static_cast<unsigned>(fds.size()));
    if (r < 0) return r;
    fixed_index_.clear();
    for (size_t i = 0; i < fds.size(); ++i) {
      // -1 marks an empty slot; a repeated fd keeps its first index.
      if (fds[i] >= 0) fixed_index_.emplace(fds[i], static_cast<int>(i));
    }
    return 0;
  }

  int UnregisterFiles() override {
    if (fixed_index_.empty()) return 0;
    const int r = io_uring_unregister_files(&ring_);
    if (r == 0) fixed_index_.clear();
    return r;
  }

  std::vector<Completion> Cancel() override {
    std::vector<Completion> out;
    if (in_flight_ == 0) return out;
    out.reserve(in_flight_);
    // One cancel for everything in the ring (5.19+). Requests already at the
    // device finish normally; the others complete with -ECANCELED.
    if (QueueCancel(0, IORING_ASYNC_CANCEL_ANY | IORING_ASYNC_CANCEL_ALL)) {
      const int r = io_uring_submit(&ring_);
      (void)r;  // if refused now, the wait below submits it
    }
    std::vector<Completion> batch(queue_depth_);
    while (in_flight_ > 0 || pending_cancels_ > 0) {
      const size_t got = Harvest(batch);
      out.insert(out.end(), batch.begin(), batch.begin() + got);
      if (cancel_any_rejected_) {
        cancel_any_rejected_ = false;
        CancelEachSlot();
      }
      if (in_flight_ == 0 && pending_cancels_ == 0) break;
      if (got > 0) continue;
      const int r = WaitForCqes(1);
      if (r < 0) {
        // The ring itself failed; io_uring_queue_exit will still wait for
        // the kernel to finish the requests before it frees the ring.
        Log(LogLevel::kError,
            "io_uring cancel: waiting for {} requests failed: errno {}",
            in_flight_, -r);
        break;
      }
    }
    return out;
  }

 private:
  void Prepare(io_uring_sqe* sqe, const Request& req) {
    const uint32_t slot = free_slots_.back();
    free_slots_.pop_back();
    slot_user_data_[slot] = req.user_data;

    int fd = req.fd;
    bool fixed_file = false;
    if (!fixed_index_.empty()) {
      auto it = fixed_index_.find(req.fd);
      if (it != fixed_index_.end()) {
        fd = it->second;
        fixed_file = true;
      }
    }
    const bool fixed_buf = req.buf_index >= 0 && buffers_registered_;
    if (req.op == Op::kRead) {
      if (fixed_buf) {
        io_uring_prep_read_fixed(sqe, fd, req.buf, req.length, req.offset,
                                 req.buf_index);
      } else {
        io_uring_prep_read(sqe, fd, req.buf, req.length, req.offset);
      }
    } else {
      if (fixed_buf) {
        io_uring_prep_write_fixed(sqe, fd, req.buf, req.length, req.offset,
                                  req.buf_index);
      } else {
        io_uring_prep_write(sqe, fd, req.buf, req.length, req.offset);
      }
    }
    if (fixed_file) sqe->flags |= IOSQE_FIXED_FILE;
    io_uring_sqe_set_data64(sqe, slot);
  }

  // Takes the CQEs that are ready, up to out.size() of them for requests;
  // cancel CQEs are consumed without using room in `out`.
  size_t Harvest(std::span<Completion> out) {
    size_t n = 0;
    io_uring_cqe* cqes[kPeekBatch];
    while (n < out.size() || pending_cancels_ > 0) {
      const unsigned want = static_cast<unsigned>(
          std::min<size_t>(kPeekBatch, std::max<size_t>(out.size() - n, 1)));
      const unsigned got = io_uring_peek_batch_cqe(&ring_, cqes, want);
      if (got == 0) break;
      unsigned used = 0;
      for (; used < got; ++used) {
        const io_uring_cqe* cqe = cqes[used];
        const uint64_t tag = io_uring_cqe_get_data64(cqe);
        if (tag == kCancelTag) {
          --pending_cancels_;
          // Kernels before 5.19 do not know IORING_ASYNC_CANCEL_ANY.
          if (cqe->res == -EINVAL && !tried_each_slot_) {
            cancel_any_rejected_ = true;
          }
          continue;
        }
        if (n == out.size()) break;  // leave it in the ring for next time
        const auto slot = static_cast<uint32_t>(tag);
        out[n++] = Completion{slot_user_data_[slot], cqe->res};
        free_slots_.push_back(slot);
        --in_flight_;
      }
      io_uring_cq_advance(&ring_, used);
      if (used < got) break;
    }
    return n;
  }

  // Blocks until the CQ ring holds at least `count` entries, submitting any
  // SQEs still queued on the way (they may be the ones to wait for).
  int WaitForCqes(uint32_t count) {
    for (;;) {
      if (io_uring_cq_ready(&ring_) >= count) return 0;
      const int r = io_uring_submit_and_wait(&ring_, count);
      if (r >= 0 || r == -EINTR) continue;  // re-check: a signal ends waits
      if (r == -EAGAIN || r == -EBUSY) {
        // The kernel took no new SQEs and so did not wait; wait without
        // submitting if it holds requests that will complete.
        const uint32_t in_kernel = in_flight_ - io_uring_sq_ready(&ring_);
        if (in_kernel + pending_cancels_ > io_uring_cq_ready(&ring_)) {
          io_uring_cqe* cqe = nullptr;
          const int w = io_uring_wait_cqe(&ring_, &cqe);
          if (w == 0 || w == -EINTR) continue;
          return w;
        }
      }
      return r;
    }
  }

  // Queues a cancel SQE tagged kCancelTag; false if no SQE could be had.
  bool QueueCancel(uint64_t target, uint32_t flags) {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    for (int tries = 0; sqe == nullptr && tries < 100; ++tries) {
      // The SQ is full of entries the kernel has not taken yet.
      const int r =
          sqpoll_ ? io_uring_sqring_wait(&ring_) : io_uring_submit(&ring_);
      (void)r;  // retried below; giving up only means waiting longer
      sqe = io_uring_get_sqe(&ring_);
    }
    if (sqe == nullptr) return false;
    io_uring_prep_cancel64(sqe, target, static_cast<int>(flags));
    io_uring_sqe_set_data64(sqe, kCancelTag);
    ++pending_cancels_;
    return true;
  }

  // Older kernels: one cancel per busy slot, matched by its user_data.
  void CancelEachSlot() {
    tried_each_slot_ = true;
    std::vector<bool> busy(queue_depth_, true);
    for (uint32_t s : free_slots_) busy[s] = false;
    for (uint32_t s = 0; s < queue_depth_; ++s) {
      if (busy[s] && !QueueCancel(s, 0)) break;
    }
    const int r = io_uring_submit(&ring_);
    (void)r;  // if refused now, the wait in Cancel submits it
  }

  io_uring ring_{};
  bool ring_ready_ = false;
  bool sqpoll_ = false;
  const uint32_t queue_depth_;
  uint32_t in_flight_ = 0;        // accepted SQEs whose CQE was not reaped
  uint32_t pending_cancels_ = 0;  // cancel SQEs whose CQE was not seen
  bool cancel_any_rejected_ = false;
  bool tried_each_slot_ = false;
  std::vector<uint64_t> slot_user_data_;  // caller's user_data per slot
  std::vector<uint32_t> free_slots_;
  bool buffers_registered_ = false;
  std::unordered_map<int, int> fixed_index_;  // fd -> registered file index
};

}  // namespace

Result<std::unique_ptr<Backend>> CreateIoUringBackend(const BackendOptions& o) {
  if (o.queue_depth == 0 || o.queue_depth > kMaxRingEntries) {
    return Status::InvalidArgument(
        fmt::format("io_uring backend: queue_depth {} is outside 1..{}",
                    o.queue_depth, kMaxRingEntries));
  }
  auto backend = std::make_unique<UringBackend>(o.queue_depth);
  ZTIER_RETURN_IF_ERROR(backend->Init(o));
  return std::unique_ptr<Backend>(std::move(backend));
}

}  // namespace ztier::io
