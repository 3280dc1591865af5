// The host emulation of DeviceBackend (see device.h): device memory is
// aligned host memory, each stream is a FIFO served by its own thread, events
// are markers that a stream's thread completes when it reaches them.
//
// Locking: `mu_` guards the backend's tables (streams, events, allocations,
// registrations); each HostStream has its own mutex for its queue; each
// Marker its own for its completion flag. No lock is held while a task runs,
// so a host callback may enqueue more work without deadlocking.
#include <fmt/format.h>
#include <stdlib.h>

#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "tiering/device.h"

namespace ztier::tiering {
namespace {

// cudaMalloc's guaranteed alignment, kept so code tested here holds on GPUs.
constexpr uint64_t kDeviceAlignment = 256;  // bytes

// One recorded point of a stream. Each RecordEvent makes a new one, so a wait
// targets exactly the record that was current when it was issued, however
// often the event is recorded again afterwards.
struct Marker {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;

  void Complete() {
    {
      std::lock_guard<std::mutex> lock(mu);
      done = true;
    }
    cv.notify_all();
  }
  void Wait() {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [this] { return done; });
  }
  bool Done() {
    std::lock_guard<std::mutex> lock(mu);
    return done;
  }
};

struct HostEvent {
  std::mutex mu;
  std::shared_ptr<Marker> latest;  // null: never recorded (complete)

  std::shared_ptr<Marker> Latest() {
    std::lock_guard<std::mutex> lock(mu);
    return latest;
  }
};

using Task = std::function<Status()>;

// An ordered work queue with its own worker thread.
class HostStream {
 public:
  HostStream() : thread_([this] { Run(); }) {}
  ~HostStream() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    work_cv_.notify_all();
    thread_.join();
  }

  // Fails only once the stream is being destroyed.
  Status Enqueue(Task task) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) {
        return Status::FailedPrecondition("device stream is being destroyed");
      }
      queue_.push_back(std::move(task));
      ++enqueued_;
    }
    work_cv_.notify_one();
    return Status::Ok();
  }

  // Waits for everything enqueued before the call; returns (and clears) the
  // first error a task reported since the last synchronisation.
  Status Synchronize() {
    std::unique_lock<std::mutex> lock(mu_);
    const uint64_t target = enqueued_;
    idle_cv_.wait(lock, [&] { return completed_ >= target; });
    Status error = std::move(error_);
    error_ = Status::Ok();
    return error;
  }

  // Waits like Synchronize but leaves any error for the stream's owner.
  void WaitIdle() {
    std::unique_lock<std::mutex> lock(mu_);
    const uint64_t target = enqueued_;
    idle_cv_.wait(lock, [&] { return completed_ >= target; });
  }

 private:
  void Run() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      work_cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      // Drain what is queued even when stopping: destruction waits for work.
      if (queue_.empty()) return;
      Task task = std::move(queue_.front());
      queue_.pop_front();
      lock.unlock();
      Status s = task();
      task = nullptr;  // release captures (markers, buffers) outside the lock
      lock.lock();
      if (!s.ok() && error_.ok()) error_ = std::move(s);
      ++completed_;
      idle_cv_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable work_cv_;
  std::condition_variable idle_cv_;
  std::deque<Task> queue_;
  uint64_t enqueued_ = 0;   // tasks ever enqueued
  uint64_t completed_ = 0;  // tasks ever run
  bool stopping_ = false;
  Status error_;
  std::thread thread_;  // last: starts after the members above exist
};

class HostDeviceBackend final : public DeviceBackend {
 public:
  explicit HostDeviceBackend(const HostDeviceOptions& options)
      : capacity_(options.memory_bytes), cache_limit_(options.cache_bytes) {}

  ~HostDeviceBackend() override {
    std::unordered_map<void*, std::shared_ptr<HostStream>> streams;
    {
      std::lock_guard<std::mutex> lock(mu_);
      streams.swap(streams_);
    }
    streams.clear();  // joins each worker after its queue drains
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [addr, bytes] : allocations_)
      free(reinterpret_cast<void*>(addr));
    for (auto& [ptr, bytes] : cache_) free(ptr);
    for (auto& [p, event] : events_) delete event;
  }

  std::string_view name() const override { return "host"; }
  std::string description() const override {
    if (capacity_ == 0) return "host emulation (unlimited memory)";
    return fmt::format("host emulation ({} bytes of device memory)", capacity_);
  }
  bool pins_host_memory() const override { return false; }

  Result<void*> Alloc(uint64_t bytes, StreamHandle stream) override {
    if (bytes == 0) return Status::InvalidArgument("device Alloc of 0 bytes");
    if (stream) {
      auto s = FindStream(stream);
      if (!s.ok()) return s.status();
    }
    const uint64_t rounded =
        (bytes + kDeviceAlignment - 1) / kDeviceAlignment * kDeviceAlignment;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (capacity_ != 0 && used_ + rounded > capacity_) {
        return Status::ResourceExhausted(fmt::format(
            "device Alloc of {} bytes: out of emulated device memory ({} of {} "
            "bytes in use)",
            bytes, used_, capacity_));
      }
      used_ += rounded;
    }
    void* p = TakeCached(rounded);
    if (p == nullptr) p = aligned_alloc(kDeviceAlignment, rounded);
    std::lock_guard<std::mutex> lock(mu_);
    if (p == nullptr) {
      used_ -= rounded;
      return Status::ResourceExhausted(fmt::format(
          "device Alloc of {} bytes: host allocation failed", bytes));
    }
    allocations_[reinterpret_cast<uintptr_t>(p)] = rounded;
    return p;
  }

  Status Free(void* ptr, StreamHandle stream) override {
    if (ptr == nullptr) return Status::Ok();  // as cudaFree(nullptr)
    std::shared_ptr<HostStream> s;
    if (stream) {
      auto found = FindStream(stream);
      if (!found.ok()) return found.status();
      s = std::move(found.value());
    }
    uint64_t bytes = 0;
    {
      // Forget the allocation now, so that later copies into it and a second
      // Free are caught at the call; the memory itself goes when the stream
      // gets there.
      std::lock_guard<std::mutex> lock(mu_);
      auto it = allocations_.find(reinterpret_cast<uintptr_t>(ptr));
      if (it == allocations_.end()) {
        return Status::InvalidArgument(fmt::format(
            "device Free of {}: not a live device allocation (double free, or "
            "not from Alloc)",
            ptr));
      }
      bytes = it->second;
      allocations_.erase(it);
    }
    auto release = [this, ptr, bytes] {
      std::vector<void*> evicted;
      bool ptr_cached = false;
      {
        std::lock_guard<std::mutex> lock(mu_);
        used_ -= bytes;
        if (bytes <= cache_limit_) {
          cache_.emplace_back(ptr, bytes);
          cached_bytes_ += bytes;
          ptr_cached = true;
          while (cached_bytes_ > cache_limit_) {
            evicted.push_back(cache_.front().first);
            cached_bytes_ -= cache_.front().second;
            cache_.pop_front();
          }
        }
      }
      if (!ptr_cached) free(ptr);
      for (void* e : evicted) free(e);
    };
    if (s) {
      return s->Enqueue([release] {
        release();
        return Status::Ok();
      });
    }
    // As cudaFree: wait for the whole device, without consuming the streams'
    // errors (they belong to whoever synchronises those streams).
    for (auto& stream : AllStreams()) stream->WaitIdle();
    release();
    return Status::Ok();
  }

  // A cached free block of exactly `bytes`, or nullptr.
  void* TakeCached(uint64_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = cache_.begin(); it != cache_.end(); ++it) {
      if (it->second != bytes) continue;
      void* p = it->first;
      cached_bytes_ -= bytes;
      cache_.erase(it);
      return p;
    }
    return nullptr;
  }

  Status MemInfo(uint64_t* free_bytes, uint64_t* total_bytes) override {
    std::lock_guard<std::mutex> lock(mu_);
    const uint64_t total = capacity_ != 0 ? capacity_ : UINT64_MAX;
    if (free_bytes) *free_bytes = total - used_;
    if (total_bytes) *total_bytes = total;
    return Status::Ok();
  }

  Result<StreamHandle> CreateStream() override {
    auto stream = std::make_shared<HostStream>();
    StreamHandle h{stream.get()};
    std::lock_guard<std::mutex> lock(mu_);
    streams_[h.p] = std::move(stream);
    return h;
  }

  Status DestroyStream(StreamHandle stream) override {
    std::shared_ptr<HostStream> s;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = streams_.find(stream.p);
      if (it == streams_.end()) return BadStream(stream);
      s = std::move(it->second);
      streams_.erase(it);
    }
    Status status = s->Synchronize();
    s.reset();  // joins the worker unless a concurrent caller still holds it
    return status;
  }

  Result<EventHandle> CreateEvent() override {
    auto* event = new HostEvent();
    std::lock_guard<std::mutex> lock(mu_);
    events_[event] = event;
    return EventHandle{event};
  }

  Status DestroyEvent(EventHandle event) override {
    HostEvent* e = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = events_.find(event.p);
      if (it == events_.end()) return BadEvent(event);
      e = it->second;
      events_.erase(it);
    }
    // Pending markers are owned by the tasks that complete them.
    delete e;
    return Status::Ok();
  }

  Status RecordEvent(EventHandle event, StreamHandle stream) override {
    auto s = FindStream(stream);
    if (!s.ok()) return s.status();
    auto marker = std::make_shared<Marker>();
    std::lock_guard<std::mutex> lock(mu_);  // keeps the event alive
    auto it = events_.find(event.p);
    if (it == events_.end()) return BadEvent(event);
    // Enqueue and publish under the event's lock, so that a concurrent
    // StreamWaitEvent sees either the old marker or this enqueued one.
    std::lock_guard<std::mutex> event_lock(it->second->mu);
    ZTIER_RETURN_IF_ERROR(s.value()->Enqueue([marker] {
      marker->Complete();
      return Status::Ok();
    }));
    it->second->latest = std::move(marker);
    return Status::Ok();
  }

  Status StreamWaitEvent(StreamHandle stream, EventHandle event) override {
    auto s = FindStream(stream);
    if (!s.ok()) return s.status();
    auto marker = LatestMarker(event);
    if (!marker.ok()) return marker.status();
    if (!marker.value())
      return Status::Ok();  // never recorded: nothing to wait
    std::shared_ptr<Marker> m = std::move(marker.value());
    return s.value()->Enqueue([m] {
      m->Wait();
      return Status::Ok();
    });
  }

  Result<bool> EventQuery(EventHandle event) override {
    auto marker = LatestMarker(event);
    if (!marker.ok()) return marker.status();
    return !marker.value() || marker.value()->Done();
  }

  Status EventSynchronize(EventHandle event) override {
    auto marker = LatestMarker(event);
    if (!marker.ok()) return marker.status();
    if (marker.value()) marker.value()->Wait();
    return Status::Ok();
  }

  Status StreamSynchronize(StreamHandle stream) override {
    auto s = FindStream(stream);
    if (!s.ok()) return s.status();
    return s.value()->Synchronize();
  }

  Status DeviceSynchronize() override {
    Status first;
    for (auto& s : AllStreams()) {
      Status st = s->Synchronize();
      if (!st.ok() && first.ok()) first = std::move(st);
    }
    return first;
  }

  Status MemcpyH2DAsync(void* dst, const void* src, uint64_t bytes,
                        StreamHandle stream) override {
    return Copy("MemcpyH2DAsync", dst, true, src, false, bytes, stream);
  }
  Status MemcpyD2HAsync(void* dst, const void* src, uint64_t bytes,
                        StreamHandle stream) override {
    return Copy("MemcpyD2HAsync", dst, false, src, true, bytes, stream);
  }
  Status MemcpyD2DAsync(void* dst, const void* src, uint64_t bytes,
                        StreamHandle stream) override {
    return Copy("MemcpyD2DAsync", dst, true, src, true, bytes, stream);
  }

  Status MemsetAsync(void* dst, uint8_t value, uint64_t bytes,
                     StreamHandle stream) override {
    auto s = FindStream(stream);
    if (!s.ok()) return s.status();
    if (bytes == 0) return Status::Ok();
    ZTIER_RETURN_IF_ERROR(
        CheckDeviceRange("MemsetAsync destination", dst, bytes));
    return s.value()->Enqueue([dst, value, bytes] {
      std::memset(dst, value, bytes);
      return Status::Ok();
    });
  }

  Status LaunchHostFunc(StreamHandle stream,
                        std::function<void()> fn) override {
    if (!fn) return Status::InvalidArgument("LaunchHostFunc: empty function");
    auto s = FindStream(stream);
    if (!s.ok()) return s.status();
    return s.value()->Enqueue([fn = std::move(fn)]() -> Status {
      try {
        fn();
      } catch (...) {
        return Status::Internal("a host callback on a device stream threw");
      }
      return Status::Ok();
    });
  }

  Status HostRegister(void* ptr, uint64_t bytes) override {
    if (ptr == nullptr || bytes == 0) {
      return Status::InvalidArgument("HostRegister: null pointer or 0 bytes");
    }
    std::lock_guard<std::mutex> lock(mu_);
    auto [it, inserted] =
        registered_.emplace(reinterpret_cast<uintptr_t>(ptr), bytes);
    if (!inserted) {
      return Status::FailedPrecondition(
          fmt::format("HostRegister: {} is already registered", ptr));
    }
    return Status::Ok();
  }

  Status HostUnregister(void* ptr) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (registered_.erase(reinterpret_cast<uintptr_t>(ptr)) == 0) {
      return Status::FailedPrecondition(
          fmt::format("HostUnregister: {} is not registered", ptr));
    }
    return Status::Ok();
  }

 private:
  static Status BadStream(StreamHandle s) {
    return Status::InvalidArgument(fmt::format(
        "device stream {} is not a live stream of this backend", s.p));
  }
  static Status BadEvent(EventHandle e) {
    return Status::InvalidArgument(fmt::format(
        "device event {} is not a live event of this backend", e.p));
  }

  std::vector<std::shared_ptr<HostStream>> AllStreams() {
    std::vector<std::shared_ptr<HostStream>> streams;
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [p, s] : streams_) streams.push_back(s);
    return streams;
  }

  Result<std::shared_ptr<HostStream>> FindStream(StreamHandle stream) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = streams_.find(stream.p);
    if (it == streams_.end()) return BadStream(stream);
    return it->second;
  }

  // The event's latest marker (null if never recorded).
  Result<std::shared_ptr<Marker>> LatestMarker(EventHandle event) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = events_.find(event.p);
    if (it == events_.end()) return BadEvent(event);
    return it->second->Latest();
  }

  // [p, p+bytes) must lie inside one live allocation, as on a GPU where an
  // address outside would fault.
  Status CheckDeviceRange(const char* what, const void* p, uint64_t bytes) {
    if (p == nullptr)
      return Status::InvalidArgument(fmt::format("{} is null", what));
    const auto addr = reinterpret_cast<uintptr_t>(p);
    std::lock_guard<std::mutex> lock(mu_);
    auto it = allocations_.upper_bound(addr);
    if (it != allocations_.begin()) {
      --it;
      if (addr >= it->first && addr - it->first <= it->second &&
          bytes <= it->second - (addr - it->first)) {
        return Status::Ok();
      }
    }
    return Status::InvalidArgument(
        fmt::format("{} [{}, +{} bytes) is not inside a live device allocation",
                    what, p, bytes));
  }

  Status Copy(const char* op, void* dst, bool dst_device, const void* src,
              bool src_device, uint64_t bytes, StreamHandle stream) {
    auto s = FindStream(stream);
    if (!s.ok()) return s.status();
    if (bytes == 0) return Status::Ok();
    const std::string dst_what = fmt::format("{} destination", op);
    const std::string src_what = fmt::format("{} source", op);
    if (dst_device) {
      ZTIER_RETURN_IF_ERROR(CheckDeviceRange(dst_what.c_str(), dst, bytes));
    } else if (dst == nullptr) {
      return Status::InvalidArgument(dst_what + " is null");
    }
    if (src_device) {
      ZTIER_RETURN_IF_ERROR(CheckDeviceRange(src_what.c_str(), src, bytes));
    } else if (src == nullptr) {
      return Status::InvalidArgument(src_what + " is null");
    }
    return s.value()->Enqueue([dst, src, bytes] {
      std::memmove(dst, src, bytes);
      return Status::Ok();
    });
  }

  const uint64_t capacity_;  // bytes, 0 = unlimited
  std::mutex mu_;
  std::unordered_map<void*, std::shared_ptr<HostStream>> streams_;
  std::unordered_map<void*, HostEvent*> events_;
  std::map<uintptr_t, uint64_t> allocations_;  // start -> bytes (rounded)
  std::map<uintptr_t, uint64_t> registered_;   // HostRegister'd start -> bytes
  uint64_t used_ = 0;                          // device bytes not yet freed
  // Freed blocks kept for reuse (HostDeviceOptions::cache_bytes), oldest
  // first: (block, rounded bytes).
  const uint64_t cache_limit_;
  std::deque<std::pair<void*, uint64_t>> cache_;
  uint64_t cached_bytes_ = 0;
};

}  // namespace

Result<std::unique_ptr<DeviceBackend>> CreateHostDeviceBackend(
    const HostDeviceOptions& options) {
  return std::unique_ptr<DeviceBackend>(new HostDeviceBackend(options));
}

#if !defined(ZTIER_HAVE_CUDA)
namespace {
constexpr const char* kNoCuda =
    "built without the CUDA toolkit (reconfigure with CUDAToolkit_ROOT "
    "pointing "
    "at it, or ZTIER_WITH_CUDA=ON to make it required)";
}  // namespace

Result<std::unique_ptr<DeviceBackend>> CreateCudaDeviceBackend(int device) {
  return Status::Unavailable(
      fmt::format("CUDA device {}: {}", device, kNoCuda));
}

bool CudaDeviceAvailable(std::string* why) {
  if (why) *why = kNoCuda;
  return false;
}
#endif

}  // namespace ztier::tiering
