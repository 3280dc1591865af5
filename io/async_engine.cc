#include "io/async_engine.h"

#include <future>
#include <memory>

namespace ztier::io {

AsyncEngine::AsyncEngine(std::unique_ptr<Engine> engine)
    : engine_(std::move(engine)), options_(engine_->options()) {}

Result<std::unique_ptr<AsyncEngine>> AsyncEngine::Create(std::unique_ptr<Engine> engine) {
  if (!engine) return Status::InvalidArgument("async engine needs an engine");
  std::unique_ptr<AsyncEngine> a(new AsyncEngine(std::move(engine)));
  a->thread_ = std::thread([p = a.get()] { p->Loop(); });
  return a;
}

AsyncEngine::~AsyncEngine() {
  Drain();
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  thread_.join();
}

Status AsyncEngine::RegisterBuffers(std::span<const iovec> regions) {
  std::lock_guard<std::mutex> lock(mu_);
  if (started_) {
    return Status::FailedPrecondition("register buffers before the first transfer");
  }
  return engine_->RegisterBuffers(regions);
}

Status AsyncEngine::RegisterFiles(const std::vector<const StripedFile*>& files) {
  std::lock_guard<std::mutex> lock(mu_);
  if (started_) {
    return Status::FailedPrecondition("register files before the first transfer");
  }
  return engine_->RegisterFiles(files);
}

Status AsyncEngine::Run(Transfer transfer) {
  auto done = std::make_shared<std::promise<Status>>();
  std::future<Status> result = done->get_future();
  transfer.on_done = [done](const Status& s) { done->set_value(s); };
  ZTIER_RETURN_IF_ERROR(Submit(std::move(transfer)));
  return result.get();
}

Status AsyncEngine::Submit(Transfer transfer) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!backend_status_.ok()) return backend_status_;
    // Validated on the caller's thread so the caller gets the error directly.
    ZTIER_RETURN_IF_ERROR(engine_->Validate(transfer));
    started_ = true;
    inbox_.push_back(std::move(transfer));
    ++submitted_;
  }
  work_cv_.notify_one();
  return Status::Ok();
}

void AsyncEngine::Drain() {
  std::unique_lock<std::mutex> lock(mu_);
  drain_cv_.wait(lock, [&] { return completed_ == submitted_; });
}

Status AsyncEngine::backend_status() const {
  std::lock_guard<std::mutex> lock(mu_);
  return backend_status_;
}

EngineStats AsyncEngine::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

void AsyncEngine::Loop() {
  std::vector<Transfer> batch;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      stats_ = engine_->stats();
      if (engine_->pending() == 0) {
        work_cv_.wait(lock, [&] { return stop_ || !inbox_.empty(); });
        if (stop_ && inbox_.empty()) return;
      }
      batch.swap(inbox_);
    }
    for (Transfer& t : batch) {
      // Count completion once the user's callback has run.
      auto user = std::move(t.on_done);
      t.on_done = [this, user = std::move(user)](const Status& s) {
        if (user) user(s);
        // Notify under the lock: Drain() may return and the engine be
        // destroyed as soon as the count is seen.
        std::lock_guard<std::mutex> lock(mu_);
        ++completed_;
        drain_cv_.notify_all();
      };
      // Validated in Submit(); the engine accepts it.
      Status s = engine_->Submit(std::move(t));
      (void)s;
    }
    batch.clear();
    if (engine_->pending() == 0) continue;
    Status s = engine_->Poll(/*wait=*/true);
    if (!s.ok()) {
      // The backend itself failed: record it, then fail every transfer in
      // the engine (its destructor cancels, reaps and calls back) and refuse
      // new ones.
      {
        std::lock_guard<std::mutex> lock(mu_);
        backend_status_ = s;
      }
      engine_.reset();
      std::unique_lock<std::mutex> lock(mu_);
      for (Transfer& t : inbox_) {
        lock.unlock();
        if (t.on_done) t.on_done(s);
        lock.lock();
        ++completed_;
      }
      inbox_.clear();
      drain_cv_.notify_all();
      work_cv_.wait(lock, [&] { return stop_; });
      return;
    }
  }
}

}  // namespace ztier::io
