// GradStore: this rank's gradient partitions on NVMe (config
// tiers.gradients: nvme), so that a model whose gradients do not fit in host
// memory can train.
//
// Layout: one extent per segment (the optimizer's segments, in its layout
// order), each aligned for direct I/O and laid end to end, so the gradients
// of one optimizer sub-group are one contiguous byte range the optimizer
// reads with its state (ByteOffset). Gradients are kept in their parameter's
// type (torch accumulates .grad in that type too).
//
// Writes: Put copies a partition into a staging buffer of its own and
// writes it in the background (the training thread goes on with backward);
// staging is bounded by `staging_bytes` (a Put larger than that runs alone).
// A Put that accumulates first reads the stored partition back (after any
// write of it still in flight) and adds. Put returns the squared L2 norm of
// the partition as stored, the figure gradient clipping and loss scaling
// need, computed while the data is in cache.
//
// Failure: the first failed write is latched: every later Put, Read and
// Flush returns it, until Clear() (which forgets every gradient). So a step
// whose gradients did not all reach the drive cannot run on them.
//
// Which segments hold a gradient is the caller's bookkeeping; the store
// holds bytes. Thread-safety: Put/Read/Flush/Clear from one thread (the
// engine's caller); completions run on the I/O thread.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "base/status.h"
#include "io/async_engine.h"
#include "optim/adam.h"
#include "swapper/nvme_store.h"

namespace ztier::swapper {

struct GradSegment {
  uint64_t numel = 0;
  optim::DType dtype = optim::DType::kF32;
};

class GradStore {
 public:
  // Creates the store (tag "grad") with one extent per segment, in order.
  // `engine` must outlive the store.
  static Result<std::unique_ptr<GradStore>> Create(const StoreOptions& options,
                                                   std::span<const GradSegment> segments,
                                                   io::AsyncEngine* engine,
                                                   uint64_t staging_bytes);
  ~GradStore();  // waits for the writes in flight

  // Stores segment k's partition `data` (numel elements of its type), or
  // with `accumulate` adds it to the stored one. `*sq_norm` (if not null)
  // receives the sum of squares of what is stored now. Returns once `data`
  // may be reused; the write goes on in the background.
  Status Put(uint32_t k, const void* data, bool accumulate, double* sq_norm);
  // Copies segment k's stored partition into `out`.
  Status Read(uint32_t k, void* out);
  // Waits for every write in flight; the first write error, if any.
  Status Flush();
  // Forgets a latched write error (the gradients are dropped by the caller).
  void Clear();

  // Logical byte offset of element `element` of segment k in file().
  uint64_t ByteOffset(uint32_t k, uint64_t element) const;
  const io::StripedFile& file() const { return store_->file(); }
  const NvmeStore& store() const { return *store_; }
  uint32_t alignment() const;
  size_t segment_count() const { return segments_.size(); }

 private:
  GradStore(std::vector<GradSegment> segments, io::AsyncEngine* engine, uint64_t staging_bytes)
      : segments_(std::move(segments)), engine_(engine), staging_limit_(staging_bytes) {}
  uint64_t Bytes(uint32_t k) const;      // payload bytes of segment k
  uint64_t IoBytes(uint32_t k) const;    // rounded up to the alignment
  // Waits until no write of segment k is in flight; the latched error.
  Status WaitSegment(uint32_t k, std::unique_lock<std::mutex>& lock);
  Status ReadInto(uint32_t k, uint8_t* buf);  // synchronous, aligned buf

  std::vector<GradSegment> segments_;
  std::vector<Extent> extents_;
  io::AsyncEngine* engine_;
  std::unique_ptr<NvmeStore> store_;
  const uint64_t staging_limit_;

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<uint8_t> writing_;  // per segment: a write in flight
  uint64_t staged_bytes_ = 0;     // staging bytes held by writes in flight
  uint32_t in_flight_ = 0;
  Status write_error_;
};

}  // namespace ztier::swapper
