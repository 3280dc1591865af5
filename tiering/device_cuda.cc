// The CUDA implementation of DeviceBackend (see device.h), on the CUDA runtime
// API alone: no kernels, so no nvcc. Built only where the toolkit is found.
//
// Every call first makes `device_` current on the calling thread (the CUDA
// current device is per thread, and callers come from many threads), and every
// return code is checked and turned into a Status that names the call, the
// runtime's text and the error's name. The runtime is loaded at first use
// (tiering/cudart.h); the host emulation never loads it.
#include <fmt/format.h>

#include <atomic>
#include <mutex>
#include <utility>

#include "base/log.h"
#include "tiering/cudart.h"
#include "tiering/device.h"

namespace ztier::tiering {
namespace {

Status CudaStatus(const CudaRuntimeApi& rt_, cudaError_t err, std::string_view what) {
  // Clear the runtime's "last error" for non-sticky errors, so that a later,
  // unrelated check does not report this one again.
  (void)rt_.cudaGetLastError();
  std::string msg =
      fmt::format("{}: {} ({} = {})", what, rt_.cudaGetErrorString(err),
                  rt_.cudaGetErrorName(err), static_cast<int>(err));
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

// `rt_`, the runtime's table, must be in scope.
#define ZTIER_CUDA_RETURN(call, what)                                  \
  do {                                                                 \
    const cudaError_t _zt_err = (call);                                \
    if (_zt_err != cudaSuccess) return CudaStatus(rt_, _zt_err, what); \
  } while (0)

// Number of devices, or the reason there are none. cudaGetDeviceCount leaves
// its output unwritten when it fails (no driver), hence the initial 0.
Result<int> DeviceCount(const CudaRuntimeApi& rt_) {
  int count = 0;
  const cudaError_t err = rt_.cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    // Whatever the runtime's reason (no driver, driver too old, no device),
    // to callers it means the same: no CUDA here.
    return Status::Unavailable(
        std::string(CudaStatus(rt_, err, "cudaGetDeviceCount").message()));
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
    ZTIER_ASSIGN_OR_RETURN(const CudaRuntimeApi* runtime, CudaRuntime());
    const CudaRuntimeApi& rt_ = *runtime;  // the member's name, for ZTIER_CUDA_RETURN
    ZTIER_ASSIGN_OR_RETURN(const int count, DeviceCount(rt_));
    if (device < 0 || device >= count) {
      return Status::Unavailable(
          fmt::format("CUDA device {} does not exist ({} device(s) visible)",
                      device, count));
    }
    ZTIER_CUDA_RETURN(rt_.cudaSetDevice(device), "cudaSetDevice");
    cudaDeviceProp prop{};
    ZTIER_CUDA_RETURN(rt_.cudaGetDeviceProperties(&prop, device),
                      "cudaGetDeviceProperties");
    int pools = 0;
    ZTIER_CUDA_RETURN(
        rt_.cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, device),
        "cudaDeviceGetAttribute(MemoryPoolsSupported)");
    cudaStream_t internal = nullptr;
    ZTIER_CUDA_RETURN(
        rt_.cudaStreamCreateWithFlags(&internal, cudaStreamNonBlocking),
        "cudaStreamCreateWithFlags");
    std::string desc = fmt::format(
        "cuda:{} {} ({} bytes{})", device, prop.name, prop.totalGlobalMem,
        pools ? "" : ", no stream-ordered allocator");
    Log(LogLevel::kInfo, "device backend: {}; CUDA runtime {}.{} from {}{}", desc,
        rt_.version / 1000, rt_.version % 1000 / 10, rt_.library.name,
        rt_.library.was_loaded ? " (already loaded)" : "");
    return std::unique_ptr<DeviceBackend>(
        new CudaDeviceBackend(rt_, device, pools != 0, internal, std::move(desc)));
  }

  ~CudaDeviceBackend() override {
    if (rt_.cudaSetDevice(device_) == cudaSuccess) {
      (void)rt_.cudaStreamSynchronize(internal_);
      (void)rt_.cudaStreamDestroy(internal_);
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
      ZTIER_CUDA_RETURN(rt_.cudaMalloc(&p, bytes), what);
      return p;
    }
    cudaStream_t s = stream ? S(stream) : internal_;
    ZTIER_CUDA_RETURN(rt_.cudaMallocAsync(&p, bytes, s), what);
    if (!stream) {
      const cudaError_t err = rt_.cudaStreamSynchronize(internal_);
      if (err != cudaSuccess) {
        (void)rt_.cudaFreeAsync(p, internal_);
        return CudaStatus(rt_, err, what);
      }
    }
    return p;
  }

  Status Free(void* ptr, StreamHandle stream) override {
    if (ptr == nullptr) return Status::Ok();
    ZTIER_RETURN_IF_ERROR(SetDevice());
    if (!pools_) {
      // cudaFree waits for the device, which orders it after any stream.
      ZTIER_CUDA_RETURN(rt_.cudaFree(ptr), "device Free (cudaFree)");
      return Status::Ok();
    }
    if (stream) {
      ZTIER_CUDA_RETURN(rt_.cudaFreeAsync(ptr, S(stream)),
                        "device Free (cudaFreeAsync)");
      return Status::Ok();
    }
    ZTIER_CUDA_RETURN(rt_.cudaDeviceSynchronize(),
                      "device Free (cudaDeviceSynchronize)");
    ZTIER_CUDA_RETURN(rt_.cudaFreeAsync(ptr, internal_),
                      "device Free (cudaFreeAsync)");
    ZTIER_CUDA_RETURN(rt_.cudaStreamSynchronize(internal_),
                      "device Free (cudaStreamSynchronize)");
    return Status::Ok();
  }

  Status MemInfo(uint64_t* free_bytes, uint64_t* total_bytes) override {
    ZTIER_RETURN_IF_ERROR(SetDevice());
    size_t f = 0, t = 0;
    ZTIER_CUDA_RETURN(rt_.cudaMemGetInfo(&f, &t), "cudaMemGetInfo");
    if (free_bytes) *free_bytes = f;
    if (total_bytes) *total_bytes = t;
    return Status::Ok();
  }

  Result<StreamHandle> CreateStream() override {
    ZTIER_RETURN_IF_ERROR(SetDevice());
    cudaStream_t s = nullptr;
    // Non-blocking: no implicit ordering with the legacy default stream, which
    // a framework running beside us may be using.
    ZTIER_CUDA_RETURN(rt_.cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking),
                      "cudaStreamCreateWithFlags");
    return StreamHandle{s};
  }

  Status DestroyStream(StreamHandle stream) override {
    if (!stream) return NullStream("DestroyStream");
    ZTIER_RETURN_IF_ERROR(SetDevice());
    // Same contract as the emulation: queued work finishes first.
    Status sync = StreamSynchronize(stream);
    ZTIER_CUDA_RETURN(rt_.cudaStreamDestroy(S(stream)), "cudaStreamDestroy");
    return sync;
  }

  Result<EventHandle> CreateEvent() override {
    ZTIER_RETURN_IF_ERROR(SetDevice());
    cudaEvent_t e = nullptr;
    // No timing: cheaper to record and to wait on.
    ZTIER_CUDA_RETURN(rt_.cudaEventCreateWithFlags(&e, cudaEventDisableTiming),
                      "cudaEventCreateWithFlags");
    return EventHandle{e};
  }

  Status DestroyEvent(EventHandle event) override {
    if (!event)
      return Status::InvalidArgument("DestroyEvent: null event handle");
    ZTIER_RETURN_IF_ERROR(SetDevice());
    ZTIER_CUDA_RETURN(rt_.cudaEventDestroy(E(event)), "cudaEventDestroy");
    return Status::Ok();
  }

  Status RecordEvent(EventHandle event, StreamHandle stream) override {
    if (!stream) return NullStream("RecordEvent");
    if (!event)
      return Status::InvalidArgument("RecordEvent: null event handle");
    ZTIER_RETURN_IF_ERROR(SetDevice());
    ZTIER_CUDA_RETURN(rt_.cudaEventRecord(E(event), S(stream)), "cudaEventRecord");
    return Status::Ok();
  }

  Status StreamWaitEvent(StreamHandle stream, EventHandle event) override {
    if (!stream) return NullStream("StreamWaitEvent");
    if (!event)
      return Status::InvalidArgument("StreamWaitEvent: null event handle");
    ZTIER_RETURN_IF_ERROR(SetDevice());
    ZTIER_CUDA_RETURN(rt_.cudaStreamWaitEvent(S(stream), E(event), 0),
                      "cudaStreamWaitEvent");
    return Status::Ok();
  }

  Result<bool> EventQuery(EventHandle event) override {
    if (!event) return Status::InvalidArgument("EventQuery: null event handle");
    ZTIER_RETURN_IF_ERROR(SetDevice());
    const cudaError_t err = rt_.cudaEventQuery(E(event));
    if (err == cudaSuccess) return true;
    if (err == cudaErrorNotReady) {
      (void)rt_.cudaGetLastError();  // not an error: clear it
      return false;
    }
    return CudaStatus(rt_, err, "cudaEventQuery");
  }

  Status EventSynchronize(EventHandle event) override {
    if (!event)
      return Status::InvalidArgument("EventSynchronize: null event handle");
    ZTIER_RETURN_IF_ERROR(SetDevice());
    ZTIER_CUDA_RETURN(rt_.cudaEventSynchronize(E(event)), "cudaEventSynchronize");
    return TakeCallbackError();
  }

  Status StreamSynchronize(StreamHandle stream) override {
    if (!stream) return NullStream("StreamSynchronize");
    ZTIER_RETURN_IF_ERROR(SetDevice());
    ZTIER_CUDA_RETURN(rt_.cudaStreamSynchronize(S(stream)),
                      "cudaStreamSynchronize");
    return TakeCallbackError();
  }

  Status DeviceSynchronize() override {
    ZTIER_RETURN_IF_ERROR(SetDevice());
    ZTIER_CUDA_RETURN(rt_.cudaDeviceSynchronize(), "cudaDeviceSynchronize");
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
    ZTIER_CUDA_RETURN(rt_.cudaMemsetAsync(dst, value, bytes, S(stream)),
                      fmt::format("cudaMemsetAsync({} bytes)", bytes));
    return Status::Ok();
  }

  Status LaunchHostFunc(StreamHandle stream,
                        std::function<void()> fn) override {
    if (!stream) return NullStream("LaunchHostFunc");
    if (!fn) return Status::InvalidArgument("LaunchHostFunc: empty function");
    ZTIER_RETURN_IF_ERROR(SetDevice());
    auto* call = new HostCall{this, std::move(fn)};
    const cudaError_t err = rt_.cudaLaunchHostFunc(S(stream), &RunHostCall, call);
    if (err != cudaSuccess) {
      delete call;
      return CudaStatus(rt_, err, "cudaLaunchHostFunc");
    }
    return Status::Ok();
  }

  Status HostRegister(void* ptr, uint64_t bytes) override {
    if (ptr == nullptr || bytes == 0) {
      return Status::InvalidArgument("HostRegister: null pointer or 0 bytes");
    }
    ZTIER_RETURN_IF_ERROR(SetDevice());
    // Portable: pinned for every device, not only the current one.
    ZTIER_CUDA_RETURN(rt_.cudaHostRegister(ptr, bytes, cudaHostRegisterPortable),
                      fmt::format("cudaHostRegister({} bytes)", bytes));
    return Status::Ok();
  }

  Status HostUnregister(void* ptr) override {
    ZTIER_RETURN_IF_ERROR(SetDevice());
    ZTIER_CUDA_RETURN(rt_.cudaHostUnregister(ptr), "cudaHostUnregister");
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

  CudaDeviceBackend(const CudaRuntimeApi& rt, int device, bool pools,
                    cudaStream_t internal, std::string desc)
      : rt_(rt),
        device_(device),
        pools_(pools),
        internal_(internal),
        description_(std::move(desc)) {}

  Status SetDevice() {
    ZTIER_CUDA_RETURN(rt_.cudaSetDevice(device_), "cudaSetDevice");
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
    ZTIER_CUDA_RETURN(rt_.cudaMemcpyAsync(dst, src, bytes, kind, S(stream)),
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

  const CudaRuntimeApi& rt_;  // loaded for the process, never unloaded
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
  auto runtime = CudaRuntime();
  if (!runtime.ok()) {
    if (why) *why = std::string(runtime.status().message());
    return false;
  }
  auto count = DeviceCount(**runtime);
  if (!count.ok()) {
    if (why) *why = std::string(count.status().message());
    return false;
  }
  return true;
}

}  // namespace ztier::tiering
