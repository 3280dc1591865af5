// The coordinator's decision log: one event per decision, in the order taken
// (docs/design.md "Event log"), delivered to an optional sink. JsonLinesSink writes
// the JSON-lines format `ztier replay --events FILE` produces:
//
//   {"step": 1, "seq": 17, "module": 3, "event": "fetch", "params": [7, 8], "numel": 8192}
//
// Trace events add "order", "slot" and "note" where they have them.
//
// Thread-safety: the coordinator calls its sink with its own lock held, from
// the thread that took the decision; sinks must not call back into it.
#pragma once

#include <cstdint>
#include <cstdio>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"

namespace ztier::coordinator {

enum class EventKind : uint8_t {
  kFetch = 0,         // demand all-gather
  kPrefetch,          // all-gather ahead of use
  kWait,              // blocked on an in-flight param
  kNvmeRead,          // swap-in started
  kNvmeWrite,         // write-back started
  kRelease,           // full param freed
  kTraceComplete,     // RECORD -> COMPLETE at reset_step
  kTraceInvalidated,  // single policy: module out of order, prefetch stops, re-record
  // Adaptive policy (docs/design.md "Dynamic traces"); `order` and `slot` say where.
  kTraceFollow,        // a step starts following a known order
  kTraceSwitch,        // ... moves to another order that fits the step so far
  kTraceResync,        // ... skips ahead to the next slot that matches
  kTraceOff,           // a module no known order has a place for (first per step)
  kTraceLearned,       // step end: learned into `order` (note: new, merged, same)
  kHintPrefetch,       // all-gather ahead of use, for a hinted choice
  kSpeculate,          // all-gather ahead of use, for a guessed choice
  kSpeculationWasted,  // params a wrong guess gathered, freed unused
};
std::string_view EventKindName(EventKind kind);

struct CoordEvent {
  uint64_t step = 0;  // training step (reset_step count)
  uint64_t seq = 0;   // decision number within the run
  int64_t module = -1;  // module id, -1 when none
  EventKind kind = EventKind::kFetch;
  std::vector<uint64_t> params;  // in issue order
  uint64_t numel = 0;            // elements of `params` (full parameters)
  int64_t order = -1;            // trace events: the order's number
  int64_t slot = -1;             // trace events: the slot (module position) in it
  std::string note;              // trace_learned: new, merged or same
};

class EventSink {
 public:
  virtual ~EventSink() = default;
  virtual void OnEvent(const CoordEvent& event) = 0;
};

// Formats one event as a JSON line (no trailing newline).
std::string EventToJson(const CoordEvent& event);

// Appends JSON lines to a file.
class JsonLinesSink final : public EventSink {
 public:
  static Result<std::unique_ptr<JsonLinesSink>> Open(const std::string& path);
  ~JsonLinesSink() override;
  void OnEvent(const CoordEvent& event) override;
  Status Close();

 private:
  explicit JsonLinesSink(FILE* f, std::string path) : f_(f), path_(std::move(path)) {}
  FILE* f_;
  std::string path_;
  bool failed_ = false;
};

// Keeps events in memory (tests, replay statistics).
class VectorSink final : public EventSink {
 public:
  void OnEvent(const CoordEvent& event) override {
    std::lock_guard<std::mutex> lock(mu_);
    events_.push_back(event);
  }
  std::vector<CoordEvent> events() const {
    std::lock_guard<std::mutex> lock(mu_);
    return events_;
  }

 private:
  mutable std::mutex mu_;
  std::vector<CoordEvent> events_;
};

}  // namespace ztier::coordinator
