#include "swapper/grad_store.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "base/log.h"
#include "optim/grad_math.h"

namespace ztier::swapper {
namespace {

constexpr uint64_t kAlign = 4096;  // extents and staging buffers (direct I/O)

uint64_t RoundUp(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

// An aligned buffer for direct I/O, freed with free().
Result<uint8_t*> AllocAligned(uint64_t bytes) {
  void* p = nullptr;
  if (posix_memalign(&p, kAlign, std::max<uint64_t>(bytes, kAlign)) != 0) {
    return Status::ResourceExhausted(
        fmt::format("allocate a {}-byte gradient staging buffer", bytes));
  }
  return static_cast<uint8_t*>(p);
}

}  // namespace

Result<std::unique_ptr<GradStore>> GradStore::Create(const StoreOptions& options,
                                                     std::span<const GradSegment> segments,
                                                     io::AsyncEngine* engine,
                                                     uint64_t staging_bytes) {
  std::unique_ptr<GradStore> gs(new GradStore(
      std::vector<GradSegment>(segments.begin(), segments.end()), engine, staging_bytes));
  uint64_t capacity = 0;
  for (uint32_t k = 0; k < gs->segments_.size(); ++k) {
    const uint64_t bytes = gs->Bytes(k);
    if (gs->segments_[k].numel != 0 && bytes / gs->segments_[k].numel !=
                                           optim::DTypeBytes(gs->segments_[k].dtype)) {
      return Status::InvalidArgument(
          fmt::format("gradient segment {}: {} elements overflow", k, gs->segments_[k].numel));
    }
    if (capacity > UINT64_MAX - RoundUp(bytes, kAlign)) {
      return Status::InvalidArgument("gradient store: total size overflows");
    }
    capacity += RoundUp(bytes, kAlign);
  }
  StoreOptions so = options;
  so.tag = "grad";
  ZTIER_ASSIGN_OR_RETURN(gs->store_, NvmeStore::Create(so, std::max<uint64_t>(capacity, 1)));
  for (uint32_t k = 0; k < gs->segments_.size(); ++k) {
    ZTIER_ASSIGN_OR_RETURN(Extent e, gs->store_->Allocate(gs->Bytes(k)));
    gs->extents_.push_back(e);
  }
  gs->writing_.assign(gs->segments_.size(), 0);
  return gs;
}

GradStore::~GradStore() { (void)Flush(); }

uint64_t GradStore::Bytes(uint32_t k) const {
  return segments_[k].numel * optim::DTypeBytes(segments_[k].dtype);
}

uint64_t GradStore::IoBytes(uint32_t k) const { return RoundUp(Bytes(k), kAlign); }

uint32_t GradStore::alignment() const { return static_cast<uint32_t>(kAlign); }

uint64_t GradStore::ByteOffset(uint32_t k, uint64_t element) const {
  return extents_[k].offset + element * optim::DTypeBytes(segments_[k].dtype);
}

Status GradStore::WaitSegment(uint32_t k, std::unique_lock<std::mutex>& lock) {
  cv_.wait(lock, [&] { return writing_[k] == 0; });
  return write_error_;
}

Status GradStore::ReadInto(uint32_t k, uint8_t* buf) {
  Status s = engine_->Run({io::Op::kRead, &store_->file(), extents_[k].offset, IoBytes(k), buf,
                           nullptr});
  if (!s.ok()) {
    return s.WithContext(fmt::format("read gradient partition {} at {}", k,
                                     store_->Locate(extents_[k].offset)));
  }
  return Status::Ok();
}

Status GradStore::Put(uint32_t k, const void* data, bool accumulate, double* sq_norm) {
  if (k >= segments_.size()) {
    return Status::Internal(fmt::format("gradient segment {} of {}", k, segments_.size()));
  }
  const uint64_t bytes = Bytes(k), io_bytes = IoBytes(k);
  {
    std::unique_lock<std::mutex> lock(mu_);
    ZTIER_RETURN_IF_ERROR(WaitSegment(k, lock));
    if (bytes == 0) {  // nothing to store (and a 0-byte transfer is invalid)
      if (sq_norm != nullptr) *sq_norm = 0;
      return Status::Ok();
    }
    // Staging is bounded: wait for writes to finish (one alone may exceed it).
    cv_.wait(lock, [&] {
      return !write_error_.ok() || staged_bytes_ == 0 ||
             staged_bytes_ + io_bytes <= staging_limit_;
    });
    ZTIER_RETURN_IF_ERROR(write_error_);
    staged_bytes_ += io_bytes;
  }
  auto unstage = [&] {
    std::lock_guard<std::mutex> lock(mu_);
    staged_bytes_ -= io_bytes;
    cv_.notify_all();
  };
  Result<uint8_t*> buf = AllocAligned(io_bytes);
  if (!buf.ok()) {
    unstage();
    return buf.status();
  }
  uint8_t* stage = *buf;
  if (accumulate) {
    Status r = ReadInto(k, stage);
    if (!r.ok()) {
      free(stage);
      unstage();
      return r;
    }
    optim::AccumulateGrad(stage, data, segments_[k].numel, segments_[k].dtype);
  } else {
    memcpy(stage, data, bytes);
  }
  memset(stage + bytes, 0, io_bytes - bytes);
  if (sq_norm != nullptr) {
    *sq_norm = optim::SumSquares(stage, segments_[k].numel, segments_[k].dtype);
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    writing_[k] = 1;
    ++in_flight_;
  }
  auto done = [this, k, stage, io_bytes](const Status& st) {
    free(stage);
    std::lock_guard<std::mutex> lock(mu_);
    if (!st.ok() && write_error_.ok()) {
      write_error_ = st.WithContext(fmt::format("write gradient partition {} at {}", k,
                                                store_->Locate(extents_[k].offset)));
    }
    writing_[k] = 0;
    staged_bytes_ -= io_bytes;
    --in_flight_;
    cv_.notify_all();
  };
  Status s = engine_->Submit({io::Op::kWrite, &store_->file(), extents_[k].offset, io_bytes, stage,
                              done});
  if (!s.ok()) done(s);  // never submitted: latch it, free the buffer
  return s;
}

Status GradStore::Read(uint32_t k, void* out) {
  if (k >= segments_.size()) {
    return Status::Internal(fmt::format("gradient segment {} of {}", k, segments_.size()));
  }
  {
    std::unique_lock<std::mutex> lock(mu_);
    ZTIER_RETURN_IF_ERROR(WaitSegment(k, lock));
  }
  if (Bytes(k) == 0) return Status::Ok();  // nothing stored (no 0-byte transfer)
  ZTIER_ASSIGN_OR_RETURN(uint8_t* buf, AllocAligned(IoBytes(k)));
  std::unique_ptr<uint8_t, decltype(&free)> guard(buf, &free);
  ZTIER_RETURN_IF_ERROR(ReadInto(k, buf));
  memcpy(out, buf, Bytes(k));
  return Status::Ok();
}

Status GradStore::Flush() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return in_flight_ == 0; });
  return write_error_;
}

void GradStore::Clear() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return in_flight_ == 0; });
  write_error_ = Status::Ok();
}

}  // namespace ztier::swapper
