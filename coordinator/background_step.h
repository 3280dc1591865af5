// BackgroundStep: an optimizer step begun while the trainer's backward pass
// still produces gradients. It runs OptimizerSwapper::Step on its own thread,
// sub-groups last to first (the order backward finishes gradients in), each
// sub-group as soon as every parameter in it has its gradient (Ready), so the
// state's reads, updates and writes overlap the rest of backward. The
// updated parameter partitions are kept in host memory (staged), not
// written: a forward before the step is finished must still see the old
// values. Finish() says no more gradients come (those not given are none),
// waits, and hands over the staged partitions; the caller writes them and
// then commits the swapper's deferred step (or discards it).
//
// Thread-safety: Ready, IsReady, Finish and Cancel are called from one
// thread (the trainer's); the step thread only waits on them. A pointer
// given to Ready must stay valid and unchanged until Finish or Cancel
// returns.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "base/status.h"
#include "optim/adam.h"
#include "swapper/optimizer_swapper.h"

namespace ztier::coordinator {

class BackgroundStep {
 public:
  // Starts the step over `optimizer` (which must outlive this object and
  // run nothing else meanwhile) with one set of hyperparameters per group.
  static std::unique_ptr<BackgroundStep> Start(swapper::OptimizerSwapper* optimizer,
                                               std::vector<optim::AdamHyper> hypers);
  // Cancels if still running (see Cancel).
  ~BackgroundStep();

  // Parameter `id`'s gradient partition is final: `grad` (its partition,
  // in its dtype).
  void Ready(uint64_t id, const void* grad);
  bool IsReady(uint64_t id) const;
  const std::vector<optim::AdamHyper>& hypers() const { return hypers_; }

  // Ends the step: the parameters not Ready get no update; waits for the
  // thread. On success the swapper's step waits for its commit and
  // `staged()` holds every updated partition; on failure nothing is
  // pending (the swapper's state is the previous step's).
  Status Finish();
  // Stops the step as soon as it asks for a gradient (or at its end), waits
  // for it, and discards what it did. Idempotent.
  void Cancel();

  // After a successful Finish: (id, partition bytes) of each updated
  // parameter, in the order they were finished.
  std::vector<std::pair<uint64_t, std::vector<uint8_t>>>& staged() { return staged_; }

 private:
  BackgroundStep(swapper::OptimizerSwapper* optimizer, std::vector<optim::AdamHyper> hypers);
  Result<const void*> WaitGrad(uint64_t id);
  Status Stage(std::span<const uint64_t> ids, std::span<const void* const> data);
  void Join();

  swapper::OptimizerSwapper* optimizer_;
  std::vector<optim::AdamHyper> hypers_;
  std::unordered_map<uint64_t, uint64_t> bytes_;  // partition bytes per segment id

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::unordered_map<uint64_t, const void*> ready_;
  bool final_ = false;
  bool cancel_ = false;
  std::vector<std::pair<uint64_t, std::vector<uint8_t>>> staged_;
  Status status_;
  std::thread thread_;  // last: starts after the members above exist
};

}  // namespace ztier::coordinator
