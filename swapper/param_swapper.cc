#include "swapper/param_swapper.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <deque>
#include <future>

#include <fmt/format.h>

#include "base/crc32c.h"

namespace ztier::swapper {
namespace {

// Members of a pack start at multiples of this many bytes, so each partition's
// host copy is aligned well enough for vectorised and DMA copies.
constexpr uint64_t kPackMemberAlignment = 256;
// Extents are whole multiples of this many bytes (direct I/O).
constexpr uint64_t kExtentAlignment = 4096;
// Pool buffers Repack() holds at most: one to read old packs into and one to
// assemble a new pack in, and, when free, one more of each (a second old
// pack cached, a second write in flight).
constexpr uint32_t kRepackMaxBuffers = 4;

uint64_t AlignUp(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

// Bytes of one repack region: room for any packing of the small partitions
// `sizes`. A pack of members m takes AlignUp(fill, 4096) bytes, and its fill
// (each member at the next 256-byte boundary) is at most the sum of
// AlignUp(m, 4096), so any packing fits in that sum over all members, which
// is what every member in a pack of its own takes (`alone` groups of one
// partition each do that). It is at most the 256-byte-aligned sum plus 4096
// per member; the next-fit bound of 2 x ceil(total / buffer) + 1 packs does
// not hold, since each `alone` group closes packs early and there may be as
// many such groups as members.
Result<uint64_t> RepackRegionBytes(std::span<const uint64_t> sizes) {
  uint64_t total = 0;
  for (uint64_t bytes : sizes) {
    // bytes <= one buffer, so the alignment itself cannot overflow.
    if (__builtin_add_overflow(total, AlignUp(bytes, kExtentAlignment), &total)) {
      return Status::InvalidArgument(
          fmt::format("the packed partitions' repack region overflows 64 bits ({} partitions)",
                      sizes.size()));
    }
  }
  return total;
}

// One pool buffer, waiting for it as Read() does: the pool may be shared,
// and buffers others hold come back.
Result<tiering::BufferSpan> AcquireOneBuffer(tiering::PinnedPool& pool) {
  for (;;) {
    auto got = pool.AcquireUntil(
        1, std::chrono::steady_clock::now() + std::chrono::milliseconds(100));
    if (!got.ok()) return got.status();
    if (*got) return **got;
  }
}

}  // namespace

std::string_view PartitionStateName(PartitionState s) {
  switch (s) {
    case PartitionState::kOnNvme: return "ON_NVME";
    case PartitionState::kReading: return "READING";
    case PartitionState::kInHost: return "IN_HOST";
    case PartitionState::kWriting: return "WRITING";
  }
  return "?";
}

ParamSwapper::ParamSwapper(const SwapperOptions& options, tiering::PinnedPool* pool,
                           io::AsyncEngine* engine)
    : options_(options), pool_(pool), engine_(engine) {}

Result<std::unique_ptr<ParamSwapper>> ParamSwapper::Create(
    const SwapperOptions& options, tiering::PinnedPool* pool, io::AsyncEngine* engine) {
  if (pool == nullptr || engine == nullptr) {
    return Status::InvalidArgument("the parameter swapper needs a buffer pool and an engine");
  }
  return std::unique_ptr<ParamSwapper>(new ParamSwapper(options, pool, engine));
}

ParamSwapper::~ParamSwapper() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return in_flight_ == 0; });
  for (ExtentState& e : extents_) {
    if (e.span.count > 0) ReturnSpan(e);
  }
}

Status ParamSwapper::Add(uint64_t id, uint64_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  if (sealed_) return Status::FailedPrecondition("partitions must be added before Seal()");
  if (bytes == 0) {
    return Status::InvalidArgument(fmt::format("partition {} has 0 bytes", id));
  }
  if (!index_.emplace(id, static_cast<uint32_t>(members_.size())).second) {
    return Status::InvalidArgument(fmt::format("partition {} is added twice", id));
  }
  members_.push_back(Member{.id = id, .bytes = bytes});
  return Status::Ok();
}

Status ParamSwapper::Seal() {
  std::lock_guard<std::mutex> lock(mu_);
  if (sealed_) return Status::FailedPrecondition("Seal() was already called");
  const uint64_t buffer_bytes = pool_->buffer_bytes();
  const uint64_t pack_limit = std::min(options_.pack_threshold_bytes, buffer_bytes);
  // Lay out extents in the order partitions were added. Until Repack()
  // knows the order of use, neighbours in registration order may be used far
  // apart (an MoE layer's experts, of which a step runs two), and a pack is
  // read whole for any one member: so a pack holds at most pack_limit bytes,
  // the most a lone small partition's read may cost.
  int open_pack = -1;
  uint64_t pack_fill = 0;
  for (uint32_t i = 0; i < members_.size(); ++i) {
    Member& m = members_[i];
    const bool small = pack_limit > 0 && m.bytes <= pack_limit;
    m.packed = small;
    if (small && open_pack >= 0 &&
        AlignUp(pack_fill, kPackMemberAlignment) + m.bytes <= pack_limit) {
      m.offset = AlignUp(pack_fill, kPackMemberAlignment);
      m.extent = static_cast<uint32_t>(open_pack);
      pack_fill = m.offset + m.bytes;
      extents_[open_pack].members.push_back(i);
      extents_[open_pack].where.bytes = pack_fill;
      ++stats_.packed_partitions;
      continue;
    }
    ExtentState e;
    e.where.bytes = m.bytes;
    e.members.push_back(i);
    m.offset = 0;
    m.extent = static_cast<uint32_t>(extents_.size());
    extents_.push_back(std::move(e));
    if (small) {
      open_pack = static_cast<int>(m.extent);
      pack_fill = m.bytes;
      ++stats_.packed_partitions;
    } else {
      open_pack = -1;
    }
  }
  // Every extent must fit in the pool, or swap-in could never finish.
  uint64_t capacity = 0;
  for (ExtentState& e : extents_) {
    // Checked before aligning: a size near 2^64 would wrap to a small one.
    e.buffers = pool_->BuffersFor(e.where.bytes);
    if (e.buffers <= pool_->buffer_count()) {
      e.where.bytes = AlignUp(e.where.bytes, kExtentAlignment);
      e.buffers = pool_->BuffersFor(e.where.bytes);
    }
    if (e.buffers > pool_->buffer_count()) {
      const Member& m = members_[e.members.front()];
      return Status::InvalidArgument(fmt::format(
          "partition {} needs {} bytes, which takes {} swap buffers of {} bytes, "
          "but the pool has buffer_count {}; raise tiers.nvme.buffer_count to at "
          "least {} or tiers.nvme.buffer_size so that one buffer holds {} bytes",
          m.id, m.bytes, e.buffers, buffer_bytes, pool_->buffer_count(), e.buffers,
          m.bytes));
    }
    if (__builtin_add_overflow(capacity, e.where.bytes, &capacity)) {
      return Status::InvalidArgument(fmt::format(
          "the swap store for {} partitions overflows 64 bits", members_.size()));
    }
  }
  // Two repack regions after the extents, for Repack() to alternate between.
  std::vector<uint64_t> small_sizes;
  for (const Member& m : members_) {
    if (m.packed) small_sizes.push_back(m.bytes);
  }
  ZTIER_ASSIGN_OR_RETURN(const uint64_t region_bytes, RepackRegionBytes(small_sizes));
  if (__builtin_add_overflow(capacity, region_bytes, &capacity) ||
      __builtin_add_overflow(capacity, region_bytes, &capacity)) {
    return Status::InvalidArgument(fmt::format(
        "the swap store for {} partitions overflows 64 bits", members_.size()));
  }
  ZTIER_ASSIGN_OR_RETURN(store_, NvmeStore::Create(options_.store, capacity));
  for (ExtentState& e : extents_) {
    ZTIER_ASSIGN_OR_RETURN(Extent where, store_->Allocate(e.where.bytes));
    e.where = where;
  }
  if (region_bytes > 0) {
    for (Extent& region : repack_region_) {
      ZTIER_ASSIGN_OR_RETURN(region, store_->Allocate(region_bytes));
    }
  }
  stats_.extents = extents_.size();
  sealed_ = true;
  return Status::Ok();
}

Result<ParamSwapper::Member*> ParamSwapper::Find(uint64_t id) {
  if (!sealed_) return Status::FailedPrecondition("call Seal() before moving partitions");
  auto it = index_.find(id);
  if (it == index_.end()) {
    return Status::NotFound(fmt::format("partition {} is not registered with the swapper", id));
  }
  return &members_[it->second];
}

const ParamSwapper::Member* ParamSwapper::Find(uint64_t id) const {
  auto it = index_.find(id);
  return it == index_.end() ? nullptr : &members_[it->second];
}

std::string ParamSwapper::Describe(const Member& m) const {
  const ExtentState& e = extents_[m.extent];
  return fmt::format("partition {} ({} bytes, {})", m.id, m.bytes,
                     store_->Locate(e.where.offset + m.offset));
}

void ParamSwapper::ReturnSpan(ExtentState& e) {
  Status s = pool_->Release(e.span);
  (void)s;  // a span the swapper took is always valid to give back
  e.span = {};
}

Status ParamSwapper::Write(uint64_t id, const void* src) {
  const uint64_t ids[1] = {id};
  const void* const srcs[1] = {src};
  return WriteMany(ids, srcs);
}

Status ParamSwapper::WriteMany(std::span<const uint64_t> ids,
                               std::span<const void* const> srcs) {
  if (ids.size() != srcs.size()) {
    return Status::InvalidArgument(
        fmt::format("WriteMany: {} ids but {} sources", ids.size(), srcs.size()));
  }
  // One extent's write in flight: its buffers, the new CRCs of the batch's
  // members in it, and the outcome the I/O thread reports.
  struct Pending {
    uint32_t extent = 0;
    uint32_t first = 0;  // members_ index of the batch's first member in it, for messages
    std::vector<std::pair<uint32_t, uint32_t>> crcs;  // (members_ index, crc)
    std::future<Status> done;
  };
  std::deque<Pending> pending;
  Status first;
  // Waits for the oldest write and records its outcome (needs no lock held).
  auto finish_oldest = [&] {
    Pending pw = std::move(pending.front());
    pending.pop_front();
    const Status st = pw.done.get();
    std::lock_guard<std::mutex> lock(mu_);
    ExtentState& e = extents_[pw.extent];
    --in_flight_;
    if (st.ok()) {
      for (auto [mi, crc] : pw.crcs) {
        members_[mi].crc = crc;
        members_[mi].written = true;
      }
      stats_.bytes_written += e.where.bytes;
      ++stats_.writes;
    } else {
      // The extent on disk may be torn: none of its partitions may be read.
      for (uint32_t mi : e.members) members_[mi].written = false;
      if (first.ok()) {
        first = st.WithContext(fmt::format("write {}", Describe(members_[pw.first])));
      }
    }
    ReturnSpan(e);
    e.state = PartitionState::kOnNvme;
    cv_.notify_all();
  };
  size_t k = 0;
  while (k < ids.size() && first.ok()) {
    std::unique_lock<std::mutex> lock(mu_);
    WaitNotRepacking(lock);  // none of ours is in flight then: Repack needs that
    auto found = Find(ids[k]);
    if (!found.ok()) {
      first = found.status();
      break;
    }
    const uint32_t ei = (*found)->extent;
    ExtentState& e = extents_[ei];
    if (e.state != PartitionState::kOnNvme) {
      if (!pending.empty()) {  // perhaps one of ours, still writing
        lock.unlock();
        finish_oldest();
        continue;
      }
      first = Status::FailedPrecondition(fmt::format(
          "partition {} is {}: a write needs it ON_NVME (release or swap it out first)",
          ids[k], PartitionStateName(e.state)));
      break;
    }
    // The batch's members of this extent: the run of ids that follows.
    size_t end = k + 1;
    while (end < ids.size()) {
      auto it = index_.find(ids[end]);
      if (it == index_.end() || members_[it->second].extent != ei) break;
      ++end;
    }
    auto got = pool_->TryAcquire(e.buffers);
    if (!got.ok()) {
      first = got.status();
      break;
    }
    if (!*got) {
      lock.unlock();
      if (!pending.empty()) {
        finish_oldest();  // our own writes hold the buffers: free one
      } else {
        // Then take it under the lock (TryAcquire above checked the count).
        (void)pool_->WaitForFree(e.buffers, std::chrono::steady_clock::now() +
                                                std::chrono::milliseconds(100));
      }
      continue;
    }
    e.span = **got;
    e.state = PartitionState::kWriting;
    ++in_flight_;
    std::vector<uint32_t> in_batch;
    for (size_t j = k; j < end; ++j) in_batch.push_back(index_.at(ids[j]));
    bool others_written = false;
    for (uint32_t mi : e.members) {
      if (members_[mi].written &&
          std::find(in_batch.begin(), in_batch.end(), mi) == in_batch.end()) {
        others_written = true;
      }
    }
    lock.unlock();

    auto promise = std::make_shared<std::promise<Status>>();
    Pending pw;
    pw.extent = ei;
    pw.first = in_batch.front();
    pw.done = promise->get_future();
    Status s;
    if (others_written) {
      s = engine_->Run({io::Op::kRead, &store_->file(), e.where.offset, e.where.bytes,
                            e.span.data, nullptr});
    } else {
      memset(e.span.data, 0, e.where.bytes);
    }
    if (s.ok()) {
      for (size_t j = k; j < end; ++j) {
        const Member& m = members_[in_batch[j - k]];
        memcpy(e.span.data + m.offset, srcs[j], m.bytes);
        pw.crcs.emplace_back(in_batch[j - k],
                             options_.checksum ? Crc32c(e.span.data + m.offset, m.bytes) : 0);
      }
      s = engine_->Submit({io::Op::kWrite, &store_->file(), e.where.offset, e.where.bytes,
                           e.span.data, [promise](const Status& st) { promise->set_value(st); }});
    }
    if (!s.ok()) promise->set_value(s);
    pending.push_back(std::move(pw));
    k = end;
  }
  while (!pending.empty()) finish_oldest();
  return first;
}

Status ParamSwapper::Read(uint64_t id, void* dst) {
  std::unique_lock<std::mutex> lock(mu_);
  WaitNotRepacking(lock);
  ZTIER_ASSIGN_OR_RETURN(Member * m, Find(id));
  if (!m->written) {
    return Status::FailedPrecondition(fmt::format(
        "partition {} has no data on NVMe in this run (never written, or its last write "
        "failed)",
        id));
  }
  ExtentState& e = extents_[m->extent];
  if (e.state != PartitionState::kOnNvme) {
    return Status::FailedPrecondition(fmt::format(
        "partition {} is {}: Read() needs it ON_NVME (release it first)", id,
        PartitionStateName(e.state)));
  }
  // A private copy: the extent stays ON_NVME (no hold, no state change), so
  // nothing the swap-in path tracks is touched. Counted, so that Repack()
  // does not move the extent while this reads it.
  ++private_reads_;
  std::optional<tiering::BufferSpan> span;
  while (!span) {
    lock.unlock();
    auto got = pool_->AcquireUntil(e.buffers, std::chrono::steady_clock::now() +
                                                  std::chrono::milliseconds(100));
    lock.lock();
    if (!got.ok()) {
      --private_reads_;
      return got.status();
    }
    span = *got;
  }
  const Extent where = e.where;
  const Member copy = *m;
  lock.unlock();
  Status s = engine_->Run({io::Op::kRead, &store_->file(), where.offset, where.bytes,
                               span->data, nullptr});
  if (!s.ok()) s = s.WithContext(fmt::format("read {}", Describe(copy)));
  if (s.ok()) s = VerifyMember(copy, span->data);  // names the partition itself
  if (s.ok()) memcpy(dst, span->data + copy.offset, copy.bytes);
  Status released = pool_->Release(*span);
  lock.lock();
  --private_reads_;
  if (s.ok()) {
    stats_.bytes_read += where.bytes;
    ++stats_.reads;
  }
  ZTIER_RETURN_IF_ERROR(s);
  return released;
}

Result<size_t> ParamSwapper::SwapIn(std::span<const uint64_t> ids,
                                    std::span<PartitionState> observed) {
  if (!observed.empty() && observed.size() != ids.size()) {
    return Status::InvalidArgument(fmt::format(
        "SwapIn: {} ids but {} entries for their states", ids.size(), observed.size()));
  }
  std::unique_lock<std::mutex> lock(mu_);
  WaitNotRepacking(lock);
  size_t covered = 0;
  for (uint64_t id : ids) {
    ZTIER_ASSIGN_OR_RETURN(Member * m, Find(id));
    if (!m->written) {
      return Status::FailedPrecondition(fmt::format(
          "partition {} has no data on NVMe in this run (never written, or its "
          "last write-back failed); write it before swapping it in",
          id));
    }
    ExtentState& e = extents_[m->extent];
    if (e.state == PartitionState::kOnNvme) {
      auto got = pool_->TryAcquire(e.buffers);
      if (!got.ok()) return got.status();
      if (!got->has_value()) break;  // out of free buffers: the caller retries later
      e.span = **got;
      ZTIER_RETURN_IF_ERROR(StartRead(e, m->extent));
    }
    m->error = Status::Ok();
    if (!m->held) {
      m->held = true;
      ++e.holders;
    }
    // Under mu_: OnReadDone picks the held members to notify under it too.
    if (!observed.empty()) observed[covered] = e.state;
    ++covered;
  }
  return covered;
}

Status ParamSwapper::StartRead(ExtentState& e, uint32_t extent_index) {
  e.state = PartitionState::kReading;
  ++in_flight_;
  Status s = engine_->Submit({io::Op::kRead, &store_->file(), e.where.offset,
                              e.where.bytes, e.span.data,
                              [this, extent_index](const Status& st) {
                                OnReadDone(extent_index, st);
                              }});
  if (!s.ok()) {
    --in_flight_;
    e.state = PartitionState::kOnNvme;
    ReturnSpan(e);
  }
  return s;
}

Status ParamSwapper::VerifyMember(const Member& m, const uint8_t* data) const {
  if (!options_.checksum || !m.written) return Status::Ok();
  const uint32_t got = Crc32c(data + m.offset, m.bytes);
  if (got == m.crc) return Status::Ok();
  return Status::Corruption(fmt::format(
      "{}: checksum mismatch (crc32c {:#010x} read, {:#010x} written): the swap "
      "file was modified or corrupted; the data is not used",
      Describe(m), got, m.crc));
}

void ParamSwapper::OnReadDone(uint32_t extent_index, const Status& status) {
  // Checksums are verified later, by the thread that first asks for the data
  // (Wait, Data or Verify), so the I/O thread goes straight back to keeping
  // the drive's queue full.
  ExtentState& e = extents_[extent_index];
  Status result = status;
  std::vector<std::pair<uint64_t, Status>> notify;
  ReadCallback cb;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (result.ok()) {
      e.state = PartitionState::kInHost;
      for (uint32_t mi : e.members) members_[mi].verified = !options_.checksum;
      stats_.bytes_read += e.where.bytes;
      ++stats_.reads;
    } else {
      if (result.code() == StatusCode::kCorruption) ++stats_.checksum_failures;
      if (status.code() != StatusCode::kCorruption && !status.ok()) {
        result = status.WithContext(fmt::format(
            "read {}", Describe(members_[e.members.front()])));
      }
      if (first_error_.ok()) first_error_ = result;
      ReturnSpan(e);
      e.state = PartitionState::kOnNvme;
      e.holders = 0;
    }
    for (uint32_t mi : e.members) {
      Member& m = members_[mi];
      if (!m.held) continue;
      if (!result.ok()) {
        m.held = false;
        m.error = result;
      }
      notify.emplace_back(m.id, result);
    }
    cb = read_cb_;
    cv_.notify_all();
  }
  if (cb) {
    for (auto& [id, s] : notify) cb(id, s);
  }
  // Counted done only after the callbacks ran: the destructor waits for
  // in_flight_ == 0 and must not free what they use. Notify under the lock,
  // so the condition variable outlives the call.
  std::lock_guard<std::mutex> lock(mu_);
  --in_flight_;
  cv_.notify_all();
}

Status ParamSwapper::Wait(uint64_t id) {
  std::unique_lock<std::mutex> lock(mu_);
  ZTIER_ASSIGN_OR_RETURN(Member * m, Find(id));
  ExtentState& e = extents_[m->extent];
  // A partition swapped in while its extent was being written back becomes
  // IN_HOST when that write completes.
  cv_.wait(lock, [&] {
    return e.state != PartitionState::kReading &&
           !(e.state == PartitionState::kWriting && m->held);
  });
  if (!m->error.ok()) {
    Status s = m->error;
    m->error = Status::Ok();
    return s;
  }
  if (!m->held) {
    return Status::FailedPrecondition(
        fmt::format("partition {} was not swapped in (call SwapIn first)", id));
  }
  return VerifyLocked(lock, *m);
}

Status ParamSwapper::Verify(uint64_t id) {
  std::unique_lock<std::mutex> lock(mu_);
  ZTIER_ASSIGN_OR_RETURN(Member * m, Find(id));
  const ExtentState& e = extents_[m->extent];
  if (e.state != PartitionState::kInHost || !m->held) {
    return Status::FailedPrecondition(fmt::format(
        "partition {} is {}: only a swapped-in partition can be verified", id,
        PartitionStateName(e.state)));
  }
  return VerifyLocked(lock, *m);
}

Status ParamSwapper::VerifyLocked(std::unique_lock<std::mutex>& lock, Member& m) {
  if (m.verified) return Status::Ok();
  ExtentState& e = extents_[m.extent];
  const uint8_t* data = e.span.data;
  // The extent is IN_HOST and held by this caller: its buffer cannot go away
  // or change under us, so the checksum is computed without the lock.
  lock.unlock();
  Status s = VerifyMember(m, data);
  lock.lock();
  if (s.ok()) {
    m.verified = true;
    return s;
  }
  ++stats_.checksum_failures;
  if (first_error_.ok()) first_error_ = s;
  // Never hand out the data: drop this holder (and the buffer if it was the
  // last one).
  if (m.held) {
    m.held = false;
    if (--e.holders == 0 && e.state == PartitionState::kInHost) {
      ReturnSpan(e);
      e.state = PartitionState::kOnNvme;
    }
  }
  return s;
}

Status ParamSwapper::WaitAll() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return in_flight_ == 0; });
  Status s = first_error_;
  first_error_ = Status::Ok();
  return s;
}

Result<uint8_t*> ParamSwapper::Data(uint64_t id) {
  std::unique_lock<std::mutex> lock(mu_);
  ZTIER_ASSIGN_OR_RETURN(Member * m, Find(id));
  ExtentState& e = extents_[m->extent];
  if (e.state != PartitionState::kInHost || !m->held) {
    return Status::FailedPrecondition(fmt::format(
        "partition {} is {}{}: its host data is available only while IN_HOST", id,
        PartitionStateName(e.state), m->held ? "" : " and not swapped in"));
  }
  ZTIER_RETURN_IF_ERROR(VerifyLocked(lock, *m));
  return e.span.data + m->offset;
}

Status ParamSwapper::ReleaseBuffer(uint64_t id, bool discard) {
  std::lock_guard<std::mutex> lock(mu_);
  ZTIER_ASSIGN_OR_RETURN(Member * m, Find(id));
  ExtentState& e = extents_[m->extent];
  if (!m->held) {
    return Status::FailedPrecondition(fmt::format(
        "partition {} holds no swap buffer (state {}): release without swap-in",
        id, PartitionStateName(e.state)));
  }
  if (e.state == PartitionState::kReading) {
    return Status::FailedPrecondition(
        fmt::format("partition {} is still READING: Wait() for it before releasing", id));
  }
  if (!m->written && !discard) {
    return Status::FailedPrecondition(fmt::format(
        "partition {}: its last write-back failed, so the swap buffer holds its "
        "only good copy; SwapOut() again, or release with discard",
        id));
  }
  m->held = false;
  --e.holders;
  if (e.holders == 0 && e.state == PartitionState::kInHost) {
    ReturnSpan(e);
    e.state = PartitionState::kOnNvme;
  }
  return Status::Ok();
}

Status ParamSwapper::SwapOut(uint64_t id) {
  std::unique_lock<std::mutex> lock(mu_);
  ZTIER_ASSIGN_OR_RETURN(Member * m, Find(id));
  ExtentState& e = extents_[m->extent];
  // Another member of the same pack may be writing the shared buffer back;
  // this member's data needs a write of its own after that one.
  cv_.wait(lock, [&] { return !(e.state == PartitionState::kWriting && m->held); });
  if (e.state != PartitionState::kInHost || !m->held) {
    return Status::FailedPrecondition(fmt::format(
        "partition {} is {}{}: SwapOut needs it IN_HOST", id,
        PartitionStateName(e.state), m->held ? "" : " and not swapped in"));
  }
  // Never write back (and re-checksum) data that failed its check.
  for (uint32_t mi : e.members) {
    Member& x = members_[mi];
    if (x.held || &x == m) ZTIER_RETURN_IF_ERROR(VerifyLocked(lock, x));
  }
  if (e.state != PartitionState::kInHost || !m->held) {
    return Status::FailedPrecondition(fmt::format("partition {} changed during SwapOut", id));
  }
  e.state = PartitionState::kWriting;
  m->held = false;
  --e.holders;
  ++in_flight_;
  const uint32_t extent_index = m->extent;
  const uint64_t target = id;
  lock.unlock();
  // New checksums (outside the lock: the extent is WRITING, its data fixed).
  std::vector<uint32_t> crcs;
  for (uint32_t mi : e.members) {
    const Member& x = members_[mi];
    crcs.push_back(options_.checksum ? Crc32c(e.span.data + x.offset, x.bytes) : 0);
  }
  Status s = engine_->Submit(
      {io::Op::kWrite, &store_->file(), e.where.offset, e.where.bytes, e.span.data,
       [this, extent_index, target, crcs = std::move(crcs)](const Status& st) {
         std::lock_guard<std::mutex> lock(mu_);
         ExtentState& ex = extents_[extent_index];
         if (st.ok()) {
           for (size_t k = 0; k < ex.members.size(); ++k) {
             Member& x = members_[ex.members[k]];
             x.crc = crcs[k];
             // Valid on disk again: the target, and members whose earlier
             // write-back failed (their good copy was in this buffer).
             if (x.id == target || x.write_failed) {
               x.written = true;
               x.write_failed = false;
             }
           }
         }
         OnWriteDone(extent_index, st);
       }});
  if (!s.ok()) {
    lock.lock();
    --in_flight_;
    e.state = PartitionState::kInHost;
    m->held = true;
    ++e.holders;
    cv_.notify_all();
  }
  return s;
}

// Needs mu_ (called from SwapOut's completion with the lock held).
void ParamSwapper::OnWriteDone(uint32_t extent_index, const Status& status) {
  ExtentState& e = extents_[extent_index];
  --in_flight_;
  if (status.ok()) {
    stats_.bytes_written += e.where.bytes;
    ++stats_.writes;
    if (e.holders == 0) {
      ReturnSpan(e);
      e.state = PartitionState::kOnNvme;
    } else {
      e.state = PartitionState::kInHost;
    }
  } else {
    // The NVMe copy may be torn: no member of the extent may be read back
    // from it, and the buffer (the only good copy) stays, held for the caller.
    Status err = status.WithContext(
        fmt::format("write back {}", Describe(members_[e.members.front()])));
    if (first_error_.ok()) first_error_ = err;
    e.state = PartitionState::kInHost;
    for (uint32_t mi : e.members) {
      Member& x = members_[mi];
      if (x.written) x.write_failed = true;
      x.written = false;
      x.error = err;
      if (!x.held) {
        x.held = true;
        ++e.holders;
      }
    }
  }
  cv_.notify_all();
}

// Old packs held in read buffers while new packs are assembled. The whole
// sequence of uses is known in advance, so the pack evicted is the one used
// again farthest ahead (Belady): each old pack is read as few times as the
// buffers allow.
class ParamSwapper::PackCache {
 public:
  static constexpr uint32_t kNone = UINT32_MAX;

  // `uses[x]`: the new packs (ascending) that draw from old extent x.
  PackCache(std::span<const tiering::BufferSpan> slots, std::vector<std::vector<size_t>> uses)
      : slots_(slots.begin(), slots.end()), held_(slots.size(), kNone), uses_(std::move(uses)) {}

  // The slot holding old extent `x`, or -1.
  int Find(uint32_t x) const {
    auto it = std::find(held_.begin(), held_.end(), x);
    return it == held_.end() ? -1 : static_cast<int>(it - held_.begin());
  }
  // The slot to read into while assembling new pack `p` (the packs `p` draws
  // from that are cached were copied first, so only later uses count).
  int Victim(size_t p) const {
    int best = 0;
    size_t best_next = 0;
    for (size_t i = 0; i < held_.size(); ++i) {
      const size_t next = held_[i] == kNone ? SIZE_MAX : NextUse(held_[i], p);
      if (i == 0 || next > best_next) {
        best = static_cast<int>(i);
        best_next = next;
      }
    }
    return best;
  }
  void Hold(int slot, uint32_t x) { held_[slot] = x; }
  uint8_t* data(int slot) const { return slots_[slot].data; }

 private:
  size_t NextUse(uint32_t x, size_t p) const {
    auto it = std::upper_bound(uses_[x].begin(), uses_[x].end(), p);
    return it == uses_[x].end() ? SIZE_MAX : *it;
  }

  std::vector<tiering::BufferSpan> slots_;
  std::vector<uint32_t> held_;  // old extent index per slot, or kNone
  std::vector<std::vector<size_t>> uses_;
};

void ParamSwapper::WaitNotRepacking(std::unique_lock<std::mutex>& lock) {
  cv_.wait(lock, [&] { return !repacking_; });
}

Status ParamSwapper::Repack(std::span<const PackGroup> groups) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!sealed_) return Status::FailedPrecondition("call Seal() before Repack()");
  WaitNotRepacking(lock);  // another Repack
  ZTIER_RETURN_IF_ERROR(CheckQuiet());
  ZTIER_ASSIGN_OR_RETURN(std::vector<Pack> packs, PlanRepack(groups));
  if (packs == CurrentPacks()) return Status::Ok();  // same layout: no I/O
  // The region not in force: the old layout stays intact until the switch.
  const int region = region_in_force_ == 0 ? 1 : 0;
  ZTIER_ASSIGN_OR_RETURN(std::vector<PlacedPack> placed,
                         Place(std::move(packs), repack_region_[region]));
  repacking_ = true;
  lock.unlock();
  SwapperStats traffic;
  Status s = CopyPacks(placed, &traffic);
  lock.lock();
  stats_.bytes_read += traffic.bytes_read;
  stats_.reads += traffic.reads;
  stats_.bytes_written += traffic.bytes_written;
  stats_.writes += traffic.writes;
  stats_.checksum_failures += traffic.checksum_failures;
  if (s.ok()) {
    SwitchLayout(std::move(placed));
    region_in_force_ = region;
    ++stats_.repacks;
    stats_.bytes_repacked += traffic.bytes_written;
  }
  repacking_ = false;
  cv_.notify_all();
  return s;
}

Status ParamSwapper::CheckQuiet() const {
  for (const Member& m : members_) {
    const ExtentState& e = extents_[m.extent];
    if (e.state == PartitionState::kOnNvme && !m.held) continue;
    // A pack mate may be the one swapped in: name it too.
    std::string why = m.held ? " and swapped in" : "";
    for (uint32_t mi : e.members) {
      if (!m.held && members_[mi].held) {
        why = fmt::format(" (its pack is swapped in for partition {})", members_[mi].id);
        break;
      }
    }
    return Status::FailedPrecondition(fmt::format(
        "partition {} is {}{}: Repack needs every partition ON_NVME with no hold "
        "(release or swap it out, and WaitAll(), first)",
        m.id, PartitionStateName(e.state), why));
  }
  if (in_flight_ > 0 || private_reads_ > 0) {
    return Status::FailedPrecondition(fmt::format(
        "{} transfer(s) of the swapper are still completing: Repack needs nothing in "
        "flight (WaitAll() first)",
        in_flight_ + private_reads_));
  }
  return Status::Ok();
}

std::vector<ParamSwapper::Pack> ParamSwapper::CurrentPacks() const {
  std::vector<Pack> packs;
  for (const ExtentState& e : extents_) {
    if (members_[e.members.front()].packed) packs.push_back(e.members);
  }
  return packs;
}

Result<std::vector<ParamSwapper::Pack>> ParamSwapper::PlanRepack(
    std::span<const PackGroup> groups) const {
  std::vector<uint32_t> order;  // packed members, new order
  std::vector<bool> breaks;     // breaks[k]: a pack starts at order[k]
  std::vector<bool> placed(members_.size(), false);
  bool closed = false;  // the open pack belongs to an `alone` group
  // Appends the members named by `ids` not yet placed.
  auto place = [&](const std::vector<uint32_t>& ids, bool alone) {
    const size_t first = order.size();
    for (uint32_t mi : ids) {
      if (!members_[mi].packed || placed[mi]) continue;
      placed[mi] = true;
      order.push_back(mi);
      breaks.push_back(false);
    }
    if (order.size() == first) return;  // adds nothing, closes nothing
    breaks[first] = alone || closed;
    closed = alone;
  };
  std::vector<uint32_t> named;
  for (const PackGroup& g : groups) {
    named.clear();
    for (uint64_t id : g.ids) {
      auto it = index_.find(id);
      if (it == index_.end()) {
        return Status::NotFound(fmt::format(
            "Repack: partition {} is not registered with the swapper", id));
      }
      named.push_back(it->second);
    }
    place(named, g.alone);
  }
  // The rest, in their current order, after the last group.
  for (const Pack& pack : CurrentPacks()) place(pack, false);
  return PackInOrder(order, breaks);
}

std::vector<ParamSwapper::Pack> ParamSwapper::PackInOrder(
    std::span<const uint32_t> order, const std::vector<bool>& breaks) const {
  // Next-fit into one buffer, members at 256-byte boundaries: Seal()'s rule,
  // except that Seal(), not knowing the order of use, stops a pack at
  // pack_threshold bytes.
  const uint64_t buffer_bytes = pool_->buffer_bytes();
  std::vector<Pack> packs;
  uint64_t fill = 0;  // bytes of the open pack
  for (size_t k = 0; k < order.size(); ++k) {
    const uint64_t bytes = members_[order[k]].bytes;  // <= buffer_bytes: packed
    uint64_t offset = AlignUp(fill, kPackMemberAlignment);
    if (packs.empty() || breaks[k] || offset + bytes > buffer_bytes) {
      packs.emplace_back();
      offset = 0;
    }
    packs.back().push_back(order[k]);
    fill = offset + bytes;
  }
  return packs;
}

Result<std::vector<ParamSwapper::PlacedPack>> ParamSwapper::Place(std::vector<Pack> packs,
                                                                  const Extent& region) const {
  std::vector<PlacedPack> placed;
  uint64_t used = 0;  // bytes of the region taken
  for (Pack& pack : packs) {
    PlacedPack p;
    uint64_t fill = 0;
    for (uint32_t mi : pack) {
      const uint64_t offset = AlignUp(fill, kPackMemberAlignment);
      p.offsets.push_back(offset);
      fill = offset + members_[mi].bytes;  // < one buffer (PackInOrder)
    }
    p.members = std::move(pack);
    p.where = {region.offset + used, AlignUp(fill, kExtentAlignment)};
    used += p.where.bytes;  // <= region.bytes, checked below
    if (used > region.bytes) {
      // RepackRegionBytes() bounds every packing: this is a bug.
      return Status::Internal(fmt::format(
          "Repack: the new packs need more than the {} bytes of the repack region",
          region.bytes));
    }
    placed.push_back(std::move(p));
  }
  return placed;
}

Status ParamSwapper::CopyPacks(const std::vector<PlacedPack>& packs, SwapperStats* traffic) {
  // A few single buffers (every pack fits in one), never the whole packed
  // set. The first is waited for, as Read() waits; the others are taken only
  // when free, so this never waits while holding one.
  ZTIER_ASSIGN_OR_RETURN(const tiering::BufferSpan first, AcquireOneBuffer(*pool_));
  std::vector<tiering::BufferSpan> spans = {first};
  while (spans.size() < kRepackMaxBuffers) {
    auto got = pool_->TryAcquire(1);
    if (!got.ok() || !*got) break;  // the extra buffers are only for speed
    spans.push_back(**got);
  }
  // With one pool buffer (buffer_count 1, or the rest in use), new packs are
  // assembled in one host buffer of the same size: the only host memory this
  // takes, and only then.
  std::unique_ptr<void, decltype(&free)> host(nullptr, &free);
  std::vector<tiering::BufferSpan> slots = spans;
  Status s;
  if (slots.size() < 2) {
    void* p = nullptr;
    const uint64_t align = std::max<uint64_t>(store_->alignment(), kExtentAlignment);
    if (posix_memalign(&p, align, pool_->buffer_bytes()) == 0) {
      host.reset(p);
      slots.push_back({.data = static_cast<uint8_t*>(p), .bytes = pool_->buffer_bytes()});
    } else {
      s = Status::ResourceExhausted(fmt::format(
          "Repack: allocate a {}-byte host buffer to assemble packs in", pool_->buffer_bytes()));
    }
  }
  if (s.ok()) s = CopyThrough(packs, slots, traffic);
  for (const tiering::BufferSpan& span : spans) {
    Status released = pool_->Release(span);
    (void)released;  // spans this call took are always valid to give back
  }
  return s;
}

Status ParamSwapper::CopyThrough(const std::vector<PlacedPack>& packs,
                                 std::span<const tiering::BufferSpan> slots,
                                 SwapperStats* traffic) {
  Status s;
  const size_t writers = slots.size() >= 4 ? 2 : 1;
  std::vector<std::vector<size_t>> uses(extents_.size());  // old extent -> new packs
  for (size_t p = 0; p < packs.size(); ++p) {
    for (uint32_t mi : packs[p].members) {
      std::vector<size_t>& u = uses[members_[mi].extent];
      if (members_[mi].written && (u.empty() || u.back() != p)) u.push_back(p);
    }
  }
  PackCache cache(slots.subspan(writers), std::move(uses));
  std::vector<tiering::BufferSpan> out(slots.begin(), slots.begin() + writers);
  // One new pack's write in flight.
  struct Pending {
    size_t pack = 0;
    tiering::BufferSpan span;
    std::future<Status> done;
  };
  std::deque<Pending> pending;
  auto finish_oldest = [&] {
    Pending w = std::move(pending.front());
    pending.pop_front();
    const Status st = w.done.get();
    const PlacedPack& pk = packs[w.pack];
    if (st.ok()) {
      traffic->bytes_written += pk.where.bytes;
      ++traffic->writes;
    } else if (s.ok()) {
      s = st.WithContext(fmt::format(
          "repack: write the new pack of partition {} at {} (the old layout stays in force)",
          members_[pk.members.front()].id, store_->Locate(pk.where.offset)));
    }
    out.push_back(w.span);
  };
  for (size_t p = 0; p < packs.size() && s.ok(); ++p) {
    const PlacedPack& pk = packs[p];
    // A pack of members never written stays unwritten: nothing to copy.
    if (std::none_of(pk.members.begin(), pk.members.end(),
                     [&](uint32_t mi) { return members_[mi].written; })) {
      continue;
    }
    if (out.empty()) {
      finish_oldest();
      if (!s.ok()) break;
    }
    Pending w{.pack = p, .span = out.back()};
    out.pop_back();
    s = AssemblePack(packs, p, cache, w.span.data, traffic);
    if (!s.ok()) {
      out.push_back(w.span);
      break;
    }
    auto promise = std::make_shared<std::promise<Status>>();
    w.done = promise->get_future();
    Status submitted = engine_->Submit(
        {io::Op::kWrite, &store_->file(), pk.where.offset, pk.where.bytes, w.span.data,
         [promise](const Status& st) { promise->set_value(st); }});
    if (!submitted.ok()) promise->set_value(submitted);
    pending.push_back(std::move(w));
  }
  while (!pending.empty()) finish_oldest();  // the buffers are written from
  return s;
}

Status ParamSwapper::AssemblePack(const std::vector<PlacedPack>& packs, size_t p,
                                  PackCache& cache, uint8_t* out, SwapperStats* traffic) {
  const PlacedPack& pk = packs[p];
  memset(out, 0, pk.where.bytes);  // padding and unwritten members: zeros
  // The old packs this one draws from, those already cached first.
  std::vector<uint32_t> sources;
  for (uint32_t mi : pk.members) {
    const uint32_t x = members_[mi].extent;
    if (members_[mi].written && std::find(sources.begin(), sources.end(), x) == sources.end()) {
      sources.push_back(x);
    }
  }
  std::stable_partition(sources.begin(), sources.end(),
                        [&](uint32_t x) { return cache.Find(x) >= 0; });
  for (uint32_t x : sources) {
    int slot = cache.Find(x);
    if (slot < 0) {
      slot = cache.Victim(p);
      cache.Hold(slot, PackCache::kNone);  // until the read has succeeded
      const Extent from = extents_[x].where;
      Status s = engine_->Run(
          {io::Op::kRead, &store_->file(), from.offset, from.bytes, cache.data(slot), nullptr});
      if (!s.ok()) {
        return s.WithContext(
            fmt::format("repack: read {}", Describe(members_[extents_[x].members.front()])));
      }
      cache.Hold(slot, x);
      traffic->bytes_read += from.bytes;
      ++traffic->reads;
    }
    for (size_t k = 0; k < pk.members.size(); ++k) {
      const Member& m = members_[pk.members[k]];
      if (!m.written || m.extent != x) continue;
      // Never carry bad data into the new layout under its old checksum.
      Status ok = VerifyMember(m, cache.data(slot));
      if (!ok.ok()) {
        ++traffic->checksum_failures;
        return ok.WithContext("repack");
      }
      memcpy(out + pk.offsets[k], cache.data(slot) + m.offset, m.bytes);
    }
  }
  return Status::Ok();
}

// Makes the placed packs the layout in force: large extents keep their
// places, the packs follow in their new order. Nothing is held or in flight.
void ParamSwapper::SwitchLayout(std::vector<PlacedPack> packs) {
  std::vector<ExtentState> next;
  for (ExtentState& e : extents_) {
    if (!members_[e.members.front()].packed) next.push_back(std::move(e));
  }
  for (PlacedPack& pk : packs) {
    ExtentState e;
    e.where = pk.where;
    e.buffers = pool_->BuffersFor(pk.where.bytes);
    for (size_t k = 0; k < pk.members.size(); ++k) members_[pk.members[k]].offset = pk.offsets[k];
    e.members = std::move(pk.members);
    next.push_back(std::move(e));
  }
  extents_ = std::move(next);
  for (uint32_t i = 0; i < extents_.size(); ++i) {
    for (uint32_t mi : extents_[i].members) members_[mi].extent = i;
  }
  stats_.extents = extents_.size();
}

void ParamSwapper::SetReadCallback(ReadCallback cb) {
  std::lock_guard<std::mutex> lock(mu_);
  read_cb_ = std::move(cb);
}

PartitionState ParamSwapper::state(uint64_t id) const {
  std::lock_guard<std::mutex> lock(mu_);
  const Member* m = Find(id);
  return m ? extents_[m->extent].state : PartitionState::kOnNvme;
}

uint64_t ParamSwapper::bytes(uint64_t id) const {
  std::lock_guard<std::mutex> lock(mu_);
  const Member* m = Find(id);
  return m ? m->bytes : 0;
}

bool ParamSwapper::contains(uint64_t id) const {
  std::lock_guard<std::mutex> lock(mu_);
  return Find(id) != nullptr;
}

uint32_t ParamSwapper::BuffersNeeded(uint64_t id) const {
  std::lock_guard<std::mutex> lock(mu_);
  const Member* m = Find(id);
  if (!m) return 0;
  const ExtentState& e = extents_[m->extent];
  return e.state == PartitionState::kOnNvme ? e.buffers : 0;
}

uint32_t ParamSwapper::available_swap_in_buffers() const {
  return pool_->stats().buffers_free;
}

SwapperStats ParamSwapper::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

}  // namespace ztier::swapper
