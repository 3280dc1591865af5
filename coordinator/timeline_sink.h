// TimelineSink: where the coordinator reports the spans of its pipeline
// stages (an NVMe read, a host-to-device copy, an all-gather) so that a
// benchmark can draw a timeline of one step. Times are steady_clock points
// taken on the host when a stage is issued and when its completion is seen.
//
// Optional: with no sink (CoordinatorDeps.timeline == nullptr) nothing is
// recorded and no extra device work is queued.
//
// Thread-safety: Span is called from the training thread, the I/O thread and
// the device backend's stream threads (or CUDA's callback thread), possibly
// at once; an implementation must be thread-safe, must not block for long
// and must not call back into the coordinator or the device.
#pragma once

#include <chrono>
#include <cstdint>
#include <string_view>

namespace ztier::coordinator {

enum class TimelineStage : uint8_t {
  kNvmeRead = 0,  // swap-in issued .. read completed (I/O thread)
  kH2d,           // host-to-device copy enqueued .. seen complete
  kCollective,    // all-gather after the copy .. seen complete (world > 1)
  kCompute,       // the module's compute (the caller's, after Fetch)
  kFetchStall,    // duration of a Fetch call (the training thread waits)
  kCount
};

inline std::string_view TimelineStageName(TimelineStage s) {
  switch (s) {
    case TimelineStage::kNvmeRead: return "nvme read";
    case TimelineStage::kH2d: return "h2d";
    case TimelineStage::kCollective: return "collective";
    case TimelineStage::kCompute: return "compute";
    case TimelineStage::kFetchStall: return "fetch stall";
    case TimelineStage::kCount: break;
  }
  return "?";
}

class TimelineSink {
 public:
  using TimePoint = std::chrono::steady_clock::time_point;
  virtual ~TimelineSink() = default;
  // One span of `stage` on `rank`; `id` is the parameter id (or module id
  // for compute and fetch stall).
  virtual void Span(uint32_t rank, TimelineStage stage, uint64_t id, TimePoint begin,
                    TimePoint end) = 0;
};

}  // namespace ztier::coordinator
