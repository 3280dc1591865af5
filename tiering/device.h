// DeviceBackend: the few device operations the tier layer needs (memory,
// ordered streams, events, copies, host callbacks, host-memory pinning),
// behind one small interface with two implementations:
//
//  - "host": an emulation in which device memory is ordinary host memory and
//    each stream is an ordered queue served by its own worker thread. Every
//    CPU test of the layers above runs on it, so it keeps CUDA's ordering
//    rules exactly: work on one stream runs in submission order, an event
//    completes when its stream reaches the point where it was recorded, and
//    StreamWaitEvent holds a stream back until then.
//  - "cuda": the CUDA runtime API (non-blocking streams, events without
//    timing, cudaMallocAsync, cudaMemcpyAsync, cudaLaunchHostFunc,
//    cudaHostRegister). Compiled only where the toolkit's headers are found;
//    the runtime library is opened at first use (tiering/cudart.h). It
//    reports Unavailable with the reason on a machine without a loadable
//    runtime or without a usable device.
//
// Handles are opaque values owned by the backend that created them: destroy
// each stream and event with the same backend, before the backend. Device
// pointers are plain `void*` (for the host emulation they are host pointers,
// for CUDA device addresses) and must be freed with the backend's Free().
//
// Asynchrony: *Async calls and LaunchHostFunc only enqueue; the caller keeps
// source and destination memory valid (and unmodified, for sources) until the
// stream has passed the operation (an event recorded after it completes, or
// StreamSynchronize returns). Errors of the call itself (bad handle, bad
// pointer, a CUDA error) are returned immediately; an error that happens
// while the stream runs is reported by the next synchronising call on it.
//
// Thread-safety: every method may be called from any thread concurrently,
// also on the same stream (the order between two threads' submissions is
// then whichever call came first). Host callbacks run on a backend thread;
// they must not call into the backend (CUDA forbids it; the emulation would
// deadlock on a synchronising call) and should be short.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "base/status.h"

namespace ztier::tiering {

// An ordered queue of device work. A null handle is invalid except where a
// method says it means "synchronous".
struct StreamHandle {
  void* p = nullptr;
  explicit operator bool() const { return p != nullptr; }
  bool operator==(const StreamHandle&) const = default;
};

// A marker in a stream: recorded at a point of the stream, complete once the
// stream has run everything before that point. An event never recorded is
// complete. Recording again moves the marker.
struct EventHandle {
  void* p = nullptr;
  explicit operator bool() const { return p != nullptr; }
  bool operator==(const EventHandle&) const = default;
};

class DeviceBackend {
 public:
  virtual ~DeviceBackend() = default;
  DeviceBackend(const DeviceBackend&) = delete;
  DeviceBackend& operator=(const DeviceBackend&) = delete;

  // "host" or "cuda".
  virtual std::string_view name() const = 0;
  // One line for logs, e.g. "cuda:0 NVIDIA H100 80GB HBM3 (79 GiB)".
  virtual std::string description() const = 0;
  // True when HostRegister() makes host memory page-locked for fast DMA
  // (CUDA). The host emulation returns false: the pinned pool then pins with
  // mlock instead.
  virtual bool pins_host_memory() const = 0;

  // ---- memory ----
  // `bytes` bytes of device memory (256-byte aligned), ordered on `stream`:
  // usable by work enqueued on `stream` afterwards, by other streams once
  // they are ordered after it (event) or after StreamSynchronize. A null
  // stream allocates synchronously. bytes == 0 is an error.
  virtual Result<void*> Alloc(uint64_t bytes, StreamHandle stream) = 0;
  // Frees `ptr` (from Alloc) once `stream` reaches this point; a null stream
  // waits for the whole device first. A pointer not from Alloc is an error.
  virtual Status Free(void* ptr, StreamHandle stream) = 0;
  // Device memory free and total, bytes (the emulation's total is its
  // configured capacity).
  virtual Status MemInfo(uint64_t* free_bytes, uint64_t* total_bytes) = 0;

  // ---- streams and events ----
  virtual Result<StreamHandle> CreateStream() = 0;
  // Waits for the stream's queued work, then releases it.
  virtual Status DestroyStream(StreamHandle stream) = 0;
  virtual Result<EventHandle> CreateEvent() = 0;
  // An event may be destroyed while its recorded work is still pending.
  virtual Status DestroyEvent(EventHandle event) = 0;
  // Marks the current end of `stream` in `event`.
  virtual Status RecordEvent(EventHandle event, StreamHandle stream) = 0;
  // Work enqueued on `stream` after this call waits until `event` (as last
  // recorded before this call) completes. Does not block the caller.
  virtual Status StreamWaitEvent(StreamHandle stream, EventHandle event) = 0;
  // True when complete, false while pending; never blocks.
  virtual Result<bool> EventQuery(EventHandle event) = 0;
  virtual Status EventSynchronize(EventHandle event) = 0;
  // Blocks until everything enqueued on `stream` so far has run; returns the
  // first error the stream hit since the last synchronisation, if any.
  virtual Status StreamSynchronize(StreamHandle stream) = 0;
  // Blocks until every stream of this backend is idle.
  virtual Status DeviceSynchronize() = 0;

  // ---- copies (bytes) ----
  // Host to device: `src` is host memory (pinned for true asynchrony).
  virtual Status MemcpyH2DAsync(void* dst, const void* src, uint64_t bytes,
                                StreamHandle stream) = 0;
  virtual Status MemcpyD2HAsync(void* dst, const void* src, uint64_t bytes,
                                StreamHandle stream) = 0;
  virtual Status MemcpyD2DAsync(void* dst, const void* src, uint64_t bytes,
                                StreamHandle stream) = 0;
  // Sets `bytes` bytes of device memory at `dst` to `value`.
  virtual Status MemsetAsync(void* dst, uint8_t value, uint64_t bytes,
                             StreamHandle stream) = 0;

  // Runs `fn` on a backend thread once `stream` reaches this point; later
  // work on the stream waits for it to return.
  virtual Status LaunchHostFunc(StreamHandle stream,
                                std::function<void()> fn) = 0;

  // ---- host memory ----
  // Page-locks [ptr, ptr+bytes) for DMA (cudaHostRegister, portable to all
  // devices). The emulation only checks its arguments.
  virtual Status HostRegister(void* ptr, uint64_t bytes) = 0;
  virtual Status HostUnregister(void* ptr) = 0;

 protected:
  DeviceBackend() = default;
};

struct HostDeviceOptions {
  // Emulated device memory, bytes; Alloc beyond it is ResourceExhausted, as a
  // full GPU would be. 0: unlimited.
  uint64_t memory_bytes = 0;
  // Freed blocks kept for reuse by an Alloc of the same rounded size, bytes
  // at most (oldest dropped first), as CUDA's stream-ordered pool keeps
  // them: a fresh block of host memory costs a page fault per 4 KiB on first
  // touch, which made every gather of a large parameter fault its way in.
  // 0 keeps none. Sanitizer builds keep none by default (a reused block
  // would hide a use after free).
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  uint64_t cache_bytes = 0;
#else
  uint64_t cache_bytes = uint64_t{1} << 30;
#endif
};

// The host emulation. Never fails except on thread creation.
Result<std::unique_ptr<DeviceBackend>> CreateHostDeviceBackend(
    const HostDeviceOptions& options = {});

// The CUDA backend on device `device`. Unavailable, with the reason, when
// built without the toolkit, when the runtime library cannot be loaded
// (naming what was tried), when the runtime finds no driver or no device,
// or when `device` is out of range.
Result<std::unique_ptr<DeviceBackend>> CreateCudaDeviceBackend(int device);

// Whether CreateCudaDeviceBackend(0) can work here; if not and `why` is not
// null, sets it to the reason ("built without the CUDA toolkit",
// "the CUDA runtime (libcudart) cannot be loaded: ...",
// "cudaGetDeviceCount: CUDA driver version is insufficient ...", ...).
// Loads the runtime on its first call.
bool CudaDeviceAvailable(std::string* why);

}  // namespace ztier::tiering
