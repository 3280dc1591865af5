#include "io/fault_backend.h"

#include <cerrno>

namespace ztier::io {

FaultInjectingBackend::FaultInjectingBackend(std::unique_ptr<Backend> inner,
                                             uint32_t short_align)
    : inner_(std::move(inner)), short_align_(short_align ? short_align : 1) {}

FaultInjectingBackend::~FaultInjectingBackend() = default;

std::optional<FaultKind> FaultInjectingBackend::NextFault(Op op) {
  const uint64_t any_index = all_ops_++;
  const uint64_t op_index = op == Op::kRead ? reads_++ : writes_++;
  for (const Fault& f : faults_) {
    const uint64_t index = f.only ? (*f.only == op ? op_index : UINT64_MAX)
                                  : any_index;
    if (index >= f.at_op && index < f.at_op + f.count) {
      ++injected_;
      return f.kind;
    }
  }
  return std::nullopt;
}

int FaultInjectingBackend::Submit(std::span<const Request> requests) {
  // Requests are forwarded one contiguous run at a time so that a synthetic
  // fault in the middle of a batch keeps submission order.
  std::vector<Request> pass;
  pass.reserve(requests.size());
  int accepted = 0;
  auto flush = [&]() -> int {
    if (pass.empty()) return 0;
    int n = inner_->Submit(pass);
    int result = n < 0 ? n : (static_cast<size_t>(n) < pass.size() ? -EAGAIN : 0);
    pass.clear();
    return result;
  };
  for (const Request& r : requests) {
    std::optional<FaultKind> fault = NextFault(r.op);
    if (!fault) {
      pass.push_back(r);
    } else {
      switch (*fault) {
        case FaultKind::kSubmitError: {
          int rc = flush();
          if (rc < 0) return accepted ? accepted : rc;
          return accepted ? accepted : -EIO;
        }
        case FaultKind::kShort: {
          Request s = r;
          uint32_t half = (r.length / 2) / short_align_ * short_align_;
          s.length = half ? half : r.length;  // too small to split: pass whole
          pass.push_back(s);
          break;
        }
        case FaultKind::kEio: synthetic_.push_back({r.user_data, -EIO}); break;
        case FaultKind::kEnospc: synthetic_.push_back({r.user_data, -ENOSPC}); break;
        case FaultKind::kEagain: synthetic_.push_back({r.user_data, -EAGAIN}); break;
        case FaultKind::kZero: synthetic_.push_back({r.user_data, 0}); break;
      }
    }
    ++accepted;
  }
  int rc = flush();
  if (rc < 0 && rc != -EAGAIN) return rc;
  // A partial inner submit is not expected: callers keep within queue_depth.
  return accepted;
}

int FaultInjectingBackend::Reap(std::span<Completion> out, uint32_t min_complete) {
  size_t n = 0;
  while (n < out.size() && !synthetic_.empty()) {
    out[n++] = synthetic_.front();
    synthetic_.pop_front();
  }
  if (n == out.size() || inner_->in_flight() == 0) return static_cast<int>(n);
  uint32_t still_needed = min_complete > n ? min_complete - static_cast<uint32_t>(n) : 0;
  still_needed = std::min(still_needed, inner_->in_flight());
  int m = inner_->Reap(out.subspan(n), still_needed);
  if (m < 0) return n ? static_cast<int>(n) : m;
  return static_cast<int>(n) + m;
}

uint32_t FaultInjectingBackend::in_flight() const {
  return inner_->in_flight() + static_cast<uint32_t>(synthetic_.size());
}

std::vector<Completion> FaultInjectingBackend::Cancel() {
  std::vector<Completion> all(synthetic_.begin(), synthetic_.end());
  synthetic_.clear();
  std::vector<Completion> inner = inner_->Cancel();
  all.insert(all.end(), inner.begin(), inner.end());
  return all;
}

}  // namespace ztier::io
