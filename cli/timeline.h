// TimelineRecorder: collects the stage spans of a `ztier bench step` run
// (the coordinator's NVMe reads, copies and gathers, and the benchmark's
// compute and fetch stalls) and writes them as a Chrome trace-event JSON
// file, which Perfetto (ui.perfetto.dev) and chrome://tracing open.
//
// Layout of the file: one process per rank ("rank 0", ...) and in it one
// track per stage ("step", "fetch stall", "compute", "nvme read", "h2d",
// "collective"). Spans of one stage that overlap in time (reads in flight
// together) go to numbered sub-tracks ("nvme read", "nvme read #2", ...),
// so that every span is drawn whole. Times are microseconds from the start
// of the run.
//
// Thread-safety: Span and Step may be called from any thread at once; Write
// only after the run.
#pragma once

#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include "base/status.h"
#include "coordinator/timeline_sink.h"

namespace ztier::cli {

class TimelineRecorder : public coordinator::TimelineSink {
 public:
  // Spans beyond `max_spans` are counted and dropped (bounded memory).
  explicit TimelineRecorder(TimePoint origin, size_t max_spans = 4'000'000)
      : origin_(origin), max_spans_(max_spans) {}

  void Span(uint32_t rank, coordinator::TimelineStage stage, uint64_t id, TimePoint begin,
            TimePoint end) override;
  // One training step of `rank` (drawn on the "step" track).
  void Step(uint32_t rank, uint64_t step, TimePoint begin, TimePoint end);

  size_t spans() const;
  uint64_t dropped() const;

  // Names for the span labels: parameter id -> name, module id -> name
  // (empty: "param 7", "module 3").
  struct Names {
    std::function<std::string(uint64_t)> param;
    std::function<std::string(uint64_t)> module;
  };
  Status Write(const std::string& path, const Names& names) const;

 private:
  struct Record {
    uint32_t rank;
    int stage;  // TimelineStage, or kStepTrack
    uint64_t id;
    int64_t begin_ns, end_ns;  // from origin_
  };
  static constexpr int kStepTrack = -1;
  void Add(const Record& r);

  const TimePoint origin_;
  const size_t max_spans_;
  mutable std::mutex mu_;
  std::vector<Record> records_;
  uint64_t dropped_ = 0;
};

}  // namespace ztier::cli
