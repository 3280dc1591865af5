// The collective backends that need no communication library: "self" (world
// size 1) and "local" (the ranks are threads of this process, each over its
// own host-emulation DeviceBackend, so device memory is host memory and any
// rank may read any other rank's buffers directly).
//
// How "local" runs a collective: each rank numbers its own collectives in
// issue order (0, 1, 2, ...); the k-th collective of every rank is the same
// collective, as with NCCL. The call only enqueues a host callback on the
// rank's stream. When the stream reaches it, the callback meets the other
// ranks' callbacks for the same number in a Slot of the group: each rank
// publishes its pointers and sizes, the last to arrive checks that all ranks
// agree (barrier 1), each rank copies or reduces what it needs straight from
// the others' memory, then all wait until every rank has finished reading
// (barrier 2), so that no rank's stream moves on to free or overwrite a buffer
// another rank still reads. Slots are keyed by number, so any number of
// collectives may be queued before the first runs, on one stream or several.
//
// Failure: if the ranks disagree on a collective (operation, size, dtype), or
// a rank's Collective is destroyed while others wait for a collective it will
// never issue, nothing is copied, the group is marked failed, every waiting
// rank is released and every later call on any rank returns the error. A
// broken group never blocks and never touches memory again.
//
// Locking: one mutex per group guards all slots and counters; copies run
// without it. Each rank's Collective has a second mutex that keeps the
// numbering of its collectives in the order they reach its streams.
#include "coordinator/collective.h"
#include "coordinator/collective_internal.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "base/log.h"
#include "optim/element.h"

namespace ztier::coordinator {
namespace {

using tiering::DeviceBackend;
using tiering::StreamHandle;

// ---- self ----

class SelfCollective final : public Collective {
 public:
  explicit SelfCollective(DeviceBackend* device) : device_(device) {}

  std::string_view name() const override { return "self"; }
  uint32_t rank() const override { return 0; }
  uint32_t world_size() const override { return 1; }

  Status AllGather(const void* part, void* full, uint64_t part_bytes,
                   StreamHandle stream) override {
    ZTIER_RETURN_IF_ERROR(CheckCollectiveBuffers("AllGather", part, full, part_bytes, 0, 1));
    if (part_bytes == 0 || part == full) return Status::Ok();
    return device_->MemcpyD2DAsync(full, part, part_bytes, stream);
  }

  Status ReduceScatterMean(const void* full, void* part, uint64_t part_elems,
                           DType dtype, StreamHandle stream) override {
    ZTIER_ASSIGN_OR_RETURN(const uint64_t bytes, MeanBytes(dtype, part_elems));
    ZTIER_RETURN_IF_ERROR(CheckCollectiveBuffers("ReduceScatterMean", part, full, bytes, 0, 1));
    // The mean over one rank is the rank's own values.
    if (bytes == 0 || part == full) return Status::Ok();
    return device_->MemcpyD2DAsync(part, full, bytes, stream);
  }

  Result<std::vector<uint64_t>> AllGatherHost(uint64_t value) override {
    return std::vector<uint64_t>{value};
  }

 private:
  DeviceBackend* const device_;
};

// ---- local ----

enum class Op : uint8_t { kAllGather, kReduceScatterMean, kAllGatherHost };

std::string_view OpName(Op op) {
  switch (op) {
    case Op::kAllGather: return "AllGather";
    case Op::kReduceScatterMean: return "ReduceScatterMean";
    case Op::kAllGatherHost: return "AllGatherHost";
  }
  return "?";
}

// What one rank brings to one collective.
struct Contribution {
  Op op = Op::kAllGather;
  const uint8_t* src = nullptr;  // AllGather: part; ReduceScatterMean: full
  uint8_t* dst = nullptr;        // AllGather: full; ReduceScatterMean: part
  uint64_t count = 0;            // AllGather: bytes; ReduceScatterMean: elements
  DType dtype = DType::kUInt8;
  uint64_t value = 0;            // AllGatherHost
};

// One collective (one sequence number) while ranks meet in it. Guarded by the
// group's mutex.
struct Slot {
  explicit Slot(uint32_t world) : contributions(world) {}
  std::vector<Contribution> contributions;  // by rank
  uint32_t arrived = 0;     // ranks waiting at the current barrier
  uint64_t generation = 0;  // barriers completed so far (0, 1 or 2)
  uint32_t left = 0;        // ranks done with the slot; the last erases it
  Status error;             // set at barrier 1 when the ranks disagree
};

// How long a rank waits in a barrier before it logs who is missing, then
// again after each further period. A warning, not a timeout: a slow rank is
// legal, and only the user can tell a slow rank from a lost one.
constexpr auto kWaitWarning = std::chrono::seconds(30);

class LocalGroupImpl final : public LocalGroup,
                             public std::enable_shared_from_this<LocalGroupImpl> {
 public:
  explicit LocalGroupImpl(uint32_t world)
      : world_(world), next_seq_(world, 0), joined_(world, false),
        departed_(world, false) {}

  uint32_t world_size() const override { return world_; }
  Result<std::unique_ptr<Collective>> Join(uint32_t rank,
                                           DeviceBackend* device) override;

  // The group's failure, if any (then every call returns it).
  Status Failure() {
    std::lock_guard<std::mutex> lock(mu_);
    return FailureLocked();
  }

  // The number the rank's next collective gets.
  uint64_t NextSeq(uint32_t rank) {
    std::lock_guard<std::mutex> lock(mu_);
    return next_seq_[rank];
  }
  void CommitSeq(uint32_t rank) {
    std::lock_guard<std::mutex> lock(mu_);
    ++next_seq_[rank];
  }

  // Runs on rank `rank`'s stream thread when the stream reaches collective
  // `seq`. Returns once this rank's part is done and no other rank reads its
  // buffers any more, or at once if the group has failed.
  void RunOnStream(uint32_t rank, uint64_t seq, const Contribution& mine) {
    std::shared_ptr<Slot> slot;
    {
      std::unique_lock<std::mutex> lock(mu_);
      slot = Arrive(lock, rank, seq, mine);
      if (!slot) return;
    }
    const Contribution& c = slot->contributions[rank];
    if (c.op == Op::kAllGather) {
      // Every rank's part into this rank's full buffer, rank j's at j x bytes.
      // In place, this rank's own part already sits in its slot.
      for (uint32_t j = 0; j < world_; ++j) {
        const uint8_t* src = slot->contributions[j].src;
        uint8_t* dst = c.dst + j * c.count;
        if (c.count != 0 && src != dst) std::memcpy(dst, src, c.count);
      }
    } else {
      // Slice `rank` of every rank's full buffer, averaged into this rank's part.
      const uint64_t slice = rank * c.count * DTypeBytes(c.dtype);  // bytes
      std::vector<const uint8_t*> srcs(world_);
      for (uint32_t j = 0; j < world_; ++j) srcs[j] = slot->contributions[j].src + slice;
      MeanOfRanks(c.dtype, srcs, c.dst, c.count);
    }
    std::unique_lock<std::mutex> lock(mu_);
    // Not abortable: every rank passed barrier 1, so each is copying and will
    // arrive without waiting on anything else.
    Barrier(lock, *slot, rank, seq, /*abortable=*/false);
    Leave(seq, slot);
  }

  // Blocking host rendezvous on the calling thread, as collective `seq`.
  Result<std::vector<uint64_t>> RunOnHost(uint32_t rank, uint64_t seq, uint64_t value) {
    std::unique_lock<std::mutex> lock(mu_);
    Contribution mine;
    mine.op = Op::kAllGatherHost;
    mine.value = value;
    std::shared_ptr<Slot> slot = Arrive(lock, rank, seq, mine);
    if (!slot) return FailureLocked();
    std::vector<uint64_t> values(world_);
    for (uint32_t j = 0; j < world_; ++j) values[j] = slot->contributions[j].value;
    // Copied under the lock: no second barrier needed.
    Leave(seq, slot);
    return values;
  }

  // Rank `rank`'s Collective is going away. Collectives it already issued
  // still run (its streams hold them); any other rank waiting for one it has
  // not issued would wait forever, so such a wait fails the group.
  void Depart(uint32_t rank) {
    std::lock_guard<std::mutex> lock(mu_);
    joined_[rank] = false;
    departed_[rank] = true;
    for (const auto& [seq, slot] : slots_) {
      if (seq >= next_seq_[rank]) {
        FailLocked(Departed(rank, seq));
        return;
      }
    }
  }

  void Abort(uint32_t rank) override {
    if (rank < world_) Depart(rank);
  }

  Status MarkJoined(uint32_t rank) {
    std::lock_guard<std::mutex> lock(mu_);
    if (joined_[rank]) {
      return Status::FailedPrecondition(fmt::format(
          "local collective group: rank {} has already joined (one Collective per "
          "rank)",
          rank));
    }
    joined_[rank] = true;
    departed_[rank] = false;
    return Status::Ok();
  }

 private:
  Status FailureLocked() const {
    if (failure_.ok()) return Status::Ok();
    return failure_.WithContext("local collective group failed earlier");
  }

  Status Departed(uint32_t rank, uint64_t seq) const {
    return Status::FailedPrecondition(fmt::format(
        "local collective #{}: rank {} left the group (its Collective was "
        "destroyed) after issuing only {} collectives",
        seq, rank, next_seq_[rank]));
  }

  // Marks the group failed and releases every rank waiting at barrier 1.
  void FailLocked(Status error) {
    if (!failure_.ok()) return;
    Log(LogLevel::kError, "{}", error.message());
    failure_ = std::move(error);
    cv_.notify_all();
  }

  // Publishes `mine` in slot `seq` and waits at barrier 1. Returns the slot
  // once all ranks arrived and agree; null (having left the slot) when the
  // group has failed or fails meanwhile.
  std::shared_ptr<Slot> Arrive(std::unique_lock<std::mutex>& lock, uint32_t rank,
                               uint64_t seq, const Contribution& mine) {
    if (!failure_.ok()) return nullptr;
    for (uint32_t r = 0; r < world_; ++r) {
      if (departed_[r] && next_seq_[r] <= seq) {
        FailLocked(Departed(r, seq));
        return nullptr;
      }
    }
    std::shared_ptr<Slot>& entry = slots_[seq];
    if (!entry) entry = std::make_shared<Slot>(world_);
    std::shared_ptr<Slot> slot = entry;
    slot->contributions[rank] = mine;
    if (!Barrier(lock, *slot, rank, seq, /*abortable=*/true)) return nullptr;
    if (!slot->error.ok()) {
      Leave(seq, slot);
      return nullptr;
    }
    return slot;
  }

  // Checks, as the last rank to arrive at barrier 1, that every rank issued
  // the same collective. Disagreement fails the group: copying with
  // mismatched sizes would read or write past someone's buffer.
  void Validate(Slot& slot, uint64_t seq) {
    const Contribution& a = slot.contributions[0];
    for (uint32_t r = 1; r < world_; ++r) {
      const Contribution& b = slot.contributions[r];
      std::string what;
      if (b.op != a.op) {
        what = fmt::format("rank 0 issued {}, rank {} issued {}", OpName(a.op), r,
                           OpName(b.op));
      } else if (a.op == Op::kAllGather && b.count != a.count) {
        what = fmt::format("rank 0 passed part_bytes {}, rank {} passed {}", a.count,
                           r, b.count);
      } else if (a.op == Op::kReduceScatterMean && b.dtype != a.dtype) {
        what = fmt::format("rank 0 passed dtype {}, rank {} passed {}",
                           DTypeName(a.dtype), r, DTypeName(b.dtype));
      } else if (a.op == Op::kReduceScatterMean && b.count != a.count) {
        what = fmt::format("rank 0 passed part_elems {}, rank {} passed {}", a.count,
                           r, b.count);
      }
      if (!what.empty()) {
        slot.error = Status::InvalidArgument(fmt::format(
            "local collective #{} ({}): ranks disagree: {}; nothing was copied "
            "(every rank must issue the same collectives, with the same sizes, "
            "in the same order)",
            seq, OpName(a.op), what));
        FailLocked(slot.error);
        return;
      }
    }
  }

  // Generation-counted barrier of the slot's ranks. The last to arrive runs
  // the check of barrier 1 and opens it. Returns false, having withdrawn,
  // only when `abortable` and the group failed before the barrier opened.
  bool Barrier(std::unique_lock<std::mutex>& lock, Slot& slot, uint32_t rank,
               uint64_t seq, bool abortable) {
    const uint64_t generation = slot.generation;
    if (++slot.arrived == world_) {
      slot.arrived = 0;
      if (generation == 0) Validate(slot, seq);
      ++slot.generation;
      cv_.notify_all();
      return true;
    }
    auto done = [&] {
      return slot.generation != generation || (abortable && !failure_.ok());
    };
    auto waited = std::chrono::seconds(0);
    while (!cv_.wait_for(lock, kWaitWarning, done)) {
      waited += kWaitWarning;
      Log(LogLevel::kWarning,
          "local collective #{} ({}): rank {} has waited {} s at barrier {}; {} of "
          "{} ranks there",
          seq, OpName(slot.contributions[rank].op), rank, waited.count(),
          generation + 1, slot.arrived, world_);
    }
    if (slot.generation != generation) return true;
    --slot.arrived;
    return false;
  }

  void Leave(uint64_t seq, const std::shared_ptr<Slot>& slot) {
    if (++slot->left < world_) return;
    auto it = slots_.find(seq);
    if (it != slots_.end() && it->second == slot) slots_.erase(it);
  }

  const uint32_t world_;
  std::mutex mu_;
  std::condition_variable cv_;  // any barrier opened, or the group failed
  std::map<uint64_t, std::shared_ptr<Slot>> slots_;  // by sequence number
  std::vector<uint64_t> next_seq_;  // by rank: collectives issued so far
  std::vector<bool> joined_;        // by rank: a live Collective exists
  std::vector<bool> departed_;      // by rank: its Collective was destroyed
  Status failure_;                  // first error; the group is dead after it
};

class LocalCollective final : public Collective {
 public:
  LocalCollective(std::shared_ptr<LocalGroupImpl> group, uint32_t rank,
                  DeviceBackend* device)
      : group_(std::move(group)), rank_(rank), device_(device) {}
  ~LocalCollective() override { group_->Depart(rank_); }

  std::string_view name() const override { return "local"; }
  uint32_t rank() const override { return rank_; }
  uint32_t world_size() const override { return group_->world_size(); }

  Status AllGather(const void* part, void* full, uint64_t part_bytes,
                   StreamHandle stream) override {
    ZTIER_RETURN_IF_ERROR(
        CheckCollectiveBuffers("AllGather", part, full, part_bytes, rank_, world_size()));
    Contribution c;
    c.op = Op::kAllGather;
    c.src = static_cast<const uint8_t*>(part);
    c.dst = static_cast<uint8_t*>(full);
    c.count = part_bytes;
    return Issue(c, stream);
  }

  Status ReduceScatterMean(const void* full, void* part, uint64_t part_elems,
                           DType dtype, StreamHandle stream) override {
    ZTIER_ASSIGN_OR_RETURN(const uint64_t bytes, MeanBytes(dtype, part_elems));
    ZTIER_RETURN_IF_ERROR(
        CheckCollectiveBuffers("ReduceScatterMean", part, full, bytes, rank_, world_size()));
    Contribution c;
    c.op = Op::kReduceScatterMean;
    c.src = static_cast<const uint8_t*>(full);
    c.dst = static_cast<uint8_t*>(part);
    c.count = part_elems;
    c.dtype = dtype;
    return Issue(c, stream);
  }

  Status Health() override { return group_->Failure(); }

  Result<std::vector<uint64_t>> AllGatherHost(uint64_t value) override {
    std::lock_guard<std::mutex> lock(issue_mu_);
    ZTIER_RETURN_IF_ERROR(group_->Failure());
    const uint64_t seq = group_->NextSeq(rank_);
    group_->CommitSeq(rank_);  // before waiting: others may look at it meanwhile
    return group_->RunOnHost(rank_, seq, value);
  }

 private:
  Status Issue(const Contribution& c, StreamHandle stream) {
    // Held across numbering and enqueueing, so that numbers follow the order
    // in which this rank's collectives reach its streams.
    std::lock_guard<std::mutex> lock(issue_mu_);
    ZTIER_RETURN_IF_ERROR(group_->Failure());
    const uint64_t seq = group_->NextSeq(rank_);
    // The callback holds the group, not this object: it may run after the
    // Collective is gone.
    ZTIER_RETURN_IF_ERROR(device_->LaunchHostFunc(
        stream, [group = group_, rank = rank_, seq, c] { group->RunOnStream(rank, seq, c); }));
    // Only an enqueued collective takes a number; a failed call leaves no gap.
    group_->CommitSeq(rank_);
    return Status::Ok();
  }

  const std::shared_ptr<LocalGroupImpl> group_;
  const uint32_t rank_;
  DeviceBackend* const device_;
  std::mutex issue_mu_;
};

Result<std::unique_ptr<Collective>> LocalGroupImpl::Join(uint32_t rank,
                                                         DeviceBackend* device) {
  if (rank >= world_) {
    return Status::InvalidArgument(fmt::format(
        "local collective group: rank {} is out of range (world size {})", rank,
        world_));
  }
  if (device == nullptr || device->name() != "host") {
    return Status::InvalidArgument(fmt::format(
        "local collective group: rank {} needs a host-emulation device backend (got "
        "'{}'); on GPUs use the nccl backend",
        rank, device ? device->name() : "null"));
  }
  ZTIER_RETURN_IF_ERROR(MarkJoined(rank));
  return std::unique_ptr<Collective>(
      new LocalCollective(shared_from_this(), rank, device));
}

}  // namespace

std::unique_ptr<Collective> CreateSelfCollective(tiering::DeviceBackend* device) {
  return std::make_unique<SelfCollective>(device);
}

std::shared_ptr<LocalGroup> LocalGroup::Create(uint32_t world_size) {
  if (world_size == 0) return nullptr;
  return std::make_shared<LocalGroupImpl>(world_size);
}

#if !defined(ZTIER_HAVE_NCCL)
namespace {
constexpr const char* kNoNccl =
    "built without NCCL (install NCCL beside the CUDA toolkit and reconfigure, "
    "or set ZTIER_WITH_NCCL=ON to make it required)";
}  // namespace

Result<std::unique_ptr<Collective>> CreateNcclCollective(const void*, uint64_t,
                                                         uint32_t, uint32_t,
                                                         tiering::DeviceBackend*) {
  return Status::Unavailable(fmt::format("nccl collective: {}", kNoNccl));
}

Result<std::unique_ptr<Collective>> WrapNcclCommunicator(void*,
                                                         tiering::DeviceBackend*) {
  return Status::Unavailable(fmt::format("nccl collective: {}", kNoNccl));
}

Result<std::vector<uint8_t>> NcclUniqueId() {
  return Status::Unavailable(fmt::format("nccl unique id: {}", kNoNccl));
}

bool NcclAvailable(std::string* why) {
  if (why) *why = kNoNccl;
  return false;
}
#endif

namespace {

template <DType kT>
void MeanOf(const std::vector<const uint8_t*>& srcs, uint8_t* dst, uint64_t elems) {
  constexpr optim::DType kE = ElementType(kT);
  constexpr uint64_t kChunk = 1024;  // elements: the accumulator stays in L1
  std::array<float, kChunk> acc{};
  const auto ranks = static_cast<float>(srcs.size());
  // Each chunk is read in full before it is written, so dst may be a source.
  for (uint64_t base = 0; base < elems; base += kChunk) {
    const uint64_t n = std::min(kChunk, elems - base);
    for (uint64_t i = 0; i < n; ++i) acc[i] = optim::LoadElement<kE>(srcs[0], base + i);
    for (size_t r = 1; r < srcs.size(); ++r) {
      for (uint64_t i = 0; i < n; ++i) acc[i] += optim::LoadElement<kE>(srcs[r], base + i);
    }
    for (uint64_t i = 0; i < n; ++i) optim::StoreElement<kE>(dst, base + i, acc[i] / ranks);
  }
}

}  // namespace

void MeanOfRanks(DType dtype, const std::vector<const uint8_t*>& srcs, uint8_t* dst,
                 uint64_t elems) {
  switch (dtype) {
    case DType::kFloat32: return MeanOf<DType::kFloat32>(srcs, dst, elems);
    case DType::kFloat16: return MeanOf<DType::kFloat16>(srcs, dst, elems);
    case DType::kBFloat16: return MeanOf<DType::kBFloat16>(srcs, dst, elems);
    case DType::kUInt8: return;  // rejected when issued
  }
}

Status CheckMeanDType(DType dtype) {
  if (dtype == DType::kFloat32 || dtype == DType::kFloat16 ||
      dtype == DType::kBFloat16) {
    return Status::Ok();
  }
  return Status::InvalidArgument(fmt::format(
      "ReduceScatterMean: dtype {} is not a floating-point type (use float32, "
      "float16 or bfloat16)",
      DTypeName(dtype)));
}

Result<uint64_t> MeanBytes(DType dtype, uint64_t part_elems) {
  ZTIER_RETURN_IF_ERROR(CheckMeanDType(dtype));
  uint64_t bytes = 0;
  if (__builtin_mul_overflow(part_elems, uint64_t{DTypeBytes(dtype)}, &bytes)) {
    return Status::InvalidArgument("ReduceScatterMean: element count overflows");
  }
  return bytes;
}

#if !defined(ZTIER_HAVE_GLOO)
namespace {
constexpr const char* kNoGloo =
    "built without gloo (apt-get install libgloo-dev and reconfigure, or set "
    "ZTIER_WITH_GLOO=ON to make it required)";
}  // namespace

Result<std::unique_ptr<Collective>> CreateGlooCollective(const GlooOptions&,
                                                         tiering::DeviceBackend*) {
  return Status::Unavailable(fmt::format("gloo collective: {}", kNoGloo));
}

bool GlooAvailable(std::string* why) {
  if (why) *why = kNoGloo;
  return false;
}
#endif

Status CheckCollectiveBuffers(const char* op, const void* part, const void* full,
                              uint64_t part_bytes, uint32_t rank, uint32_t world) {
  uint64_t full_bytes = 0;
  if (__builtin_mul_overflow(part_bytes, static_cast<uint64_t>(world), &full_bytes)) {
    return Status::InvalidArgument(
        fmt::format("{}: {} bytes x {} ranks overflows", op, part_bytes, world));
  }
  if (part_bytes == 0) return Status::Ok();
  if (part == nullptr || full == nullptr) {
    return Status::InvalidArgument(fmt::format("{}: null buffer", op));
  }
  const auto p = reinterpret_cast<uintptr_t>(part);
  const auto f = reinterpret_cast<uintptr_t>(full);
  const bool in_place = p == f + uint64_t{rank} * part_bytes;
  const bool overlap = p < f + full_bytes && f < p + part_bytes;
  if (overlap && !in_place) {
    return Status::InvalidArgument(fmt::format(
        "{}: the partition buffer overlaps the full buffer but is not rank {}'s "
        "slot of it (offset {} bytes); use separate buffers or exactly that slot",
        op, rank, uint64_t{rank} * part_bytes));
  }
  return Status::Ok();
}

}  // namespace ztier::coordinator
