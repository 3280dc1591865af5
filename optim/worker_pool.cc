#include "optim/worker_pool.h"

#include <algorithm>

namespace ztier::optim {

WorkerPool::WorkerPool(uint32_t threads)
    : threads_(threads != 0 ? threads : std::max(1u, std::thread::hardware_concurrency())) {
  workers_.reserve(threads_ - 1);
  for (uint32_t k = 1; k < threads_; ++k) {
    workers_.emplace_back([this, k] { WorkerLoop(k); });
  }
}

WorkerPool::~WorkerPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  for (std::thread& t : workers_) t.join();
}

void WorkerPool::ParallelFor(uint64_t n, uint64_t grain,
                             const std::function<void(uint64_t, uint64_t)>& fn) {
  if (n == 0) return;
  grain = std::max<uint64_t>(grain, 1);
  // ceil(n / threads) rounded up to a multiple of grain.
  const uint64_t per_thread = (n + threads_ - 1) / threads_;
  const uint64_t chunk = (per_thread + grain - 1) / grain * grain;
  const uint32_t chunks = static_cast<uint32_t>((n + chunk - 1) / chunk);
  if (chunks <= 1) {
    fn(0, n);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    fn_ = &fn;
    n_ = n;
    chunk_ = chunk;
    chunks_ = chunks;
    pending_ = chunks - 1;
    ++generation_;
  }
  work_cv_.notify_all();
  fn(0, chunk);
  std::unique_lock<std::mutex> lock(mu_);
  done_cv_.wait(lock, [this] { return pending_ == 0; });
  fn_ = nullptr;
}

void WorkerPool::WorkerLoop(uint32_t index) {
  uint64_t seen = 0;
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    work_cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
    if (stop_) return;
    seen = generation_;
    // A worker that slept through a loop had no chunk in it: that loop could
    // not have finished (and a new one been posted) without it otherwise.
    if (index >= chunks_) continue;
    const auto* fn = fn_;
    const uint64_t begin = index * chunk_;
    const uint64_t end = std::min(n_, begin + chunk_);
    lock.unlock();
    (*fn)(begin, end);
    lock.lock();
    if (--pending_ == 0) done_cv_.notify_one();
  }
}

void AdamUpdateParallel(WorkerPool& pool, const AdamConstants& c, const AdamSpan& s, Isa isa) {
  // Multiple of every vector width, so only the final chunk has a tail.
  constexpr uint64_t kGrain = 64;
  struct Job {
    const AdamConstants* c;
    const AdamSpan* s;
    Isa isa;
  } job{&c, &s, isa};
  // One captured pointer: small enough for std::function's inline storage,
  // so building it does not allocate.
  pool.ParallelFor(s.n, kGrain, [&job](uint64_t begin, uint64_t end) {
    AdamUpdate(*job.c, SubSpan(*job.s, begin, end - begin), job.isa);
  });
}

}  // namespace ztier::optim
