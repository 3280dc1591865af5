// psync: the portable backend and the reference the others are tested
// against. A fixed pool of worker threads runs one pread(2)/pwrite(2) per
// request; results go back unchanged (a short transfer stays short, an error
// is -errno), because splitting and retrying are the Engine's job.
//
// Threading: Submit/Reap/Cancel run on the driving thread; the workers only
// touch pending_, done_ and stop_, all under mu_. in_flight_ belongs to
// the driving thread alone.
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "base/log.h"
#include "io/backend.h"

namespace ztier::io {
namespace {

// More threads than this buys nothing on one NVMe drive and costs stacks.
constexpr uint32_t kMaxPsyncThreads = 64;

class PsyncBackend final : public Backend {
 public:
  explicit PsyncBackend(uint32_t queue_depth) : queue_depth_(queue_depth) {}

  ~PsyncBackend() override {
    if (in_flight_ > 0) {
      Log(LogLevel::kWarning,
          "psync backend destroyed with {} requests in flight: cancelling",
          in_flight_);
      std::vector<Completion> dropped = Cancel();
      (void)dropped;  // their owner is gone; the requests are finished
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    work_cv_.notify_all();
    for (std::thread& t : threads_) t.join();
  }

  // Starts `count` workers. Thread creation is the one step that can fail.
  Status Start(uint32_t count) {
    try {
      threads_.reserve(count);
      for (uint32_t i = 0; i < count; ++i) {
        threads_.emplace_back([this] { WorkerLoop(); });
      }
    } catch (const std::system_error& e) {
      return Status::ResourceExhausted(
          fmt::format("psync backend: could not start worker thread {} of {}: "
                      "{} (lower io.queue_depth or psync_threads)",
                      threads_.size() + 1, count, e.what()));
    }
    return Status::Ok();
  }

  BackendKind kind() const override { return BackendKind::kPsync; }

  int Submit(std::span<const Request> requests) override {
    const size_t room = queue_depth_ - in_flight_;
    const size_t n = std::min(requests.size(), room);
    if (n == 0) return 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      pending_.insert(pending_.end(), requests.begin(), requests.begin() + n);
    }
    if (threads_.empty()) {
      // No workers: Reap runs the requests.
    } else if (n == 1) {
      work_cv_.notify_one();
    } else {
      work_cv_.notify_all();
    }
    in_flight_ += static_cast<uint32_t>(n);
    return static_cast<int>(n);
  }

  int Reap(std::span<Completion> out, uint32_t min_complete) override {
    // Waiting for more than can ever arrive would block forever.
    if (min_complete > out.size() || min_complete > in_flight_) return -EINVAL;
    std::unique_lock<std::mutex> lock(mu_);
    while (done_.size() < min_complete) {
      if (pending_.empty()) {
        done_cv_.wait(lock);
        continue;
      }
      // Rather than sleep while a request waits for a worker, run it on this
      // thread: at queue depth 1 (no workers at all) this is a plain
      // synchronous pread/pwrite with no thread hand-off.
      const Request r = pending_.front();
      pending_.pop_front();
      lock.unlock();
      const int64_t result = RunOne(r);
      lock.lock();
      done_.push_back(Completion{r.user_data, result});
    }
    const size_t n = std::min(out.size(), done_.size());
    std::copy_n(done_.begin(), n, out.begin());
    done_.erase(done_.begin(), done_.begin() + static_cast<ptrdiff_t>(n));
    in_flight_ -= static_cast<uint32_t>(n);
    return static_cast<int>(n);
  }

  uint32_t in_flight() const override { return in_flight_; }

  std::vector<Completion> Cancel() override {
    std::unique_lock<std::mutex> lock(mu_);
    // Requests no worker has picked up yet never touch their buffer.
    for (const Request& r : pending_) {
      done_.push_back(Completion{r.user_data, -ECANCELED});
    }
    pending_.clear();
    // Running ones cannot be interrupted safely; wait for their results.
    done_cv_.wait(lock, [&] { return done_.size() >= in_flight_; });
    std::vector<Completion> out(done_.begin(), done_.end());
    done_.clear();
    in_flight_ = 0;
    return out;
  }

 private:
  void WorkerLoop() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      work_cv_.wait(lock, [&] { return stop_ || !pending_.empty(); });
      if (pending_.empty()) return;  // stop_ and nothing left to run
      const Request r = pending_.front();
      pending_.pop_front();
      lock.unlock();
      const int64_t result = RunOne(r);
      lock.lock();
      done_.push_back(Completion{r.user_data, result});
      // Reap may wait for several completions and Cancel for all of them.
      done_cv_.notify_all();
    }
  }

  // Exactly one system call: the Engine sees the kernel's answer unchanged.
  static int64_t RunOne(const Request& r) {
    const auto offset = static_cast<off_t>(r.offset);
    const ssize_t n = r.op == Op::kRead
                          ? ::pread(r.fd, r.buf, r.length, offset)
                          : ::pwrite(r.fd, r.buf, r.length, offset);
    return n < 0 ? -static_cast<int64_t>(errno) : static_cast<int64_t>(n);
  }

  const uint32_t queue_depth_;
  uint32_t in_flight_ = 0;  // submitted and not reaped (driving thread only)

  std::mutex mu_;
  std::condition_variable work_cv_;  // pending_ grew or stop_ was set
  std::condition_variable done_cv_;  // done_ grew
  std::deque<Request> pending_;      // accepted, not yet started
  std::deque<Completion> done_;      // finished, not yet reaped
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace

Result<std::unique_ptr<Backend>> CreatePsyncBackend(const BackendOptions& o) {
  if (o.queue_depth == 0) {
    return Status::InvalidArgument("psync backend: queue_depth must be >= 1");
  }
  // More workers than requests in flight would only sleep. At queue depth 1
  // the driving thread runs each request itself in Reap: no workers.
  uint32_t threads = o.psync_threads == 0
                         ? std::min(o.queue_depth, kMaxPsyncThreads)
                         : std::min(o.psync_threads, o.queue_depth);
  if (o.queue_depth == 1) threads = 0;
  auto backend = std::make_unique<PsyncBackend>(o.queue_depth);
  ZTIER_RETURN_IF_ERROR(backend->Start(threads));
  Log(LogLevel::kDebug, "psync backend: {} worker threads, queue_depth {}",
      threads, o.queue_depth);
  return std::unique_ptr<Backend>(std::move(backend));
}

}  // namespace ztier::io
