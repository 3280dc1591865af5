// The CUDA implementation of DeviceBackend (see device.h), on the CUDA runtime
// API alone: no kernels, so no nvcc. Built only where the toolkit is found.
//
// Every call first makes `device_` current on the calling thread (the CUDA
// current device is per thread, and callers come from many threads), and every
// return code is checked and turned into a Status that names the call, the
// runtime's text and the error's name.
#include <cuda_runtime_api.h>
#include <fmt/format.h>

#include <atomic>
#include <mutex>
#include <utility>

#include "base/log.h"
#include "tiering/device.h"

namespace ztier::tiering {
namespace {

Status CudaStatus(cudaError_t err, std::string_view what) {
  // Clear the runtime's "last error" for non-sticky errors, so that a later,
  // unrelated check does not report this one again.
  (void)cudaGetLastError();
  std::string msg =
      fmt::format("{}: {} ({} = {})", what, cudaGetErrorString(err),
                  cudaGetErrorName(err), static_cast<int>(err));
  switch (err) {
    case cudaErrorMemoryAllocation:
      return Status::ResourceExhausted(std::move(msg));
    case cudaErrorInvalidValue:
    case cudaErrorInvalidDevicePointer:
    case cudaErrorInvalidResourceHandle:
    case cudaErrorInvalidDevice:
      return Status::InvalidArgument(std::move(msg));
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
      return Status::Unavailable(std::move(msg));
    case cudaErrorHostMemoryAlreadyRegistered:
    case cudaErrorHostMemoryNotRegistered:
      return Status::FailedPrecondition(std::move(msg));
    default:
      return Status::IoError(std::move(msg));
  }
}

#define ZTIER_CUDA_RETURN(call, what)                             \
  do {                                                            \
    const cudaError_t _zt_err = (call);                           \
    if (_zt_err != cudaSuccess) return CudaStatus(_zt_err, what); \
  } while (0)

// Number of devices, or the reason there are none. cudaGetDeviceCount leaves
// its output unwritten when it fails (no driver), hence the initial 0.
Result<int> DeviceCount() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    // Whatever the runtime's reason (no driver, driver too old, no device),
    // to callers it means the same: no CUDA here.
    return Status::Unavailable(
        std::string(CudaStatus(err, "cudaGetDeviceCount").message()));
  }
  if (count <= 0) {
    return Status::Unavailable(
        "no CUDA device visible (check the driver, nvidia-smi and "
        "CUDA_VISIBLE_DEVICES)");
  }
  return count;
}

inline cudaStream_t S(StreamHandle h) { return static_cast<cudaStream_t>(h.p); }
inline cudaEvent_t E(EventHandle h) { return static_cast<cudaEvent_t>(h.p); }

Status NullStream(std::string_view what) {
  return Status::InvalidArgument(fmt::format("{}: null stream handle", what));
}

class CudaDeviceBackend final : public DeviceBackend {
 public:
  static Result<std::unique_ptr<DeviceBackend>> Create(int device) {
    ZTIER_ASSIGN_OR_RETURN(const int count, DeviceCount());
    if (device < 0 || device >= count) {
      return Status::Unavailable(
          fmt::format("CUDA device {} does not exist ({} device(s) visible)",
                      device, count));
    }
    ZTIER_CUDA_RETURN(cudaSetDevice(device), "cudaSetDevice");
    cudaDeviceProp prop{};
    ZTIER_CUDA_RETURN(cudaGetDeviceProperties(&prop, device),
                      "cudaGetDeviceProperties");
    int pools = 0;
    ZTIER_CUDA_RETURN(
        cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, device),
        "cudaDeviceGetAttribute(MemoryPoolsSupported)");
    cudaStream_t internal = nullptr;
    ZTIER_CUDA_RETURN(
        cudaStreamCreateWithFlags(&internal, cudaStreamNonBlocking),
        "cudaStreamCreateWithFlags");
    std::string desc = fmt::format(
        "cuda:{} {} ({} bytes{})", device, prop.name, prop.totalGlobalMem,
        pools ? "" : ", no stream-ordered allocator");
    Log(LogLevel::kInfo, "device backend: {}", desc);
    return std::unique_ptr<DeviceBackend>(
        new CudaDeviceBackend(device, pools != 0, internal, std::move(desc)));
  }

  ~CudaDeviceBackend() override {
    if (cudaSetDevice(device_) == cudaSuccess) {
      (void)cudaStreamSynchronize(internal_);
      (void)cudaStreamDestroy(internal_);
    }
  }

  std::string_view name() const override { return "cuda"; }
  std::string description() const override { return description_; }
  bool pins_host_memory() const override { return true; }

  Result<void*> Alloc(uint64_t bytes, StreamHandle stream) override {
    if (bytes == 0) return Status::InvalidArgument("device Alloc of 0 bytes");
    ZTIER_RETURN_IF_ERROR(SetDevice());
    void* p = nullptr;
    const std::string what = fmt::format("device Alloc of {} bytes", bytes);
    if (!pools_) {
      ZTIER_CUDA_RETURN(cudaMalloc(&p, bytes), what);
      return p;
    }
    cudaStream_t s = stream ? S(stream) : internal_;
    ZTIER_CUDA_RETURN(cudaMallocAsync(&p, bytes, s), what);
    if (!stream) {
      const cudaError_t err = cudaStreamSynchronize(internal_);
      if (err != cudaSuccess) {
        (void)cudaFreeAsync(p, internal_);
        return CudaStatus(err, what);
      }
    }
    return p;
  }

  Status Free(void* ptr, StreamHandle stream) override {
    if (ptr == nullptr) return Status::Ok();
    ZTIER_RETURN_IF_ERROR(SetDevice());
    if (!pools_) {
      // cudaFree waits for the device, which orders it after any stream.
      ZTIER_CUDA_RETURN(cudaFree(ptr), "device Free (cudaFree)");
      return Status::Ok();
    }
    if (stream) {
      ZTIER_CUDA_RETURN(cudaFreeAsync(ptr, S(stream)),
                        "device Free (cudaFreeAsync)");
      return Status::Ok();
    }
    ZTIER_CUDA_RETURN(cudaDeviceSynchronize(),
                      "device Free (cudaDeviceSynchronize)");
    ZTIER_CUDA_RETURN(cudaFreeAsync(ptr, internal_),
                      "device Free (cudaFreeAsync)");
    ZTIER_CUDA_RETURN(cudaStreamSynchronize(internal_),
                      "device Free (cudaStreamSynchronize)");
    return Status::Ok();
  }

  Status MemInfo(uint64_t* free_bytes, uint64_t* total_bytes) override {
    ZTIER_RETURN_IF_ERROR(SetDevice());
    size_t f = 0, t = 0;
    ZTIER_CUDA_RETURN(cudaMemGetInfo(&f, &t), "cudaMemGetInfo");
    if (free_bytes) *free_bytes = f;
    if (total_bytes) *total_bytes = t;
    return Status::Ok();
  }

  Result<StreamHandle> CreateStream() override {
    ZTIER_RETURN_IF_ERROR(SetDevice());
    cudaStream_t s = nullptr;
    // Non-blocking: no implicit ordering with the legacy default stream, which
    // a framework running beside us may be using.
    ZTIER_CUDA_RETURN(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking),
                      "cudaStreamCreateWithFlags");
    return StreamHandle{s};
  }

  Status DestroyStream(StreamHandle stream) override {
    if (!stream) return NullStream("DestroyStream");
    ZTIER_RETURN_IF_ERROR(SetDevice());
    // Same contract as the emulation: queued work finishes first.
    Status sync = StreamSynchronize(stream);
    ZTIER_CUDA_RETURN(cudaStreamDestroy(S(stream)), "cudaStreamDestroy");
    return sync;
  }

  Result<EventHandle> CreateEvent() override {
    ZTIER_RETURN_IF_ERROR(SetDevice());
    cudaEvent_t e = nullptr;
    // No timing: cheaper to record and to wait on.
    ZTIER_CUDA_RETURN(cudaEventCreateWithFlags(&e, cudaEventDisableTiming),
                      "cudaEventCreateWithFlags");
    return EventHandle{e};
  }

  Status DestroyEvent(EventHandle event) override {
    if (!event)
      return Status::InvalidArgument("DestroyEvent: null event handle");
    ZTIER_RETURN_IF_ERROR(SetDevice());
    ZTIER_CUDA_RETURN(cudaEventDestroy(E(event)), "cudaEventDestroy");
    return Status::Ok();
  }

  Status RecordEvent(EventHandle event, StreamHandle stream) override {
    if (!stream) return NullStream("RecordEvent");
    if (!event)
      return Status::InvalidArgument("RecordEvent: null event handle");
    ZTIER_RETURN_IF_ERROR(SetDevice());
    ZTIER_CUDA_RETURN(cudaEventRecord(E(event), S(stream)), "cudaEventRecord");
    return Status::Ok();
  }

  Status StreamWaitEvent(StreamHandle stream, EventHandle event) override {
    if (!stream) return NullStream("StreamWaitEvent");
    if (!event)
      return Status::InvalidArgument("StreamWaitEvent: null event handle");
    ZTIER_RETURN_IF_ERROR(SetDevice());
    ZTIER_CUDA_RETURN(cudaStreamWaitEvent(S(stream), E(event), 0),
                      "cudaStreamWaitEvent");
    return Status::Ok();
  }

  Result<bool> EventQuery(EventHandle event) override {
    if (!event) return Status::InvalidArgument("EventQuery: null event handle");
    ZTIER_RETURN_IF_ERROR(SetDevice());
    const cudaError_t err = cudaEventQuery(E(event));
    if (err == cudaSuccess) return true;
    if (err == cudaErrorNotReady) {
      (void)cudaGetLastError();  // not an error: clear it
      return false;
    }
    return CudaStatus(err, "cudaEventQuery");
  }

  Status EventSynchronize(EventHandle event) override {
    if (!event)
      return Status::InvalidArgument("EventSynchronize: null event handle");
    ZTIER_RETURN_IF_ERROR(SetDevice());
    ZTIER_CUDA_RETURN(cudaEventSynchronize(E(event)), "cudaEventSynchronize");
    return TakeCallbackError();
  }

  Status StreamSynchronize(StreamHandle stream) override {
    if (!stream) return NullStream("StreamSynchronize");
    ZTIER_RETURN_IF_ERROR(SetDevice());
    ZTIER_CUDA_RETURN(cudaStreamSynchronize(S(stream)),
                      "cudaStreamSynchronize");
    return TakeCallbackError();
  }

  Status DeviceSynchronize() override {
    ZTIER_RETURN_IF_ERROR(SetDevice());
    ZTIER_CUDA_RETURN(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    return TakeCallbackError();
  }

  Status MemcpyH2DAsync(void* dst, const void* src, uint64_t bytes,
                        StreamHandle stream) override {
    return Copy(dst, src, bytes, cudaMemcpyHostToDevice, stream,
                "MemcpyH2DAsync");
  }
  Status MemcpyD2HAsync(void* dst, const void* src, uint64_t bytes,
                        StreamHandle stream) override {
    return Copy(dst, src, bytes, cudaMemcpyDeviceToHost, stream,
                "MemcpyD2HAsync");
  }
  Status MemcpyD2DAsync(void* dst, const void* src, uint64_t bytes,
                        StreamHandle stream) override {
    return Copy(dst, src, bytes, cudaMemcpyDeviceToDevice, stream,
                "MemcpyD2DAsync");
  }

  Status MemsetAsync(void* dst, uint8_t value, uint64_t bytes,
                     StreamHandle stream) override {
    if (!stream) return NullStream("MemsetAsync");
    if (bytes == 0) return Status::Ok();
    ZTIER_RETURN_IF_ERROR(SetDevice());
    ZTIER_CUDA_RETURN(cudaMemsetAsync(dst, value, bytes, S(stream)),
                      fmt::format("cudaMemsetAsync({} bytes)", bytes));
    return Status::Ok();
  }

  Status LaunchHostFunc(StreamHandle stream,
                        std::function<void()> fn) override {
    if (!stream) return NullStream("LaunchHostFunc");
    if (!fn) return Status::InvalidArgument("LaunchHostFunc: empty function");
    ZTIER_RETURN_IF_ERROR(SetDevice());
    auto* call = new HostCall{this, std::move(fn)};
    const cudaError_t err = cudaLaunchHostFunc(S(stream), &RunHostCall, call);
    if (err != cudaSuccess) {
      delete call;
      return CudaStatus(err, "cudaLaunchHostFunc");
    }
    return Status::Ok();
  }

  Status HostRegister(void* ptr, uint64_t bytes) override {
    if (ptr == nullptr || bytes == 0) {
      return Status::InvalidArgument("HostRegister: null pointer or 0 bytes");
    }
    ZTIER_RETURN_IF_ERROR(SetDevice());
    // Portable: pinned for every device, not only the current one.
    ZTIER_CUDA_RETURN(cudaHostRegister(ptr, bytes, cudaHostRegisterPortable),
                      fmt::format("cudaHostRegister({} bytes)", bytes));
    return Status::Ok();
  }

  Status HostUnregister(void* ptr) override {
    ZTIER_RETURN_IF_ERROR(SetDevice());
    ZTIER_CUDA_RETURN(cudaHostUnregister(ptr), "cudaHostUnregister");
    return Status::Ok();
  }

 private:
  struct HostCall {
    CudaDeviceBackend* backend;
    std::function<void()> fn;
  };

  // Runs on a CUDA runtime thread; must not call CUDA.
  static void RunHostCall(void* arg) {
    auto* call = static_cast<HostCall*>(arg);
    try {
      call->fn();
    } catch (...) {
      call->backend->SetCallbackError(
          Status::Internal("a host callback on a device stream threw"));
    }
    delete call;
  }

  CudaDeviceBackend(int device, bool pools, cudaStream_t internal,
                    std::string desc)
      : device_(device),
        pools_(pools),
        internal_(internal),
        description_(std::move(desc)) {}

  Status SetDevice() {
    ZTIER_CUDA_RETURN(cudaSetDevice(device_), "cudaSetDevice");
    return Status::Ok();
  }

  Status Copy(void* dst, const void* src, uint64_t bytes, cudaMemcpyKind kind,
              StreamHandle stream, const char* what) {
    if (!stream) return NullStream(what);
    if (bytes == 0) return Status::Ok();
    if (dst == nullptr || src == nullptr) {
      return Status::InvalidArgument(fmt::format("{}: null pointer", what));
    }
    ZTIER_RETURN_IF_ERROR(SetDevice());
    ZTIER_CUDA_RETURN(cudaMemcpyAsync(dst, src, bytes, kind, S(stream)),
                      fmt::format("{} ({} bytes)", what, bytes));
    return Status::Ok();
  }

  void SetCallbackError(Status s) {
    std::lock_guard<std::mutex> lock(error_mu_);
    if (callback_error_.ok()) callback_error_ = std::move(s);
    has_callback_error_.store(true, std::memory_order_release);
  }

  // A host-callback failure, reported once by the next synchronising call.
  Status TakeCallbackError() {
    if (!has_callback_error_.load(std::memory_order_acquire))
      return Status::Ok();
    std::lock_guard<std::mutex> lock(error_mu_);
    Status s = std::move(callback_error_);
    callback_error_ = Status::Ok();
    has_callback_error_.store(false, std::memory_order_release);
    return s;
  }

  const int device_;
  const bool pools_;       // cudaMallocAsync supported
  cudaStream_t internal_;  // for synchronous Alloc/Free
  const std::string description_;
  std::mutex error_mu_;
  std::atomic<bool> has_callback_error_{false};
  Status callback_error_;
};

}  // namespace

Result<std::unique_ptr<DeviceBackend>> CreateCudaDeviceBackend(int device) {
  auto backend = CudaDeviceBackend::Create(device);
  if (!backend.ok()) {
    return backend.status().WithContext(fmt::format("CUDA device {}", device));
  }
  return backend;
}

bool CudaDeviceAvailable(std::string* why) {
  auto count = DeviceCount();
  if (!count.ok()) {
    if (why) *why = std::string(count.status().message());
    return false;
  }
  return true;
}

}  // namespace ztier::tiering
