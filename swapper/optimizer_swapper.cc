#include "swapper/optimizer_swapper.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <deque>
#include <new>
#include <thread>
#include <unordered_set>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "base/crc32c.h"
#include "optim/element.h"

namespace ztier::swapper {
namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

constexpr uint64_t kHeaderBytes = 4096;
constexpr uint64_t kMinChunkBytes = 1u << 20;
constexpr uint64_t kStateBytesPerElement = 12;  // master, exp_avg, exp_avg_sq
// Bytes of updated parameters handed to the sink at once, at least (the
// last batch of a step may be smaller).
constexpr uint64_t kParamBatchBytes = 8u << 20;

// The fixed part of a slot's header (little-endian; docs/swap_format.md).
// The chunk CRCs follow it; the rest of the 4096 bytes is zero.
struct SlotHeader {
  char magic[8];          // "ZTOPTSG1"
  uint32_t version;       // 1
  uint32_t header_bytes;  // 4096
  uint64_t run_id;        // the store's run id
  uint32_t sub_group;
  uint32_t chunk_count;
  uint64_t step;          // the optimizer step this state is the result of
  uint64_t numel;         // elements of the sub-group
  uint64_t chunk_bytes;   // payload bytes per checksummed chunk
  uint32_t header_crc;    // CRC32C of the 4096 bytes with this field zero
  uint32_t reserved;
};
constexpr char kSlotMagic[8] = {'Z', 'T', 'O', 'P', 'T', 'S', 'G', '1'};
constexpr uint64_t kMaxChunks = (kHeaderBytes - sizeof(SlotHeader)) / sizeof(uint32_t);

uint64_t AlignUp(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

uint32_t* ChunkCrcs(uint8_t* buf) { return reinterpret_cast<uint32_t*>(buf + sizeof(SlotHeader)); }
const uint32_t* ChunkCrcs(const uint8_t* buf) {
  return reinterpret_cast<const uint32_t*>(buf + sizeof(SlotHeader));
}

uint32_t HeaderCrc(const uint8_t* buf) {
  SlotHeader h;
  memcpy(&h, buf, sizeof(h));
  h.header_crc = 0;
  uint32_t crc = Crc32c(&h, sizeof(h));
  return Crc32c(buf + sizeof(h), kHeaderBytes - sizeof(h), crc);
}



}  // namespace

// The bookkeeping of one Step(): what each sub-group's read and write are
// doing (guarded by mu; the I/O thread's callbacks write it), the
// parameter partitions being assembled, and the parameter thread's queue.
struct OptimizerSwapper::StepRun {
  // Per segment: its constants this step (bias correction by the number of
  // updates it has had, as torch counts per parameter). Segments without a
  // gradient are skipped and their counts stay.
  std::vector<optim::AdamConstants> constants;
  uint64_t step = 0;  // the step being produced
  const ParamSink* sink = nullptr;
  std::vector<const void*> grads;          // per segment; nullptr: skipped
  std::vector<uint64_t> remaining;         // per segment: elements not updated yet
  std::vector<std::unique_ptr<uint8_t[]>> outs;  // per segment, while assembling
  std::vector<tiering::BufferSpan> spans;  // per sub-group, while it holds one
  std::vector<uint32_t> order;             // sub-groups in the order they are updated
  size_t next_read = 0;                    // position in `order` of the next read
  const GradSource* grad_source = nullptr;
  std::span<const optim::AdamHyper> hypers;  // per parameter group
  std::vector<uint8_t> resolved;           // per segment: its gradient was asked for

  std::mutex mu;
  std::condition_variable cv;
  std::vector<uint8_t> read_done;  // per sub-group
  std::vector<uint8_t> grad_reads_left;  // per sub-group: gradient reads in flight
  std::vector<Status> read_status;
  uint32_t in_flight = 0;  // transfers submitted and not completed
  uint32_t buffers_held = 0;
  Status write_error;      // the first failed write

  // Parameter thread.
  std::deque<std::pair<uint32_t, std::unique_ptr<uint8_t[]>>> param_queue;
  uint64_t param_pending_bytes = 0;
  uint64_t param_limit_bytes = 0;
  bool param_stop = false;
  bool param_discard = false;
  Status param_error;
  std::thread param_thread;

  OptimizerStepStats stats;
};

OptimizerSwapper::OptimizerSwapper(const OptimizerSwapperOptions& options,
                                   std::vector<OptimizerSegment> segments,
                                   io::AsyncEngine* engine)
    : options_(options), segments_(std::move(segments)), engine_(engine) {}

OptimizerSwapper::~OptimizerSwapper() {
  // Every Step/Initialize/ReadState drains its own transfers before it
  // returns; nothing is in flight here.
}

uint64_t OptimizerSwapper::ChunkBytes(uint64_t numel) const {
  const uint64_t payload = numel * kStateBytesPerElement;
  return AlignUp(std::max(kMinChunkBytes, (payload + kMaxChunks - 1) / kMaxChunks), 4096);
}

uint64_t OptimizerSwapper::SlotBytes(uint64_t numel) const {
  return kHeaderBytes + AlignUp(numel * kStateBytesPerElement, 4096);
}

Result<std::unique_ptr<OptimizerSwapper>> OptimizerSwapper::Create(
    const OptimizerSwapperOptions& options, std::vector<OptimizerSegment> segments,
    io::AsyncEngine* engine) {
  if (engine == nullptr) return Status::InvalidArgument("optimizer swapper: no I/O engine");
  if (options.buffer_count == 0) {
    return Status::InvalidArgument(
        "optimizer.buffer_count is 0: the step needs at least one buffer (4 lets reads and "
        "writes overlap the update)");
  }
  if (options.sub_group_size == 0) {
    return Status::InvalidArgument("optimizer.sub_group_size is 0: give elements per sub-group");
  }
  if (!optim::IsaAvailable(options.isa)) {
    return Status::Unavailable(fmt::format(
        "optimizer.isa {}: this CPU (or build) does not support it; the best here is {} "
        "(or set optimizer.isa: auto)",
        optim::IsaName(options.isa), optim::IsaName(optim::BestIsa())));
  }
  if (segments.empty()) {
    return Status::FailedPrecondition(
        "the optimizer has no parameters: register parameters before creating it");
  }
  std::unordered_set<uint64_t> ids;
  for (const auto& s : segments) {
    if (s.group >= kMaxGroups) {
      return Status::InvalidArgument(fmt::format(
          "optimizer: parameter {} is in group {}; at most {} parameter groups", s.id, s.group,
          kMaxGroups));
    }
    if (s.numel == 0) {
      return Status::InvalidArgument(fmt::format("optimizer: parameter {} has 0 elements", s.id));
    }
    if (!ids.insert(s.id).second) {
      return Status::InvalidArgument(fmt::format("optimizer: parameter {} given twice", s.id));
    }
  }
  std::unique_ptr<OptimizerSwapper> sw(
      new OptimizerSwapper(options, std::move(segments), engine));
  ZTIER_RETURN_IF_ERROR(sw->Layout());
  return sw;
}

Status OptimizerSwapper::Layout() {
  // Segments end to end, cut into sub-groups.
  uint64_t flat = 0;
  for (const auto& s : segments_) {
    segment_first_.push_back(flat);
    flat += s.numel;
  }
  total_elements_ = flat;
  updates_.assign(segments_.size(), 0);
  for (const auto& s : segments_) group_count_ = std::max(group_count_, s.group + 1);
  const uint64_t sg = options_.sub_group_size;
  size_t seg = 0;
  for (uint64_t first = 0; first < total_elements_; first += sg) {
    Group g;
    g.first = first;
    g.numel = std::min(sg, total_elements_ - first);
    const uint64_t end = first + g.numel;
    while (seg < segments_.size() && segment_first_[seg] + segments_[seg].numel <= first) ++seg;
    for (size_t k = seg; k < segments_.size() && segment_first_[k] < end; ++k) {
      const uint64_t lo = std::max(first, segment_first_[k]);
      const uint64_t hi = std::min(end, segment_first_[k] + segments_[k].numel);
      g.pieces.push_back(Piece{static_cast<uint32_t>(k), lo - segment_first_[k], lo - first,
                               hi - lo});
    }
    groups_.push_back(std::move(g));
  }
  uint64_t capacity = 0;
  for (const auto& g : groups_) {
    slot_bytes_ = std::max(slot_bytes_, SlotBytes(g.numel));
    capacity += 2 * SlotBytes(g.numel);
  }
  ZTIER_ASSIGN_OR_RETURN(store_, NvmeStore::Create(options_.store, capacity));
  for (auto& g : groups_) {
    for (int s = 0; s < 2; ++s) {
      ZTIER_ASSIGN_OR_RETURN(Extent e, store_->Allocate(SlotBytes(g.numel)));
      g.slot_offset[s] = e.offset;
    }
  }
  uint64_t grad_region = 0;
  if (options_.grads_on_store) {
    ZTIER_RETURN_IF_ERROR(LayoutGrads());
    for (const auto& g : groups_) grad_region = std::max(grad_region, g.grad_bytes);
  }
  tiering::PoolOptions po;
  // More buffers than sub-groups would never be used.
  po.buffer_count = static_cast<uint32_t>(
      std::min<uint64_t>(options_.buffer_count, groups_.size()));
  // A buffer: the slot, then (with a gradient store) the sub-group's gradients.
  po.buffer_bytes = slot_bytes_ + grad_region;
  po.alignment = std::max<uint32_t>(4096, store_->alignment());
  po.pin = tiering::PinMode::kNone;  // state never goes to the GPU
  ZTIER_ASSIGN_OR_RETURN(pool_, tiering::PinnedPool::Create(po));
  workers_ = std::make_unique<optim::WorkerPool>(options_.threads);
  return Status::Ok();
}

Status OptimizerSwapper::LayoutGrads() {
  std::vector<GradSegment> gs;
  gs.reserve(segments_.size());
  for (const auto& s : segments_) gs.push_back({s.numel, s.dtype});
  ZTIER_ASSIGN_OR_RETURN(grad_store_, GradStore::Create(options_.grad_store, gs, engine_,
                                                        options_.grad_staging_bytes));
  // Extents are laid end to end in segment order: a sub-group's gradients
  // are the one range from its first piece's to its last piece's.
  const uint64_t a = grad_store_->alignment();
  for (auto& g : groups_) {
    const Piece& first = g.pieces.front();
    const Piece& last = g.pieces.back();
    const uint64_t lo = grad_store_->ByteOffset(first.segment, first.seg_offset) / a * a;
    const uint64_t hi = grad_store_->ByteOffset(last.segment, last.seg_offset + last.count);
    g.grad_begin = lo;
    g.grad_bytes = (hi - lo + a - 1) / a * a;
  }
  return Status::Ok();
}

std::string OptimizerSwapper::Where(uint32_t g, uint8_t slot) const {
  return store_->Locate(groups_[g].slot_offset[slot]);
}

void OptimizerSwapper::Stamp(uint32_t g, uint64_t step, uint8_t* buf) {
  const Group& grp = groups_[g];
  const uint64_t payload = grp.numel * kStateBytesPerElement;
  const uint64_t chunk = ChunkBytes(grp.numel);
  const uint64_t chunks = (payload + chunk - 1) / chunk;
  memset(buf, 0, kHeaderBytes);
  // The padding after the payload is written too: keep it deterministic.
  memset(buf + kHeaderBytes + payload, 0, SlotBytes(grp.numel) - kHeaderBytes - payload);
  SlotHeader h{};
  memcpy(h.magic, kSlotMagic, sizeof(kSlotMagic));
  h.version = 1;
  h.header_bytes = kHeaderBytes;
  h.run_id = store_->run_id();
  h.sub_group = g;
  h.chunk_count = static_cast<uint32_t>(chunks);
  h.step = step;
  h.numel = grp.numel;
  h.chunk_bytes = chunk;
  uint32_t* crcs = ChunkCrcs(buf);
  const uint8_t* data = buf + kHeaderBytes;
  workers_->ParallelFor(chunks, 1, [&](uint64_t b, uint64_t e) {
    for (uint64_t k = b; k < e; ++k) {
      const uint64_t off = k * chunk;
      crcs[k] = Crc32c(data + off, std::min(chunk, payload - off));
    }
  });
  memcpy(buf, &h, sizeof(h));
  h.header_crc = HeaderCrc(buf);
  memcpy(buf, &h, sizeof(h));
}

Status OptimizerSwapper::Check(uint32_t g, uint8_t slot, uint64_t step, const uint8_t* buf) {
  const Group& grp = groups_[g];
  SlotHeader h;
  memcpy(&h, buf, sizeof(h));
  auto corrupt = [&](const std::string& what) {
    return Status::Corruption(fmt::format(
        "optimizer state of sub-group {} (elements [{}, {}), expected step {}) at {}: {}; "
        "the slot is torn, stale or was altered, and its data is not used",
        g, grp.first, grp.first + grp.numel, step, Where(g, slot), what));
  };
  if (memcmp(h.magic, kSlotMagic, sizeof(kSlotMagic)) != 0 || h.version != 1 ||
      h.header_bytes != kHeaderBytes) {
    return corrupt("no valid slot header (magic/version)");
  }
  if (HeaderCrc(buf) != h.header_crc) return corrupt("the header fails its CRC32C");
  if (h.run_id != store_->run_id()) {
    return corrupt(fmt::format("the header is from another run (run id {:016x}, this store {:016x})",
                               h.run_id, store_->run_id()));
  }
  if (h.sub_group != g || h.numel != grp.numel || h.chunk_bytes != ChunkBytes(grp.numel)) {
    return corrupt(fmt::format("the header describes sub-group {} of {} elements", h.sub_group,
                               h.numel));
  }
  if (h.step != step) return corrupt(fmt::format("the header holds step {}", h.step));
  const uint64_t payload = grp.numel * kStateBytesPerElement;
  const uint64_t chunk = h.chunk_bytes;
  const uint64_t chunks = (payload + chunk - 1) / chunk;
  if (h.chunk_count != chunks) return corrupt("the header's chunk count is wrong");
  const uint32_t* crcs = ChunkCrcs(buf);
  const uint8_t* data = buf + kHeaderBytes;
  std::atomic<uint64_t> bad{chunks};
  workers_->ParallelFor(chunks, 1, [&](uint64_t b, uint64_t e) {
    for (uint64_t k = b; k < e; ++k) {
      const uint64_t off = k * chunk;
      if (Crc32c(data + off, std::min(chunk, payload - off)) != crcs[k]) {
        uint64_t cur = bad.load();
        while (k < cur && !bad.compare_exchange_weak(cur, k)) {
        }
      }
    }
  });
  if (bad.load() < chunks) {
    const uint64_t k = bad.load();
    return corrupt(fmt::format("payload chunk {} (bytes [{}, {}) after the header) fails its CRC32C",
                               k, k * chunk, std::min(payload, (k + 1) * chunk)));
  }
  return Status::Ok();
}

std::string OptimizerSwapper::TransferWhat(io::Op op, uint32_t g, uint8_t slot) const {
  return fmt::format("{} optimizer state of sub-group {} at {}",
                     op == io::Op::kRead ? "read" : "write", g, Where(g, slot));
}

Status OptimizerSwapper::SlotSync(io::Op op, uint32_t g, uint8_t slot, uint8_t* buf) {
  Status s = engine_->Run(
      {op, &store_->file(), groups_[g].slot_offset[slot], SlotBytes(groups_[g].numel), buf, nullptr});
  return s.ok() ? s : s.WithContext(TransferWhat(op, g, slot));
}

namespace {

// A buffer from `pool` for synchronous set-up work (nothing else holds any
// then); waits for one to be given back otherwise.
Result<tiering::BufferSpan> AcquireOne(tiering::PinnedPool& pool) {
  for (;;) {
    ZTIER_ASSIGN_OR_RETURN(auto span,
                           pool.AcquireUntil(1, Clock::now() + std::chrono::seconds(1)));
    if (span) return *span;
  }
}

}  // namespace

Status OptimizerSwapper::Initialize(const ParamSource& params) {
  if (initialized_) return Status::FailedPrecondition("the optimizer state is already initialised");
  ZTIER_ASSIGN_OR_RETURN(tiering::BufferSpan span, AcquireOne(*pool_));
  Status status;
  // The current segment's parameter partition (segments are visited in
  // order; one straddling two sub-groups stays loaded between them).
  uint32_t loaded = UINT32_MAX;
  std::unique_ptr<uint8_t[]> part;
  for (uint32_t g = 0; g < groups_.size() && status.ok(); ++g) {
    const Group& grp = groups_[g];
    float* master = reinterpret_cast<float*>(span.data + kHeaderBytes);
    memset(master + grp.numel, 0, 2 * grp.numel * sizeof(float));  // both moments
    for (const Piece& p : grp.pieces) {
      const OptimizerSegment& seg = segments_[p.segment];
      const uint32_t eb = optim::DTypeBytes(seg.dtype);
      if (loaded != p.segment) {
        part.reset(new (std::nothrow) uint8_t[seg.numel * eb]);
        if (part == nullptr) {
          status = Status::ResourceExhausted(fmt::format(
              "out of host memory reading parameter {} for the initial optimizer state", seg.id));
          break;
        }
        status = params(seg.id, part.get());
        if (!status.ok()) {
          status = status.WithContext(
              fmt::format("read parameter {} for the initial optimizer state", seg.id));
          break;
        }
        loaded = p.segment;
      }
      const uint8_t* src = part.get() + p.seg_offset * eb;
      for (uint64_t i = 0; i < p.count; ++i) {
        master[p.group_offset + i] = optim::ElementToFloat(src, i, seg.dtype);
      }
    }
    if (!status.ok()) break;
    Stamp(g, 0, span.data);
    status = SlotSync(io::Op::kWrite, g, 0, span.data);
    groups_[g].committed = 0;
  }
  Status released = pool_->Release(span);
  ZTIER_RETURN_IF_ERROR(status);
  ZTIER_RETURN_IF_ERROR(released);
  initialized_ = true;
  step_.store(0, std::memory_order_release);
  return Status::Ok();
}

Status OptimizerSwapper::ReadState(uint64_t id, StateArray array, float* out) {
  if (!initialized_) {
    return Status::FailedPrecondition("the optimizer state is not initialised yet");
  }
  if (pending_) {
    return Status::FailedPrecondition(
        "an optimizer step is waiting for its commit: read the state after it");
  }
  uint32_t seg = UINT32_MAX;
  for (uint32_t k = 0; k < segments_.size(); ++k) {
    if (segments_[k].id == id) seg = k;
  }
  if (seg == UINT32_MAX) {
    return Status::NotFound(fmt::format("parameter {} has no optimizer state", id));
  }
  ZTIER_ASSIGN_OR_RETURN(tiering::BufferSpan span, AcquireOne(*pool_));
  Status status;
  const uint64_t step = this->step();
  for (uint32_t g = 0; g < groups_.size() && status.ok(); ++g) {
    const Group& grp = groups_[g];
    for (const Piece& p : grp.pieces) {
      if (p.segment != seg) continue;
      status = SlotSync(io::Op::kRead, g, grp.committed, span.data);
      if (status.ok()) status = Check(g, grp.committed, step, span.data);
      if (!status.ok()) break;
      const float* base = reinterpret_cast<const float*>(span.data + kHeaderBytes) +
                          static_cast<uint64_t>(array) * grp.numel;
      memcpy(out + p.seg_offset, base + p.group_offset, p.count * sizeof(float));
    }
  }
  Status released = pool_->Release(span);
  ZTIER_RETURN_IF_ERROR(status);
  return released;
}

// One asynchronous slot transfer of the checkpoint paths, waited for later.
struct OptimizerSwapper::AsyncSlot {
  std::mutex mu;
  std::condition_variable cv;
  bool busy = false;
  Status status;

  void Start() {
    std::lock_guard<std::mutex> lock(mu);
    busy = true;
    status = Status::Ok();
  }
  void Done(const Status& s) {
    std::lock_guard<std::mutex> lock(mu);
    busy = false;
    status = s;
    cv.notify_all();
  }
  Status Wait() {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return !busy; });
    return status;
  }
};

Status OptimizerSwapper::SlotAsync(io::Op op, uint32_t g, uint8_t slot, uint8_t* buf,
                                   AsyncSlot* t) {
  t->Start();
  Status s = engine_->Submit({op, &store_->file(), groups_[g].slot_offset[slot],
                              SlotBytes(groups_[g].numel), buf, [this, t, op, g, slot](const Status& st) {
                                t->Done(st.ok() ? st : st.WithContext(TransferWhat(op, g, slot)));
                              }});
  if (!s.ok()) t->Done(s);
  return s;
}

Result<std::vector<tiering::BufferSpan>> OptimizerSwapper::AcquireTwo() {
  std::vector<tiering::BufferSpan> spans;
  const uint32_t n = std::min<uint32_t>(2, std::max<uint32_t>(1, pool_->buffer_count()));
  for (uint32_t k = 0; k < n; ++k) {
    Result<tiering::BufferSpan> span = AcquireOne(*pool_);
    if (!span.ok()) {
      for (auto& sp : spans) (void)pool_->Release(sp);
      return span.status();
    }
    spans.push_back(*span);
  }
  return spans;
}

Status OptimizerSwapper::ExportState(
    const std::function<Status(const StateRun<const float>&)>& fn) {
  if (!initialized_) {
    return Status::FailedPrecondition("the optimizer state is not initialised yet");
  }
  if (pending_) {
    return Status::FailedPrecondition(
        "an optimizer step is waiting for its commit: save the state after it");
  }
  ZTIER_ASSIGN_OR_RETURN(std::vector<tiering::BufferSpan> spans, AcquireTwo());
  const size_t nb = spans.size();
  std::vector<AsyncSlot> reads(nb);
  Status status;
  const uint64_t step = this->step();
  // The read of sub-group g + 1 runs while g is handed out.
  if (!groups_.empty()) status = SlotAsync(io::Op::kRead, 0, groups_[0].committed, spans[0].data, &reads[0]);
  for (uint32_t g = 0; g < groups_.size() && status.ok(); ++g) {
    const Group& grp = groups_[g];
    uint8_t* buf = spans[g % nb].data;
    status = reads[g % nb].Wait();
    if (status.ok() && nb > 1 && g + 1 < groups_.size()) {
      status = SlotAsync(io::Op::kRead, g + 1, groups_[g + 1].committed, spans[(g + 1) % nb].data,
                         &reads[(g + 1) % nb]);
    }
    if (status.ok()) status = Check(g, grp.committed, step, buf);
    const float* base = reinterpret_cast<const float*>(buf + kHeaderBytes);
    for (const Piece& p : grp.pieces) {
      if (!status.ok()) break;
      StateRun<const float> run{p.segment, p.seg_offset, p.count, base + p.group_offset,
                                base + grp.numel + p.group_offset,
                                base + 2 * grp.numel + p.group_offset};
      status = fn(run);
    }
    if (status.ok() && nb == 1 && g + 1 < groups_.size()) {
      status = SlotAsync(io::Op::kRead, g + 1, groups_[g + 1].committed, buf, &reads[0]);
    }
  }
  for (auto& r : reads) (void)r.Wait();  // nothing in flight past here
  Status released;
  for (auto& sp : spans) {
    Status r = pool_->Release(sp);
    if (released.ok()) released = r;
  }
  ZTIER_RETURN_IF_ERROR(status);
  return released;
}

Status OptimizerSwapper::ImportState(uint64_t step, std::span<const uint64_t> updates,
                                     const std::function<Status(const StateRun<float>&)>& fill) {
  if (!initialized_) {
    return Status::FailedPrecondition("the optimizer state is not initialised yet");
  }
  if (pending_) {
    return Status::FailedPrecondition(
        "an optimizer step is waiting for its commit: load the state after it");
  }
  if (updates.size() != segments_.size()) {
    return Status::InvalidArgument(fmt::format("{} update counts for {} segments",
                                               updates.size(), segments_.size()));
  }
  ZTIER_ASSIGN_OR_RETURN(std::vector<tiering::BufferSpan> spans, AcquireTwo());
  const size_t nb = spans.size();
  std::vector<AsyncSlot> writes(nb);
  Status status;
  // Sub-group g is filled while g - 1 is written.
  for (uint32_t g = 0; g < groups_.size() && status.ok(); ++g) {
    const Group& grp = groups_[g];
    status = writes[g % nb].Wait();  // its buffer's previous write
    if (!status.ok()) break;
    uint8_t* buf = spans[g % nb].data;
    float* base = reinterpret_cast<float*>(buf + kHeaderBytes);
    memset(base, 0, grp.numel * kStateBytesPerElement);
    for (const Piece& p : grp.pieces) {
      if (!status.ok()) break;
      StateRun<float> run{p.segment, p.seg_offset, p.count, base + p.group_offset,
                          base + grp.numel + p.group_offset,
                          base + 2 * grp.numel + p.group_offset};
      status = fill(run);
    }
    if (!status.ok()) break;
    Stamp(g, step, buf);
    status = SlotAsync(io::Op::kWrite, g, grp.committed ^ 1, buf, &writes[g % nb]);
  }
  for (auto& w : writes) {
    Status s = w.Wait();
    if (status.ok()) status = s;
  }
  Status released;
  for (auto& sp : spans) {
    Status r = pool_->Release(sp);
    if (released.ok()) released = r;
  }
  ZTIER_RETURN_IF_ERROR(status);
  ZTIER_RETURN_IF_ERROR(released);
  // Every slot is written: commit them all at once, as a step does.
  for (auto& g : groups_) g.committed ^= 1;
  updates_.assign(updates.begin(), updates.end());
  step_.store(step, std::memory_order_release);
  return Status::Ok();
}

OptimizerStepStats OptimizerSwapper::last_step_stats() const {
  std::lock_guard<std::mutex> lock(stats_mu_);
  return last_stats_;
}

// ---------------------------------------------------------------- the step

Status OptimizerSwapper::Step(std::span<const optim::AdamHyper> hypers,
                              const GradSource& grads, const ParamSink& sink,
                              const StepPlan& plan) {
  if (!initialized_) {
    return Status::FailedPrecondition(
        "the optimizer state is not initialised (call Initialize before the first step)");
  }
  if (pending_) {
    return Status::FailedPrecondition(
        "an optimizer step is waiting for its commit (Commit or Discard it first)");
  }
  if (hypers.size() != group_count_) {
    return Status::InvalidArgument(fmt::format(
        "optimizer step: {} sets of hyperparameters for {} parameter groups", hypers.size(),
        group_count_));
  }
  for (size_t g = 0; g < hypers.size(); ++g) {
    Status valid = optim::ValidateHyper(hypers[g]);
    if (!valid.ok()) {
      return group_count_ == 1 ? valid
                               : valid.WithContext(fmt::format("parameter group {}", g));
    }
  }
  if (grad_store_ != nullptr) {
    Status flushed = grad_store_->Flush();
    if (!flushed.ok()) {
      return flushed.WithContext(fmt::format(
          "optimizer step {}: a gradient partition did not reach NVMe, so the step was not run "
          "(the state of step {} is intact; drop the gradients and run the step again)",
          step() + 1, step()));
    }
  }
  const auto t0 = Clock::now();
  StepRun run;
  run.step = step() + 1;
  run.constants.resize(segments_.size());
  run.sink = &sink;
  run.grad_source = &grads;
  run.hypers = hypers;
  run.grads.resize(segments_.size());
  run.resolved.assign(segments_.size(), 0);
  run.remaining.resize(segments_.size());
  run.outs.resize(segments_.size());
  run.order.resize(groups_.size());
  for (uint32_t g = 0; g < groups_.size(); ++g) {
    run.order[g] = plan.reverse ? static_cast<uint32_t>(groups_.size()) - 1 - g : g;
  }
  // Gradients are asked for lazily (ResolveGrads): the bound below counts
  // every segment.
  uint64_t largest = 0;
  for (const auto& seg : segments_) {
    largest = std::max(largest, seg.numel * optim::DTypeBytes(seg.dtype));
  }
  // Parameter partitions waiting for the sink, in bytes, at most: two
  // sub-groups' worth (so the sink's writes overlap the next updates, even
  // when the drive's queue is deep with state transfers) and at least the
  // largest partition.
  run.param_limit_bytes =
      std::max<uint64_t>(largest, 2 * options_.sub_group_size * 4) + kParamBatchBytes;
  run.spans.resize(groups_.size());
  run.read_done.assign(groups_.size(), 0);
  run.grad_reads_left.assign(groups_.size(), 0);
  run.read_status.resize(groups_.size());
  run.stats.step = run.step;
  run.stats.sub_groups = static_cast<uint32_t>(groups_.size());

  run.param_thread = std::thread([this, &run] {
    std::unique_lock<std::mutex> lock(run.mu);
    std::vector<std::pair<uint32_t, std::unique_ptr<uint8_t[]>>> batch;
    std::vector<uint64_t> ids;
    std::vector<const void*> data;
    for (;;) {
      // Batches of at least kParamBatchBytes: the sink writes packed
      // partitions whole instead of one member at a time. The limit above
      // leaves room for a batch, so the two threads never wait on each other.
      run.cv.wait(lock, [&] {
        return run.param_stop || run.param_pending_bytes >= kParamBatchBytes;
      });
      if (run.param_queue.empty()) break;
      // Everything finished so far goes to the sink in one call.
      batch.clear();
      while (!run.param_queue.empty()) {
        batch.push_back(std::move(run.param_queue.front()));
        run.param_queue.pop_front();
      }
      uint64_t bytes = 0;
      ids.clear();
      data.clear();
      for (const auto& item : batch) {
        const OptimizerSegment& seg = segments_[item.first];
        bytes += seg.numel * optim::DTypeBytes(seg.dtype);
        ids.push_back(seg.id);
        data.push_back(item.second.get());
      }
      if (!run.param_discard && run.param_error.ok()) {
        lock.unlock();
        Status s = (*run.sink)(ids, data);
        lock.lock();
        if (!s.ok() && run.param_error.ok()) {
          run.param_error = s.WithContext(fmt::format(
              "write updated parameter{} {}{}", ids.size() > 1 ? "s" : "",
              fmt::join(ids.begin(), ids.begin() + std::min<size_t>(ids.size(), 8), ", "),
              ids.size() > 8 ? ", ..." : ""));
        } else if (s.ok()) {
          run.stats.param_bytes += bytes;
        }
      }
      lock.unlock();
      batch.clear();  // frees the partitions outside the lock
      lock.lock();
      run.param_pending_bytes -= bytes;
      run.cv.notify_all();
    }
  });

  Status status;
  try {
    status = RunStep(run);
  } catch (const std::bad_alloc&) {
    // A parameter partition's output buffer: fail the step, drain, commit nothing.
    status = Status::ResourceExhausted("out of host memory for the updated parameters");
  }
  const auto td = Clock::now();
  if (!status.ok()) {
    std::lock_guard<std::mutex> lock(run.mu);
    run.param_discard = true;
  }
  Drain(run);
  run.stats.drain_s = Since(td);
  if (status.ok()) status = run.write_error;
  if (status.ok()) status = run.param_error;
  if (status.ok()) {
    Pending done;
    done.step = run.step;
    done.updated.resize(segments_.size());
    for (size_t k = 0; k < segments_.size(); ++k) done.updated[k] = run.grads[k] != nullptr;
    pending_ = std::move(done);
    if (!plan.defer_commit) status = Commit();
  } else if (status.code() == StatusCode::kCorruption) {
    // The committed state itself failed its check: nothing here can repair it.
    status = status.WithContext(fmt::format(
        "optimizer step {} failed and was not applied: the stored state of step {} is "
        "damaged (restore it from a checkpoint)",
        run.step, run.step - 1));
  } else {
    status = status.WithContext(fmt::format(
        "optimizer step {} failed and was not applied (the state of step {} is intact; fix "
        "the cause and run the same step again: the gradients are kept)",
        run.step, run.step - 1));
  }
  run.stats.seconds = Since(t0);
  {
    std::lock_guard<std::mutex> lock(stats_mu_);
    last_stats_ = run.stats;
  }
  return status;
}

Status OptimizerSwapper::Commit() {
  if (!pending_) return Status::FailedPrecondition("no optimizer step waits for its commit");
  for (auto& g : groups_) g.committed ^= 1;
  for (size_t k = 0; k < segments_.size(); ++k) updates_[k] += pending_->updated[k];
  step_.store(pending_->step, std::memory_order_release);
  pending_.reset();
  return Status::Ok();
}

Status OptimizerSwapper::Discard() {
  if (!pending_) return Status::FailedPrecondition("no optimizer step waits for its commit");
  pending_.reset();  // its slots are the uncommitted ones: the next step overwrites them
  return Status::Ok();
}

Status OptimizerSwapper::ResolveGrads(StepRun& run, uint32_t g) {
  for (const Piece& p : groups_[g].pieces) {
    const uint32_t k = p.segment;
    if (run.resolved[k]) continue;
    const auto tw = Clock::now();
    Result<const void*> grad = (*run.grad_source)(segments_[k].id);
    run.stats.grad_wait_s += Since(tw);
    if (!grad.ok()) {
      return grad.status().WithContext(fmt::format("gradient of parameter {}", segments_[k].id));
    }
    run.resolved[k] = 1;
    run.grads[k] = *grad;
    run.remaining[k] = *grad != nullptr ? segments_[k].numel : 0;
    if (*grad != nullptr) {
      run.constants[k] = optim::MakeConstants(run.hypers[segments_[k].group], updates_[k] + 1);
      run.stats.elements += segments_[k].numel;
    }
  }
  return Status::Ok();
}

Status OptimizerSwapper::RunStep(StepRun& run) {
  for (size_t pos = 0; pos < run.order.size(); ++pos) {
    const uint32_t g = run.order[pos];
    ZTIER_RETURN_IF_ERROR(IssueReads(run, pos, /*must=*/true));
    ZTIER_RETURN_IF_ERROR(ResolveGrads(run, g));
    ZTIER_RETURN_IF_ERROR(WaitRead(run, g));
    auto tv = Clock::now();
    uint8_t* buf = run.spans[g].data;
    ZTIER_RETURN_IF_ERROR(Check(g, groups_[g].committed, run.step - 1, buf));
    run.stats.verify_s += Since(tv);
    Update(run, g, buf);
    auto tc = Clock::now();
    Stamp(g, run.step, buf);
    run.stats.checksum_s += Since(tc);
    ZTIER_RETURN_IF_ERROR(StartWrite(run, g));
    {
      std::lock_guard<std::mutex> lock(run.mu);
      // Fail fast: a write or the sink has failed; no later work can commit.
      if (!run.write_error.ok()) return run.write_error;
      if (!run.param_error.ok()) return run.param_error;
    }
    ZTIER_RETURN_IF_ERROR(IssueReads(run, pos + 1, /*must=*/false));
  }
  return Status::Ok();
}

Status OptimizerSwapper::StartRead(StepRun& run, uint32_t g, const tiering::BufferSpan& span) {
  run.spans[g] = span;
  {
    std::lock_guard<std::mutex> lock(run.mu);
    ++run.in_flight;
    ++run.buffers_held;
    run.stats.peak_buffers = std::max(run.stats.peak_buffers, run.buffers_held);
  }
  const uint8_t slot = groups_[g].committed;
  const uint64_t bytes = SlotBytes(groups_[g].numel);
  Status s = engine_->Submit({io::Op::kRead, &store_->file(), groups_[g].slot_offset[slot], bytes,
                              span.data, [this, &run, g, slot, bytes](const Status& st) {
                                std::lock_guard<std::mutex> lock(run.mu);
                                run.read_done[g] = 1;
                                if (st.ok()) {
                                  run.stats.bytes_read += bytes;
                                } else {
                                  run.read_status[g] =
                                      st.WithContext(TransferWhat(io::Op::kRead, g, slot));
                                }
                                --run.in_flight;
                                run.cv.notify_all();
                              }});
  if (!s.ok()) {
    std::lock_guard<std::mutex> lock(run.mu);
    --run.in_flight;
    run.read_done[g] = 1;
    run.read_status[g] = s;
    return s;
  }
  if (grad_store_ != nullptr) return StartGradRead(run, g, span.data + slot_bytes_);
  return s;
}

Status OptimizerSwapper::StartGradRead(StepRun& run, uint32_t g, uint8_t* region) {
  const Group& grp = groups_[g];
  {
    std::lock_guard<std::mutex> lock(run.mu);
    ++run.in_flight;
    ++run.grad_reads_left[g];
  }
  auto done = [this, &run, g](const Status& st) {
    std::lock_guard<std::mutex> lock(run.mu);
    if (st.ok()) {
      run.stats.bytes_read += groups_[g].grad_bytes;
    } else if (run.read_status[g].ok()) {
      run.read_status[g] = st.WithContext(fmt::format(
          "read the gradients of sub-group {} at {}", g,
          grad_store_->store().Locate(groups_[g].grad_begin)));
    }
    --run.grad_reads_left[g];
    --run.in_flight;
    run.cv.notify_all();
  };
  Status s = engine_->Submit(
      {io::Op::kRead, &grad_store_->file(), grp.grad_begin, grp.grad_bytes, region, done});
  if (!s.ok()) done(s);
  return s;
}

Status OptimizerSwapper::IssueReads(StepRun& run, size_t pos, bool must) {
  while (run.next_read < run.order.size()) {
    ZTIER_ASSIGN_OR_RETURN(auto span, pool_->TryAcquire(1));
    if (!span) {
      if (!must || run.next_read > pos) break;
      // Sub-group g itself has no buffer yet: every buffer is held by a
      // write in flight, which gives it back when it completes.
      auto tw = Clock::now();
      while (!span) {
        {
          std::lock_guard<std::mutex> lock(run.mu);
          if (!run.write_error.ok()) return run.write_error;
        }
        ZTIER_ASSIGN_OR_RETURN(span, pool_->AcquireUntil(
                                         1, Clock::now() + std::chrono::milliseconds(200)));
      }
      run.stats.buffer_wait_s += Since(tw);
    }
    ZTIER_RETURN_IF_ERROR(StartRead(run, run.order[run.next_read], *span));
    ++run.next_read;
  }
  return Status::Ok();
}

Status OptimizerSwapper::WaitRead(StepRun& run, uint32_t g) {
  auto tw = Clock::now();
  std::unique_lock<std::mutex> lock(run.mu);
  run.cv.wait(lock, [&] { return run.read_done[g] != 0 && run.grad_reads_left[g] == 0; });
  run.stats.read_wait_s += Since(tw);
  return run.read_status[g];
}

void OptimizerSwapper::Update(StepRun& run, uint32_t g, uint8_t* buf) {
  const Group& grp = groups_[g];
  // Parameter partitions first met here get their output buffer now.
  for (const Piece& p : grp.pieces) {
    const OptimizerSegment& seg = segments_[p.segment];
    if (run.grads[p.segment] != nullptr && run.outs[p.segment] == nullptr) {
      run.outs[p.segment].reset(new uint8_t[seg.numel * optim::DTypeBytes(seg.dtype)]);
    }
  }
  float* master = reinterpret_cast<float*>(buf + kHeaderBytes);
  float* exp_avg = master + grp.numel;
  float* exp_avg_sq = exp_avg + grp.numel;
  const auto tu = Clock::now();
  workers_->ParallelFor(grp.numel, 64, [&](uint64_t b, uint64_t e) {
    // The first piece that ends after b (pieces are in order).
    auto it = std::upper_bound(grp.pieces.begin(), grp.pieces.end(), b,
                               [](uint64_t v, const Piece& p) { return v < p.group_offset + p.count; });
    for (; it != grp.pieces.end() && it->group_offset < e; ++it) {
      const void* grad = run.grads[it->segment];
      if (grad == nullptr) continue;
      const uint64_t lo = std::max(b, it->group_offset);
      const uint64_t hi = std::min(e, it->group_offset + it->count);
      const OptimizerSegment& seg = segments_[it->segment];
      const uint32_t eb = optim::DTypeBytes(seg.dtype);
      const uint64_t at = it->seg_offset + (lo - it->group_offset);  // element in the segment
      optim::AdamSpan s;
      s.master = master + lo;
      s.exp_avg = exp_avg + lo;
      s.exp_avg_sq = exp_avg_sq + lo;
      s.grad = grad_store_ != nullptr
                   ? buf + slot_bytes_ +
                         (grad_store_->ByteOffset(it->segment, at) - grp.grad_begin)
                   : static_cast<const uint8_t*>(grad) + at * eb;
      s.grad_type = seg.dtype;
      s.param_out = run.outs[it->segment].get() + at * eb;
      s.out_type = seg.dtype;
      s.n = hi - lo;
      optim::AdamUpdate(run.constants[it->segment], s, options_.isa);
    }
  });
  run.stats.update_s += Since(tu);
  // Hand finished parameter partitions to the parameter thread, waiting
  // while too many bytes are queued.
  for (const Piece& p : grp.pieces) {
    if (run.grads[p.segment] == nullptr) continue;
    run.remaining[p.segment] -= p.count;
    if (run.remaining[p.segment] != 0) continue;
    const OptimizerSegment& seg = segments_[p.segment];
    const uint64_t bytes = seg.numel * optim::DTypeBytes(seg.dtype);
    const auto tw = Clock::now();
    std::unique_lock<std::mutex> lock(run.mu);
    run.cv.wait(lock, [&] {
      return run.param_pending_bytes == 0 ||
             run.param_pending_bytes + bytes <= run.param_limit_bytes;
    });
    run.stats.param_wait_s += Since(tw);
    run.param_pending_bytes += bytes;
    run.param_queue.emplace_back(p.segment, std::move(run.outs[p.segment]));
    run.cv.notify_all();
  }
}

Status OptimizerSwapper::StartWrite(StepRun& run, uint32_t g) {
  const uint8_t slot = groups_[g].committed ^ 1;
  const uint64_t bytes = SlotBytes(groups_[g].numel);
  const tiering::BufferSpan span = run.spans[g];
  {
    std::lock_guard<std::mutex> lock(run.mu);
    ++run.in_flight;
  }
  // The buffer goes back to the pool the moment the write completes.
  auto done = [this, &run, g, slot, bytes, span](const Status& st) {
    std::lock_guard<std::mutex> lock(run.mu);
    // Counted free before the pool hands the buffer out again.
    --run.buffers_held;
    Status released = pool_->Release(span);
    run.spans[g] = {};
    if (st.ok()) {
      run.stats.bytes_written += bytes;
    } else if (run.write_error.ok()) {
      run.write_error = st.WithContext(TransferWhat(io::Op::kWrite, g, slot));
    }
    if (!released.ok() && run.write_error.ok()) run.write_error = released;
    --run.in_flight;
    run.cv.notify_all();
  };
  Status s = engine_->Submit({io::Op::kWrite, &store_->file(), groups_[g].slot_offset[slot], bytes,
                              span.data, done});
  if (!s.ok()) {
    // Never submitted: give the buffer back here.
    done(s);
  }
  return s;
}

void OptimizerSwapper::Drain(StepRun& run) {
  std::unique_lock<std::mutex> lock(run.mu);
  run.cv.wait(lock, [&] { return run.in_flight == 0; });
  // Reads that completed but were never consumed (a failed step) still hold
  // their buffers.
  for (auto& span : run.spans) {
    if (span.count == 0) continue;
    (void)pool_->Release(span);
    span = {};
    --run.buffers_held;
  }
  run.param_stop = true;
  run.cv.notify_all();
  lock.unlock();
  run.param_thread.join();
}

}  // namespace ztier::swapper
