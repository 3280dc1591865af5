#include "coordinator/background_step.h"

#include <fmt/format.h>

namespace ztier::coordinator {

std::unique_ptr<BackgroundStep> BackgroundStep::Start(swapper::OptimizerSwapper* optimizer,
                                                      std::vector<optim::AdamHyper> hypers) {
  return std::unique_ptr<BackgroundStep>(new BackgroundStep(optimizer, std::move(hypers)));
}

BackgroundStep::BackgroundStep(swapper::OptimizerSwapper* optimizer,
                               std::vector<optim::AdamHyper> hypers)
    : optimizer_(optimizer), hypers_(std::move(hypers)) {
  for (const auto& seg : optimizer_->segments()) {
    bytes_[seg.id] = seg.numel * optim::DTypeBytes(seg.dtype);
  }
  thread_ = std::thread([this] {
    const swapper::OptimizerSwapper::StepPlan plan{.reverse = true, .defer_commit = true};
    Status s = optimizer_->Step(
        hypers_, [this](uint64_t id) { return WaitGrad(id); },
        [this](std::span<const uint64_t> ids, std::span<const void* const> data) {
          return Stage(ids, data);
        },
        plan);
    std::lock_guard<std::mutex> lock(mu_);
    status_ = std::move(s);
  });
}

BackgroundStep::~BackgroundStep() { Cancel(); }

void BackgroundStep::Ready(uint64_t id, const void* grad) {
  std::lock_guard<std::mutex> lock(mu_);
  ready_[id] = grad;
  cv_.notify_all();
}

bool BackgroundStep::IsReady(uint64_t id) const {
  std::lock_guard<std::mutex> lock(mu_);
  return ready_.count(id) != 0;
}

Result<const void*> BackgroundStep::WaitGrad(uint64_t id) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return cancel_ || final_ || ready_.count(id) != 0; });
  if (cancel_) return Status::Cancelled("the optimizer step begun during backward was cancelled");
  auto it = ready_.find(id);
  return it == ready_.end() ? nullptr : it->second;
}

Status BackgroundStep::Stage(std::span<const uint64_t> ids, std::span<const void* const> data) {
  for (size_t k = 0; k < ids.size(); ++k) {
    const auto* p = static_cast<const uint8_t*>(data[k]);
    std::vector<uint8_t> copy(p, p + bytes_.at(ids[k]));
    std::lock_guard<std::mutex> lock(mu_);
    staged_.emplace_back(ids[k], std::move(copy));
  }
  return Status::Ok();
}

void BackgroundStep::Join() {
  if (thread_.joinable()) thread_.join();
}

Status BackgroundStep::Finish() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    final_ = true;
    cv_.notify_all();
  }
  Join();
  std::lock_guard<std::mutex> lock(mu_);
  if (cancel_) return Status::Cancelled("the optimizer step begun during backward was cancelled");
  return status_;
}

void BackgroundStep::Cancel() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    cancel_ = true;
    cv_.notify_all();
  }
  Join();
  if (optimizer_->commit_pending()) (void)optimizer_->Discard();
  std::lock_guard<std::mutex> lock(mu_);
  staged_.clear();
}

}  // namespace ztier::coordinator
