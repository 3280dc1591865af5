// Collective backends: how the ranks of one data-parallel group gather each
// parameter's partitions into the full parameter (and, for gradients,
// reduce-scatter it back). Two implementations:
//
//  - "local": the ranks are threads of one process sharing memory, over the
//    host-emulation device backend. A real partition and gather (each rank
//    copies every rank's part), so world sizes 2, 4, 8 run on one machine.
//  - "nccl": NCCL on CUDA streams, from a communicator built with an
//    ncclUniqueId passed in, or an existing ncclComm_t.
//  - "gloo": ranks in separate processes, on one machine or many, over TCP
//    (gloo's transport), on the host-emulation device backend. The ranks
//    find each other through a key-value store (GlooOptions).
//
// Ordering: like NCCL, every rank must issue the same collectives in the same
// order; the coordinator issues them in trace order. Calls only enqueue work
// on `stream`; completion is observed with events on that stream.
// Thread-safety: one thread per rank issues that rank's collectives.
// World size 1 needs no collective (CreateSelfCollective).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"
#include "optim/adam.h"
#include "tiering/device.h"

namespace ztier::coordinator {

enum class DType : uint8_t { kFloat32 = 0, kFloat16, kBFloat16, kUInt8 };
uint32_t DTypeBytes(DType t);
std::string_view DTypeName(DType t);
Result<DType> ParseDType(std::string_view name);
// The element type optim/ reads and writes for `t` (uint8 has no arithmetic:
// float32, never used for it).
constexpr optim::DType ElementType(DType t) {
  return t == DType::kFloat16    ? optim::DType::kF16
         : t == DType::kBFloat16 ? optim::DType::kBF16
                                 : optim::DType::kF32;
}

class Collective {
 public:
  virtual ~Collective() = default;
  virtual std::string_view name() const = 0;  // "self", "local", "nccl"
  virtual uint32_t rank() const = 0;
  virtual uint32_t world_size() const = 0;

  // Each rank's `part_bytes` bytes at `part` (device memory) land in every
  // rank's `full` (world_size x part_bytes bytes; rank r's at r x part_bytes),
  // enqueued on `stream`.
  virtual Status AllGather(const void* part, void* full, uint64_t part_bytes,
                           tiering::StreamHandle stream) = 0;
  // The element-wise mean over ranks of `full` (world_size x part_elems
  // elements of `dtype`), rank r keeping elements [r x part_elems, (r+1) x
  // part_elems) in `part`. Enqueued on `stream`.
  virtual Status ReduceScatterMean(const void* full, void* part, uint64_t part_elems,
                                   DType dtype, tiering::StreamHandle stream) = 0;
  // Host-side, blocking: every rank's `value`, in rank order. Used to check
  // that all ranks recorded the same trace.
  virtual Result<std::vector<uint64_t>> AllGatherHost(uint64_t value) = 0;

  // The failure of a collective that already ran on a stream (a lost rank,
  // ranks that disagreed), or OK. A stream's events complete either way, so
  // a waiter on an event checks this before using the result.
  virtual Status Health() { return Status::Ok(); }
};

// World size 1: AllGather is a device copy when part != full, else nothing.
std::unique_ptr<Collective> CreateSelfCollective(tiering::DeviceBackend* device);

// A group of `world_size` local ranks (threads of this process). Create one
// group, then one Collective per rank, each used by that rank's thread.
class LocalGroup {
 public:
  static std::shared_ptr<LocalGroup> Create(uint32_t world_size);
  virtual ~LocalGroup() = default;
  virtual uint32_t world_size() const = 0;
  // `device` must be a host-emulation backend (device memory is host memory).
  virtual Result<std::unique_ptr<Collective>> Join(uint32_t rank,
                                                   tiering::DeviceBackend* device) = 0;
  // Rank `rank` will issue no more collectives (it failed, possibly before
  // joining): ranks waiting for one it never issues fail instead of hanging.
  virtual void Abort(uint32_t rank) = 0;
};

// NCCL (compiled with ZTIER_WITH_NCCL; Unavailable with the reason else).
// `unique_id` is the 128-byte ncclUniqueId produced by rank 0 and shared by
// the trainer; `device` must be a CUDA backend.
Result<std::unique_ptr<Collective>> CreateNcclCollective(
    const void* unique_id, uint64_t unique_id_bytes, uint32_t rank, uint32_t world_size,
    tiering::DeviceBackend* device);
// Wraps an existing ncclComm_t (not owned).
Result<std::unique_ptr<Collective>> WrapNcclCommunicator(void* nccl_comm,
                                                         tiering::DeviceBackend* device);
// ---- gloo ----

// A key-value store every rank reaches: each rank publishes its address under
// a key and reads the others'. Used only while the group connects.
struct KeyValueStore {
  std::function<Status(const std::string& key, std::span<const uint8_t> value)> set;
  // Waits up to `timeout` for `key` to exist; an IoError (ETIMEDOUT) if it
  // does not.
  std::function<Result<std::vector<uint8_t>>(const std::string& key,
                                             std::chrono::milliseconds timeout)>
      get;
};

struct GlooOptions {
  uint32_t rank = 0;
  uint32_t world_size = 1;
  // Exactly one: a directory every rank sees (one host, or a shared
  // filesystem; gloo's file store), or a store given as callbacks.
  std::string store_path;
  KeyValueStore store;
  // Prepended to every key, so that several groups share one store; a group
  // must not reuse the keys of an earlier one (a file store keeps them).
  std::string prefix = "ztier";
  // How long a rank waits for any other rank, in connecting and in each
  // collective, before it fails naming the rank it waited for.
  std::chrono::milliseconds timeout{60'000};
  // Network interface to listen on ("eth0"); empty: $GLOO_SOCKET_IFNAME,
  // else the address this host's name resolves to.
  std::string interface;
};

// Connects this rank to the others (every rank calls it; it returns once all
// are connected, or fails after `timeout`). `device` must be a host-emulation
// backend. Unavailable with the reason when built without gloo.
Result<std::unique_ptr<Collective>> CreateGlooCollective(const GlooOptions& options,
                                                         tiering::DeviceBackend* device);
bool GlooAvailable(std::string* why);

// Rank 0's ncclUniqueId (128 bytes) for CreateNcclCollective.
Result<std::vector<uint8_t>> NcclUniqueId();
bool NcclAvailable(std::string* why);

}  // namespace ztier::coordinator
