// AsyncEngine: an Engine driven by its own I/O thread, so that transfers can
// be submitted from any thread and complete while the caller computes.
//
// Submit() is thread-safe and never blocks on the device; each transfer's
// on_done runs on the I/O thread (keep it short: hand work to other threads).
// A validation error (misalignment, ...) is returned by Submit() itself.
// New transfers are picked up at once when the engine is idle and at the next
// completion when it is busy (the drive has work queued then).
// Destruction waits for every submitted transfer to complete.
#pragma once

#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "io/engine.h"

namespace ztier::io {

class AsyncEngine {
 public:
  static Result<std::unique_ptr<AsyncEngine>> Create(std::unique_ptr<Engine> engine);
  ~AsyncEngine();
  AsyncEngine(const AsyncEngine&) = delete;
  AsyncEngine& operator=(const AsyncEngine&) = delete;

  Status Submit(Transfer transfer);
  // Submits `transfer` (its on_done is replaced) and waits for it: the
  // transfer's outcome, or Submit's error. Not from the I/O thread.
  Status Run(Transfer transfer);
  // Blocks until every transfer submitted so far has completed.
  void Drain();
  // An error from the backend itself (not from one transfer); sticky.
  Status backend_status() const;
  // Stats snapshot (taken on the I/O thread at its last loop).
  EngineStats stats() const;
  const EngineOptions& options() const { return options_; }

  // Registration must happen before the first Submit (the I/O thread owns
  // the backend afterwards).
  Status RegisterBuffers(std::span<const iovec> regions);
  Status RegisterFiles(const std::vector<const StripedFile*>& files);

 private:
  explicit AsyncEngine(std::unique_ptr<Engine> engine);
  void Loop();

  std::unique_ptr<Engine> engine_;  // reset if the backend fails
  const EngineOptions options_;
  mutable std::mutex mu_;
  std::condition_variable work_cv_;   // I/O thread waits for transfers
  std::condition_variable drain_cv_;  // Drain() waits for completion
  std::vector<Transfer> inbox_;
  uint64_t submitted_ = 0, completed_ = 0;
  bool stop_ = false;
  bool started_ = false;
  Status backend_status_;
  EngineStats stats_;
  std::thread thread_;
};

}  // namespace ztier::io
