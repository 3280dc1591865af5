// The "nccl" collective backend: NCCL collectives enqueued on the CUDA streams
// of a CUDA DeviceBackend. Built only where NCCL is found (ZTIER_HAVE_NCCL);
// without it, collective.cc answers Unavailable with the reason.
//
// A communicator lives on one CUDA device, which must be the device
// backend's. The current CUDA device is per thread and collectives are issued
// from many threads, so every call makes that device current first. Every
// NCCL and CUDA return is checked and becomes a Status that names the call
// and the library's own text. Failures NCCL detects while collectives run (a
// peer died, the network failed) are polled with ncclCommGetAsyncError at the
// start of each call and after each host rendezvous.
//
// NCCL and the CUDA runtime are loaded at run time (coordinator/nccl_api.h,
// tiering/cudart.h): the first NCCL collective, unique id or wrapped
// communicator loads NCCL, preferring the copy already in the process.
//
// Thread-safety: as Collective (one thread per rank issues its collectives);
// AllGatherHost also serialises on its own scratch buffer and stream.

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "base/log.h"
#include "coordinator/collective.h"
#include "coordinator/collective_internal.h"
#include "coordinator/nccl_api.h"
#include "tiering/cudart.h"

namespace ztier::coordinator {
namespace {

using tiering::CudaRuntimeApi;
using tiering::DeviceBackend;
using tiering::StreamHandle;

// In the functions below, `rt_` is the CUDA runtime's table and `nccl_`
// NCCL's, as in the collective's members, so that the check macros read the
// same everywhere.

static_assert(sizeof(ncclUniqueId) == NCCL_UNIQUE_ID_BYTES);

Status CudaError(const CudaRuntimeApi& rt_, cudaError_t err, std::string_view what) {
  // Clear the runtime's last error (for non-sticky errors), so that a later,
  // unrelated check does not report this one again.
  (void)rt_.cudaGetLastError();
  return Status::IoError(fmt::format("{}: {} ({})", what, rt_.cudaGetErrorString(err),
                                     rt_.cudaGetErrorName(err)));
}

Status NcclError(const NcclApi& nccl_, ncclResult_t result, std::string_view what) {
  std::string msg = fmt::format("{}: {} (ncclResult_t {})", what,
                                nccl_.ncclGetErrorString(result), static_cast<int>(result));
  // NCCL keeps a more specific text of its latest failure on this thread.
  const char* detail = nccl_.ncclGetLastError(nullptr);
  if (detail != nullptr && detail[0] != '\0') msg += fmt::format("; NCCL says: {}", detail);
  switch (result) {
    case ncclInvalidArgument:
    case ncclInvalidUsage:
      return Status::InvalidArgument(std::move(msg));
    default:
      return Status::IoError(std::move(msg));
  }
}

#define ZTIER_CUDA_CHECK(call, what)                                   \
  do {                                                                 \
    const cudaError_t _zt_err = (call);                                \
    if (_zt_err != cudaSuccess) return CudaError(rt_, _zt_err, (what)); \
  } while (0)

// A communicator created non-blocking answers ncclInProgress while an
// operation is still being set up; wait for it to settle before going on.
Status Settle(const NcclApi& nccl_, ncclComm_t comm, ncclResult_t result,
              std::string_view what) {
  while (result == ncclInProgress) {
    std::this_thread::yield();
    ncclResult_t state = ncclSuccess;
    const ncclResult_t r = nccl_.ncclCommGetAsyncError(comm, &state);
    if (r != ncclSuccess) {
      return NcclError(nccl_, r, fmt::format("{} (ncclCommGetAsyncError)", what));
    }
    result = state;
  }
  if (result != ncclSuccess) return NcclError(nccl_, result, what);
  return Status::Ok();
}

#define ZTIER_NCCL_CHECK(comm, call, what)                             \
  do {                                                                 \
    ZTIER_RETURN_IF_ERROR(Settle(nccl_, (comm), (call), (what)));      \
  } while (0)

// The CUDA device that `device`'s memory lives on: the interface does not
// expose it, so ask CUDA where a small allocation of it landed.
Result<int> CudaDeviceOf(const CudaRuntimeApi& rt_, DeviceBackend* device) {
  constexpr uint64_t kProbeBytes = 256;
  ZTIER_ASSIGN_OR_RETURN(void* probe, device->Alloc(kProbeBytes, StreamHandle{}));
  cudaPointerAttributes attr{};
  const cudaError_t err = rt_.cudaPointerGetAttributes(&attr, probe);
  Status freed = device->Free(probe, StreamHandle{});
  if (err != cudaSuccess) return CudaError(rt_, err, "cudaPointerGetAttributes");
  ZTIER_RETURN_IF_ERROR(freed);
  return attr.device;
}

Status CheckDevice(const DeviceBackend* device) {
  if (device == nullptr || device->name() != "cuda") {
    return Status::InvalidArgument(fmt::format(
        "nccl collective needs a CUDA device backend (got '{}')",
        device ? device->name() : "null"));
  }
  return Status::Ok();
}

// Both libraries, loaded for the process (a CUDA device backend has already
// loaded the runtime; NCCL may be loaded here for the first time).
struct Libraries {
  const NcclApi* nccl;
  const CudaRuntimeApi* rt;
};

Result<Libraries> LoadLibraries() {
  ZTIER_ASSIGN_OR_RETURN(const NcclApi* nccl, Nccl());
  ZTIER_ASSIGN_OR_RETURN(const CudaRuntimeApi* rt, tiering::CudaRuntime());
  return Libraries{nccl, rt};
}

Result<ncclDataType_t> MeanType(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return ncclFloat32;
    case DType::kFloat16: return ncclFloat16;
    case DType::kBFloat16: return ncclBfloat16;
    case DType::kUInt8: break;
  }
  return Status::InvalidArgument(fmt::format(
      "ReduceScatterMean: dtype {} is not a floating-point type (use float32, "
      "float16 or bfloat16)",
      DTypeName(dtype)));
}

class NcclCollective final : public Collective {
 public:
  // Builds the collective around `comm` (destroyed with it when `owned`; on
  // failure here too). `cuda_device` is the communicator's device.
  static Result<std::unique_ptr<Collective>> Create(const Libraries& libs, ncclComm_t comm,
                                                    bool owned, int cuda_device,
                                                    DeviceBackend* device) {
    std::unique_ptr<NcclCollective> c(
        new NcclCollective(libs, comm, owned, cuda_device, device));
    ZTIER_RETURN_IF_ERROR(c->Init());
    return std::unique_ptr<Collective>(std::move(c));
  }

  ~NcclCollective() override {
    if (stream_) {
      Status s = device_->DestroyStream(stream_);
      if (!s.ok()) Log(LogLevel::kWarning, "nccl collective: {}", s.message());
    }
    if (scratch_ != nullptr) {
      Status s = device_->Free(scratch_, StreamHandle{});
      if (!s.ok()) Log(LogLevel::kWarning, "nccl collective: {}", s.message());
    }
    if (!owned_) return;
    if (rt_.cudaSetDevice(cuda_device_) != cudaSuccess) (void)rt_.cudaGetLastError();
    // Finalize flushes what is still queued; if that fails, abort instead of
    // destroying, which would wait for peers that may be gone.
    Status fin = Settle(nccl_, comm_, nccl_.ncclCommFinalize(comm_), "ncclCommFinalize");
    if (!fin.ok()) {
      Log(LogLevel::kWarning, "nccl collective: {}", fin.message());
      const ncclResult_t r = nccl_.ncclCommAbort(comm_);
      if (r != ncclSuccess) {
        Log(LogLevel::kWarning, "nccl collective: {}",
            NcclError(nccl_, r, "ncclCommAbort").message());
      }
      return;
    }
    const ncclResult_t r = nccl_.ncclCommDestroy(comm_);
    if (r != ncclSuccess) {
      Log(LogLevel::kWarning, "nccl collective: {}",
          NcclError(nccl_, r, "ncclCommDestroy").message());
    }
  }

  std::string_view name() const override { return "nccl"; }
  uint32_t rank() const override { return rank_; }
  uint32_t world_size() const override { return world_; }

  Status AllGather(const void* part, void* full, uint64_t part_bytes,
                   StreamHandle stream) override {
    ZTIER_RETURN_IF_ERROR(CheckCollectiveBuffers("AllGather", part, full, part_bytes, rank_, world_));
    if (!stream) return Status::InvalidArgument("AllGather: null stream handle");
    // Zero bytes is a no-op in NCCL too, for every rank alike.
    if (part_bytes == 0) return Status::Ok();
    ZTIER_RETURN_IF_ERROR(Prepare());
    // As bytes: the gather moves bits, whatever the element type.
    ZTIER_NCCL_CHECK(comm_,
                     nccl_.ncclAllGather(part, full, part_bytes, ncclUint8, comm_,
                                   static_cast<cudaStream_t>(stream.p)),
                     fmt::format("ncclAllGather({} bytes per rank)", part_bytes));
    return Status::Ok();
  }

  Status ReduceScatterMean(const void* full, void* part, uint64_t part_elems,
                           DType dtype, StreamHandle stream) override {
    ZTIER_ASSIGN_OR_RETURN(const ncclDataType_t type, MeanType(dtype));
    uint64_t bytes = 0;
    if (__builtin_mul_overflow(part_elems, uint64_t{DTypeBytes(dtype)}, &bytes)) {
      return Status::InvalidArgument("ReduceScatterMean: element count overflows");
    }
    ZTIER_RETURN_IF_ERROR(
        CheckCollectiveBuffers("ReduceScatterMean", part, full, bytes, rank_, world_));
    if (!stream) return Status::InvalidArgument("ReduceScatterMean: null stream handle");
    if (part_elems == 0) return Status::Ok();
    ZTIER_RETURN_IF_ERROR(Prepare());
    ZTIER_NCCL_CHECK(comm_,
                     nccl_.ncclReduceScatter(full, part, part_elems, type, ncclAvg, comm_,
                                       static_cast<cudaStream_t>(stream.p)),
                     fmt::format("ncclReduceScatter({} {} elements per rank, avg)",
                                 part_elems, DTypeName(dtype)));
    return Status::Ok();
  }

  Result<std::vector<uint64_t>> AllGatherHost(uint64_t value) override {
    std::lock_guard<std::mutex> lock(host_mu_);
    ZTIER_RETURN_IF_ERROR(Prepare());
    std::vector<uint64_t> values(world_);
    Status enqueued = EnqueueHostGather(&value, values.data());
    // Wait even after a failed enqueue: earlier copies may still read `value`.
    Status synced = device_->StreamSynchronize(stream_);
    ZTIER_RETURN_IF_ERROR(enqueued);
    ZTIER_RETURN_IF_ERROR(synced);
    ZTIER_RETURN_IF_ERROR(AsyncError());
    return values;
  }

 private:
  NcclCollective(const Libraries& libs, ncclComm_t comm, bool owned, int cuda_device,
                 DeviceBackend* device)
      : nccl_(*libs.nccl),
        rt_(*libs.rt),
        comm_(comm),
        owned_(owned),
        cuda_device_(cuda_device),
        device_(device) {}

  Status Init() {
    int count = 0;
    int rank = 0;
    ZTIER_NCCL_CHECK(comm_, nccl_.ncclCommCount(comm_, &count), "ncclCommCount");
    ZTIER_NCCL_CHECK(comm_, nccl_.ncclCommUserRank(comm_, &rank), "ncclCommUserRank");
    if (count <= 0 || rank < 0 || rank >= count) {
      return Status::Internal(fmt::format(
          "nccl communicator reports rank {} of world size {}", rank, count));
    }
    world_ = static_cast<uint32_t>(count);
    rank_ = static_cast<uint32_t>(rank);
    ZTIER_CUDA_CHECK(rt_.cudaSetDevice(cuda_device_), "cudaSetDevice");
    ZTIER_ASSIGN_OR_RETURN(stream_, device_->CreateStream());
    // One uint64 per rank for AllGatherHost.
    ZTIER_ASSIGN_OR_RETURN(void* scratch,
                           device_->Alloc(uint64_t{world_} * sizeof(uint64_t),
                                          StreamHandle{}));
    scratch_ = static_cast<uint64_t*>(scratch);
    int version = 0;
    ZTIER_NCCL_CHECK(comm_, nccl_.ncclGetVersion(&version), "ncclGetVersion");
    Log(LogLevel::kInfo, "nccl collective: rank {} of {} on cuda:{} (NCCL {} from {}{}){}",
        rank_, world_, cuda_device_, version, nccl_.library.name,
        nccl_.library.was_loaded ? ", already loaded" : "",
        owned_ ? "" : ", communicator not owned");
    return Status::Ok();
  }

  // Makes the communicator's device current on this thread and reports a
  // failure NCCL saw in collectives that already ran.
  Status Prepare() {
    ZTIER_CUDA_CHECK(rt_.cudaSetDevice(cuda_device_), "cudaSetDevice");
    return AsyncError();
  }

  Status AsyncError() {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t r = nccl_.ncclCommGetAsyncError(comm_, &state);
    if (r != ncclSuccess) return NcclError(nccl_, r, "ncclCommGetAsyncError");
    // In progress is a non-blocking communicator at work, not a failure.
    if (state != ncclSuccess && state != ncclInProgress) {
      return NcclError(nccl_, state, "an earlier NCCL collective failed");
    }
    return Status::Ok();
  }

  // Own value into this rank's slot of the scratch buffer, gathered in place,
  // then all of it back to `out` (world_ values), all on stream_.
  Status EnqueueHostGather(const uint64_t* value, uint64_t* out) {
    uint64_t* mine = scratch_ + rank_;
    ZTIER_RETURN_IF_ERROR(device_->MemcpyH2DAsync(mine, value, sizeof(*value), stream_));
    ZTIER_NCCL_CHECK(comm_,
                     nccl_.ncclAllGather(mine, scratch_, 1, ncclUint64, comm_,
                                   static_cast<cudaStream_t>(stream_.p)),
                     "ncclAllGather(1 uint64 per rank, host values)");
    return device_->MemcpyD2HAsync(out, scratch_, uint64_t{world_} * sizeof(uint64_t),
                                   stream_);
  }

  const NcclApi& nccl_;          // both loaded for the process, never unloaded
  const CudaRuntimeApi& rt_;
  const ncclComm_t comm_;
  const bool owned_;
  const int cuda_device_;
  DeviceBackend* const device_;
  uint32_t rank_ = 0;
  uint32_t world_ = 0;
  StreamHandle stream_;           // AllGatherHost's own stream
  uint64_t* scratch_ = nullptr;   // device: world_ values for AllGatherHost
  std::mutex host_mu_;            // guards stream_ and scratch_ use
};

}  // namespace

Result<std::unique_ptr<Collective>> CreateNcclCollective(
    const void* unique_id, uint64_t unique_id_bytes, uint32_t rank, uint32_t world_size,
    tiering::DeviceBackend* device) {
  if (unique_id == nullptr || unique_id_bytes != sizeof(ncclUniqueId)) {
    return Status::InvalidArgument(fmt::format(
        "nccl collective: the unique id must be {} bytes (got {}{})",
        sizeof(ncclUniqueId), unique_id_bytes, unique_id ? "" : ", null"));
  }
  if (world_size == 0 || rank >= world_size ||
      world_size > static_cast<uint32_t>(INT32_MAX)) {
    return Status::InvalidArgument(fmt::format(
        "nccl collective: rank {} is out of range for world size {}", rank, world_size));
  }
  ZTIER_RETURN_IF_ERROR(CheckDevice(device));
  ZTIER_ASSIGN_OR_RETURN(const Libraries libs, LoadLibraries());
  const NcclApi& nccl_ = *libs.nccl;
  const CudaRuntimeApi& rt_ = *libs.rt;
  ZTIER_ASSIGN_OR_RETURN(const int cuda_device, CudaDeviceOf(rt_, device));
  // The communicator binds to the device current at its creation.
  ZTIER_CUDA_CHECK(rt_.cudaSetDevice(cuda_device), "cudaSetDevice");
  ncclUniqueId id;
  std::memcpy(&id, unique_id, sizeof(id));
  ncclComm_t comm = nullptr;
  const ncclResult_t r = nccl_.ncclCommInitRank(&comm, static_cast<int>(world_size), id,
                                          static_cast<int>(rank));
  if (r != ncclSuccess) {
    return NcclError(nccl_, r, fmt::format("ncclCommInitRank(rank {} of {}, cuda:{})", rank,
                                    world_size, cuda_device));
  }
  // Owned: on failure the collective's destructor releases the communicator.
  return NcclCollective::Create(libs, comm, /*owned=*/true, cuda_device, device);
}

namespace {

// A communicator made elsewhere can only be driven by the NCCL copy that made
// it. When ztier opened its own copy (none was in the process before it, and
// no override names one), the maker linked NCCL some other way (statically,
// or under another name) and the two copies would share a communicator.
Status CheckSameNccl() {
  ZTIER_ASSIGN_OR_RETURN(const NcclApi* nccl, Nccl());
  if (nccl->library.was_loaded || std::getenv("ZTIER_NCCL_LIBRARY") != nullptr) {
    return Status::Ok();
  }
  return Status::FailedPrecondition(fmt::format(
      "nccl collective: a communicator created outside ztier must be driven by the NCCL that "
      "created it, but no NCCL was loaded in this process before ztier opened {} (the "
      "framework links NCCL statically or under another name): set ZTIER_NCCL_LIBRARY to the "
      "framework's NCCL library, or let ztier create the communicator",
      nccl->library.name));
}

}  // namespace

Result<std::unique_ptr<Collective>> WrapNcclCommunicator(void* nccl_comm,
                                                         tiering::DeviceBackend* device) {
  if (nccl_comm == nullptr) {
    return Status::InvalidArgument("nccl collective: null communicator");
  }
  ZTIER_RETURN_IF_ERROR(CheckSameNccl());
  ZTIER_RETURN_IF_ERROR(CheckDevice(device));
  ZTIER_ASSIGN_OR_RETURN(const Libraries libs, LoadLibraries());
  const NcclApi& nccl_ = *libs.nccl;
  auto comm = static_cast<ncclComm_t>(nccl_comm);
  int comm_device = -1;
  ZTIER_NCCL_CHECK(comm, nccl_.ncclCommCuDevice(comm, &comm_device), "ncclCommCuDevice");
  ZTIER_ASSIGN_OR_RETURN(const int backend_device, CudaDeviceOf(*libs.rt, device));
  if (comm_device != backend_device) {
    return Status::InvalidArgument(fmt::format(
        "nccl collective: the communicator is on cuda:{} but the device backend on "
        "cuda:{}",
        comm_device, backend_device));
  }
  return NcclCollective::Create(libs, comm, /*owned=*/false, comm_device, device);
}

Result<std::vector<uint8_t>> NcclUniqueId() {
  ZTIER_ASSIGN_OR_RETURN(const NcclApi* nccl, Nccl());
  const NcclApi& nccl_ = *nccl;
  ncclUniqueId id;
  const ncclResult_t r = nccl_.ncclGetUniqueId(&id);
  if (r != ncclSuccess) return NcclError(nccl_, r, "ncclGetUniqueId");
  std::vector<uint8_t> bytes(sizeof(id));
  std::memcpy(bytes.data(), &id, sizeof(id));
  return bytes;
}

bool NcclAvailable(std::string* why) {
  // Built with nccl.h; what can be missing is the library, a GPU or its driver.
  auto nccl = Nccl();
  if (!nccl.ok()) {
    if (why) *why = std::string(nccl.status().message());
    return false;
  }
  return tiering::CudaDeviceAvailable(why);
}

}  // namespace ztier::coordinator
