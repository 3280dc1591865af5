// A fault-injecting Backend wrapper for tests: it passes requests to a real
// backend and, at chosen ops, replaces the outcome with a fault (EIO, ENOSPC,
// a short transfer, a zero-byte completion, EAGAIN, or a submit error), so the
// engine's and swapper's error paths run against real files.
//
// Ops are counted from 0 in submission order over all requests this wrapper
// has accepted (optionally only reads or only writes). A short transfer is
// real: the inner backend moves the first part and reports that length.
// Thread-safety: like any Backend, one driving thread; AddFault() and
// counters may be used from that thread between calls.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <vector>

#include "io/backend.h"

namespace ztier::io {

enum class FaultKind : uint8_t {
  kEio,          // completion -EIO, nothing transferred
  kEnospc,       // completion -ENOSPC
  kEagain,       // completion -EAGAIN (the engine retries)
  kShort,        // transfers only the first half (rounded to short_align)
  kZero,         // completion 0 bytes
  kSubmitError,  // Submit() refuses the request with -EIO
};

struct Fault {
  FaultKind kind = FaultKind::kEio;
  uint64_t at_op = 0;             // first op index (0-based) to hit
  uint32_t count = 1;             // consecutive matching ops to hit
  std::optional<Op> only;         // count only reads or only writes
};

class FaultInjectingBackend final : public Backend {
 public:
  // `short_align`: bytes a short transfer is rounded down to (keeps O_DIRECT
  // remainders aligned, as a real device would).
  explicit FaultInjectingBackend(std::unique_ptr<Backend> inner,
                                 uint32_t short_align = 512);
  ~FaultInjectingBackend() override;

  void AddFault(const Fault& fault) { faults_.push_back(fault); }
  void ClearFaults() { faults_.clear(); }
  uint64_t faults_injected() const { return injected_; }
  uint64_t ops_seen(Op op) const { return op == Op::kRead ? reads_ : writes_; }

  BackendKind kind() const override { return inner_->kind(); }
  int Submit(std::span<const Request> requests) override;
  int Reap(std::span<Completion> out, uint32_t min_complete) override;
  uint32_t in_flight() const override;
  int RegisterBuffers(std::span<const iovec> b) override {
    return inner_->RegisterBuffers(b);
  }
  int UnregisterBuffers() override { return inner_->UnregisterBuffers(); }
  int RegisterFiles(std::span<const int> fds) override {
    return inner_->RegisterFiles(fds);
  }
  int UnregisterFiles() override { return inner_->UnregisterFiles(); }
  std::vector<Completion> Cancel() override;

 private:
  // The fault for the next op of kind `op` (advancing the counters), if any.
  std::optional<FaultKind> NextFault(Op op);

  std::unique_ptr<Backend> inner_;
  uint32_t short_align_;
  std::vector<Fault> faults_;
  std::deque<Completion> synthetic_;  // faults completed without the device
  uint64_t all_ops_ = 0, reads_ = 0, writes_ = 0, injected_ = 0;
};

}  // namespace ztier::io
