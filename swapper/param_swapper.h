// ParamSwapper: moves this rank's parameter partitions between the NVMe store
// and the pinned swap-buffer pool, with the partition states of docs/design.md:
//
//   ON_NVME --SwapIn--> READING --read done--> IN_HOST (holds swap buffers)
//   IN_HOST --ReleaseBuffer--> ON_NVME
//   IN_HOST --SwapOut--> WRITING --write done--> ON_NVME (buffers returned)
//
// Layout: partitions are laid out in the order they are added. A partition
// larger than one buffer takes several adjacent buffers; partitions of at
// most `pack_threshold_bytes` are packed, in order, into shared extents of at
// most `pack_threshold_bytes`, read and written as a unit (one read for many
// small partitions instead of one each). Packing and states are per extent;
// the per-partition API hides it. Repack() lays the packed partitions out
// again in the order they are used (groups from the trace), into packs of up
// to one buffer, so that one read brings in partitions used together; large
// partitions never move. Seal() reserves
// two repack regions for it (docs/swap_format.md): each repack writes the new
// packs into the region not in force and switches only when every write has
// completed, so a failed repack leaves the old layout readable.
//
// SwapIn never waits for buffers: it starts reads in the order given while
// free buffers last and returns how many partitions it covered; the caller
// retries the rest later. A partition that could never fit in the pool is
// rejected by Seal(), naming buffer_count, buffer_size and the size needed.
// Every read is checked against the partition's CRC32C when checksums are on;
// a mismatch or a truncated file is an error naming the partition, file and
// offset, and the data is never returned.
//
// Ownership: the swapper owns its NvmeStore; the pool and the engine are
// borrowed and must outlive it. Thread-safety: all methods may be called from
// any thread; the read callback runs on the engine's I/O thread (keep it short).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "base/status.h"
#include "io/async_engine.h"
#include "swapper/nvme_store.h"
#include "tiering/pinned_pool.h"

namespace ztier::swapper {

enum class PartitionState : uint8_t { kOnNvme, kReading, kInHost, kWriting };
std::string_view PartitionStateName(PartitionState s);

struct SwapperOptions {
  StoreOptions store;
  // Partitions of at most this many bytes share packed extents. 0: no packing.
  uint64_t pack_threshold_bytes = 1u << 20;
  bool checksum = true;  // CRC32C per partition, checked on every read
};

struct SwapperStats {
  uint64_t bytes_read = 0, bytes_written = 0;  // device bytes (aligned extents)
  uint64_t reads = 0, writes = 0;              // extent transfers completed
  uint64_t checksum_failures = 0;
  uint64_t packed_partitions = 0, extents = 0;
  // Repack(): layouts changed, and the device bytes their writes took (also
  // counted in bytes_written/writes; their reads in bytes_read/reads).
  uint64_t repacks = 0, bytes_repacked = 0;
};

// One group of Repack(): partitions used together.
struct PackGroup {
  std::vector<uint64_t> ids;  // partitions used together, in use order
  // Its small partitions share no pack with other groups' (e.g. one MoE
  // expert, fetched only when routed to).
  bool alone = false;
};

class ParamSwapper {
 public:
  using ReadCallback = std::function<void(uint64_t id, const Status& status)>;

  static Result<std::unique_ptr<ParamSwapper>> Create(const SwapperOptions& options,
                                                      tiering::PinnedPool* pool,
                                                      io::AsyncEngine* engine);
  // Waits for transfers in flight, then returns every buffer it holds.
  ~ParamSwapper();

  // Set-up: add every partition (id unique, bytes > 0), then Seal() once to
  // lay them out and create the store.
  Status Add(uint64_t id, uint64_t bytes);
  Status Seal();

  // Writes `bytes(id)` bytes from `src` (any memory) to the partition's NVMe
  // copy, staging through pool buffers; waits for free buffers and for the
  // write. The partition must be ON_NVME.
  Status Write(uint64_t id, const void* src);
  // Write() for many partitions at once (Write is the one-partition case) (`srcs[i]` for `ids[i]`): each
  // extent is written once, with the batch's members in it (read first only
  // when members outside the batch hold data), and several extents are in
  // flight at a time. Ids in layout order make the fewest transfers. Returns
  // when every write has completed; the first error (the partitions of a
  // failed extent are not on NVMe until written again).
  Status WriteMany(std::span<const uint64_t> ids, std::span<const void* const> srcs);

  // Copies partition `id` (ON_NVME) into `dst` (`bytes(id)` bytes, any
  // memory) through a pool buffer of its own, checked against its CRC32C;
  // the partition stays ON_NVME and is never held (for partition access
  // beside the swap-in path). Waits for free buffers and the read.
  Status Read(uint64_t id, void* dst);
  // Starts reads for `ids` in order while buffers last; returns how many of
  // them (a prefix) are now READING or IN_HOST. Errors: unknown id, a
  // partition never written in this run, a pending write error.
  // `observed`, when given (as many entries as `ids`), receives for each
  // covered id the state it had when SwapIn took hold of it: READING means
  // the read callback will report it, exactly once; IN_HOST means its pack
  // was already in a buffer and no callback will come for it. Callers that
  // track reads through the callback must use this, not a later state(): a
  // read may complete between SwapIn and state(), and its callback, which
  // runs later on the I/O thread, would then arrive for a read they never
  // saw in flight.
  Result<size_t> SwapIn(std::span<const uint64_t> ids,
                        std::span<PartitionState> observed = {});
  // Waits until `id` is IN_HOST (OK) or its read failed (the error, once).
  Status Wait(uint64_t id);
  // Waits until no read or write is in flight; returns the first error seen
  // since the last call.
  Status WaitAll();

  // Host memory of an IN_HOST partition (`bytes(id)` bytes, writable).
  // Checks the partition's CRC32C first (once per swap-in), like Wait().
  Result<uint8_t*> Data(uint64_t id);
  // Checks an IN_HOST partition's CRC32C now (once per swap-in). A mismatch
  // is kCorruption naming the partition, file and offset; the caller's hold
  // is dropped and the data is never handed out.
  Status Verify(uint64_t id);
  // IN_HOST -> ON_NVME: the buffer goes back to the pool (shared buffers of a
  // pack when its last holder releases). A partition whose write-back failed
  // keeps its buffer (its only good copy) unless `discard` is set.
  Status ReleaseBuffer(uint64_t id, bool discard = false);
  // IN_HOST -> WRITING -> ON_NVME: writes the buffer back asynchronously and
  // returns the buffer when the write completes. Wait with WaitAll().
  Status SwapOut(uint64_t id);

  // Lays the packed (small) partitions out again in `groups` order:
  // consecutive groups share packs (a pack never exceeds one buffer), a group
  // marked `alone` starts a new pack and no later group joins that pack. Ids
  // of partitions that are not packed (larger than the threshold) are
  // skipped; an id named twice keeps its first place; small partitions no
  // group names follow, in their current order. An unknown id is NotFound.
  // Data, checksums and written/unwritten state are kept bit-exact (each
  // member's CRC32C is checked as it is copied). Needs every partition
  // ON_NVME with no hold and nothing in flight (FailedPrecondition naming the
  // first one that is not; a read is in flight until its callback has run, so
  // call WaitAll() first). It holds up to 4 pool buffers, waiting only for
  // the first (with only one, new packs are assembled in a host buffer of the
  // same size). If the new layout equals the current one, nothing is read or
  // written. On any I/O error the old layout stays in force and still reads
  // back intact; the error names the file and offset. SwapIn, Write,
  // WriteMany and Read called while a repack runs wait for it to finish. Not
  // from the read callback (it waits for I/O).
  Status Repack(std::span<const PackGroup> groups);

  void SetReadCallback(ReadCallback cb);

  PartitionState state(uint64_t id) const;
  uint64_t bytes(uint64_t id) const;
  bool contains(uint64_t id) const;
  // Buffers a swap-in of `id` takes (0 if its pack already holds them).
  uint32_t BuffersNeeded(uint64_t id) const;
  uint32_t available_swap_in_buffers() const;
  SwapperStats stats() const;
  const NvmeStore& store() const { return *store_; }

 private:
  struct Member {
    uint64_t id = 0;
    uint64_t bytes = 0;     // exact bytes of the partition
    uint64_t offset = 0;    // bytes into its extent
    uint32_t extent = 0;
    uint32_t crc = 0;
    bool written = false;   // the NVMe copy holds this run's data
    bool held = false;      // asked for by SwapIn and not released
    bool write_failed = false;  // good data only in the buffer after a failed write
    bool verified = true;   // the host copy passed its checksum since the read
    bool packed = false;    // small: shares packs, moved by Repack
    Status error;           // a failed read or write, reported once
  };
  struct ExtentState {
    Extent where;
    uint32_t buffers = 0;              // pool buffers this extent needs
    std::vector<uint32_t> members;     // indices into members_
    PartitionState state = PartitionState::kOnNvme;
    tiering::BufferSpan span;          // valid while READING/IN_HOST/WRITING
    uint32_t holders = 0;              // members held
  };

  // A pack of a layout Repack() computes: members_ indices in offset order.
  using Pack = std::vector<uint32_t>;
  // A pack placed in a repack region: its members' offsets and its extent.
  struct PlacedPack {
    Pack members;
    std::vector<uint64_t> offsets;  // bytes into `where`, one per member
    Extent where;
  };

  ParamSwapper(const SwapperOptions& options, tiering::PinnedPool* pool,
               io::AsyncEngine* engine);
  // Repack() in steps. All but CopyPacks need mu_; CopyPacks runs without it
  // while repacking_ is set, when members_ and extents_ cannot change.
  Status CheckQuiet() const;
  std::vector<Pack> CurrentPacks() const;
  Result<std::vector<Pack>> PlanRepack(std::span<const PackGroup> groups) const;
  // Next-fit packing of `order` (members_ indices); breaks[k]: a new pack
  // starts at order[k].
  std::vector<Pack> PackInOrder(std::span<const uint32_t> order,
                                const std::vector<bool>& breaks) const;
  Result<std::vector<PlacedPack>> Place(std::vector<Pack> packs, const Extent& region) const;
  // Writes `packs` from the old packs' data through pool buffers; adds the
  // I/O to `traffic`. Returns when no write is in flight.
  Status CopyPacks(const std::vector<PlacedPack>& packs, SwapperStats* traffic);
  // CopyPacks() through `slots` (>= 2 buffers of one pool buffer's bytes).
  Status CopyThrough(const std::vector<PlacedPack>& packs,
                     std::span<const tiering::BufferSpan> slots, SwapperStats* traffic);
  class PackCache;  // old packs held in read buffers (param_swapper.cc)
  // Fills `out` with new pack `packs[p]`, reading old packs through `cache`.
  Status AssemblePack(const std::vector<PlacedPack>& packs, size_t p, PackCache& cache,
                      uint8_t* out, SwapperStats* traffic);
  void SwitchLayout(std::vector<PlacedPack> packs);
  // Waits until no Repack() is moving data (`lock` holds mu_).
  void WaitNotRepacking(std::unique_lock<std::mutex>& lock);
  Result<Member*> Find(uint64_t id);
  const Member* Find(uint64_t id) const;
  Status StartRead(ExtentState& e, uint32_t extent_index);  // needs mu_
  void OnReadDone(uint32_t extent_index, const Status& status);
  void OnWriteDone(uint32_t extent_index, const Status& status);
  Status VerifyMember(const Member& m, const uint8_t* data) const;
  // Verifies once per swap-in; `lock` holds mu_ (released during the CRC).
  Status VerifyLocked(std::unique_lock<std::mutex>& lock, Member& m);
  void ReturnSpan(ExtentState& e);  // needs mu_
  std::string Describe(const Member& m) const;

  SwapperOptions options_;
  tiering::PinnedPool* pool_;
  io::AsyncEngine* engine_;
  std::unique_ptr<NvmeStore> store_;
  bool sealed_ = false;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Member> members_;
  std::unordered_map<uint64_t, uint32_t> index_;  // id -> members_ index
  std::vector<ExtentState> extents_;
  uint32_t in_flight_ = 0;   // extent transfers not yet completed
  Status first_error_;       // for WaitAll
  ReadCallback read_cb_;
  SwapperStats stats_;
  // Repack regions (docs/swap_format.md), empty when nothing is packed; the
  // packs in force live in region `region_in_force_` (-1: where Seal() put
  // them).
  Extent repack_region_[2];
  int region_in_force_ = -1;
  bool repacking_ = false;     // Repack() is moving data: transfers wait
  uint32_t private_reads_ = 0;  // Read() calls reading an extent without a state
};

}  // namespace ztier::swapper
