// A small fixed pool of worker threads for data-parallel loops, and the
// multi-threaded Adam update built on it.
//
// Thread-safety: ParallelFor must be called from one thread at a time (the
// pool runs one loop at a time; a second concurrent caller would overwrite
// the first's job). threads() may be called from any thread. The destructor
// must not run while a ParallelFor is in progress.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "optim/adam.h"

namespace ztier::optim {

class WorkerPool {
 public:
  // threads: how many threads run a loop, the caller's included (threads - 1
  // workers are started). 0: std::thread::hardware_concurrency() (1 if that
  // is unknown). 1: loops run inline on the caller, no thread is started.
  explicit WorkerPool(uint32_t threads);
  ~WorkerPool();  // stops and joins the workers

  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  uint32_t threads() const { return threads_; }

  // Splits [0, n) into at most threads() contiguous chunks of about
  // n / threads() elements, each a multiple of `grain` elements except the
  // one that ends at n (grain 0 is taken as 1), and runs fn(begin, end) once
  // per chunk: chunk 0 on the calling thread, chunk k on worker k. Returns
  // when every chunk is done. n == 0 calls nothing. fn must not throw (an
  // exception on a worker terminates the process). Chunk k always goes to the
  // same worker, so repeated loops over the same arrays touch the same
  // memory from the same thread. Allocates nothing.
  void ParallelFor(uint64_t n, uint64_t grain,
                   const std::function<void(uint64_t begin, uint64_t end)>& fn);

 private:
  void WorkerLoop(uint32_t index);

  const uint32_t threads_;
  std::vector<std::thread> workers_;  // worker k - 1 runs chunk k

  std::mutex mu_;
  std::condition_variable work_cv_;  // a new loop was posted, or stop_
  std::condition_variable done_cv_;  // pending_ reached 0
  // The posted loop; all guarded by mu_. Workers compare generation_ with
  // the last one they saw, so a spurious wake-up runs nothing.
  uint64_t generation_ = 0;
  const std::function<void(uint64_t, uint64_t)>* fn_ = nullptr;
  uint64_t n_ = 0;
  uint64_t chunk_ = 0;     // elements per chunk (the last may be shorter)
  uint32_t chunks_ = 0;    // chunks in this loop, <= threads_
  uint32_t pending_ = 0;   // worker chunks not yet finished
  bool stop_ = false;
};

// AdamUpdate(c, ·, isa) over `s`, split across the pool in chunks that are
// multiples of 64 elements (so every chunk but the last runs full vectors).
// The result is bit-identical to a single AdamUpdate: elements are
// independent. Does not allocate.
void AdamUpdateParallel(WorkerPool& pool, const AdamConstants& c, const AdamSpan& s, Isa isa);

}  // namespace ztier::optim
