#include "cli/timeline.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <map>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

namespace ztier::cli {

using coordinator::TimelineStage;

void TimelineRecorder::Add(const Record& r) {
  std::lock_guard<std::mutex> lock(mu_);
  if (records_.size() >= max_spans_) {
    ++dropped_;
    return;
  }
  records_.push_back(r);
}

void TimelineRecorder::Span(uint32_t rank, TimelineStage stage, uint64_t id, TimePoint begin,
                            TimePoint end) {
  Add({rank, static_cast<int>(stage), id,
       std::chrono::duration_cast<std::chrono::nanoseconds>(begin - origin_).count(),
       std::chrono::duration_cast<std::chrono::nanoseconds>(end - origin_).count()});
}

void TimelineRecorder::Step(uint32_t rank, uint64_t step, TimePoint begin, TimePoint end) {
  Add({rank, kStepTrack, step,
       std::chrono::duration_cast<std::chrono::nanoseconds>(begin - origin_).count(),
       std::chrono::duration_cast<std::chrono::nanoseconds>(end - origin_).count()});
}

size_t TimelineRecorder::spans() const {
  std::lock_guard<std::mutex> lock(mu_);
  return records_.size();
}

uint64_t TimelineRecorder::dropped() const {
  std::lock_guard<std::mutex> lock(mu_);
  return dropped_;
}

namespace {

// Track order inside a rank, top to bottom: what the step does, then the
// pipeline from the drive to the device.
int TrackOrder(int stage) {
  switch (stage) {
    case -1: return 0;  // step
    case static_cast<int>(TimelineStage::kFetchStall): return 1;
    case static_cast<int>(TimelineStage::kCompute): return 2;
    case static_cast<int>(TimelineStage::kNvmeRead): return 3;
    case static_cast<int>(TimelineStage::kH2d): return 4;
    case static_cast<int>(TimelineStage::kCollective): return 5;
    default: return 6;
  }
}

std::string StageName(int stage) {
  if (stage < 0) return "step";
  return std::string(coordinator::TimelineStageName(static_cast<TimelineStage>(stage)));
}

}  // namespace

Status TimelineRecorder::Write(const std::string& path, const Names& names) const {
  std::vector<Record> recs;
  {
    std::lock_guard<std::mutex> lock(mu_);
    recs = records_;
  }
  std::sort(recs.begin(), recs.end(), [](const Record& a, const Record& b) {
    return a.begin_ns != b.begin_ns ? a.begin_ns < b.begin_ns : a.end_ns > b.end_ns;
  });
  // Lanes: per (rank, stage), the end times of the spans last placed on each
  // sub-track; a span goes to the first lane that is free at its begin.
  std::map<std::pair<uint32_t, int>, std::vector<int64_t>> lanes;
  nlohmann::json events = nlohmann::json::array();
  std::map<std::pair<uint32_t, int>, std::string> track_names;  // (rank, tid)
  for (const Record& r : recs) {
    auto& ends = lanes[{r.rank, r.stage}];
    size_t lane = 0;
    while (lane < ends.size() && ends[lane] > r.begin_ns) ++lane;
    if (lane == ends.size()) ends.push_back(0);
    ends[lane] = std::max(r.end_ns, r.begin_ns);
    const int tid = TrackOrder(r.stage) * 1000 + static_cast<int>(lane);
    auto& tname = track_names[{r.rank, tid}];
    if (tname.empty()) {
      tname = StageName(r.stage) + (lane ? fmt::format(" #{}", lane + 1) : "");
    }
    std::string name;
    nlohmann::json args;
    if (r.stage < 0) {
      name = fmt::format("step {}", r.id);
      args["step"] = r.id;
    } else if (r.stage == static_cast<int>(TimelineStage::kCompute) ||
               r.stage == static_cast<int>(TimelineStage::kFetchStall)) {
      name = names.module ? names.module(r.id) : fmt::format("module {}", r.id);
      args["module"] = r.id;
    } else {
      name = names.param ? names.param(r.id) : fmt::format("param {}", r.id);
      args["param"] = r.id;
    }
    events.push_back({{"name", name},
                      {"cat", StageName(r.stage)},
                      {"ph", "X"},
                      {"ts", static_cast<double>(r.begin_ns) / 1e3},
                      {"dur", static_cast<double>(std::max<int64_t>(0, r.end_ns - r.begin_ns)) / 1e3},
                      {"pid", r.rank},
                      {"tid", tid},
                      {"args", args}});
  }
  std::map<uint32_t, bool> ranks;
  for (const auto& [key, tname] : track_names) {
    ranks[key.first] = true;
    events.push_back({{"name", "thread_name"}, {"ph", "M"}, {"pid", key.first},
                      {"tid", key.second}, {"args", {{"name", tname}}}});
    events.push_back({{"name", "thread_sort_index"}, {"ph", "M"}, {"pid", key.first},
                      {"tid", key.second}, {"args", {{"sort_index", key.second}}}});
  }
  for (const auto& [rank, unused] : ranks) {
    events.push_back({{"name", "process_name"}, {"ph", "M"}, {"pid", rank},
                      {"args", {{"name", fmt::format("rank {}", rank)}}}});
    events.push_back({{"name", "process_sort_index"}, {"ph", "M"}, {"pid", rank},
                      {"args", {{"sort_index", rank}}}});
  }
  nlohmann::json doc = {{"traceEvents", std::move(events)}, {"displayTimeUnit", "ms"}};
  const std::string text = doc.dump();
  // A target that exists and is not a regular file (/dev/null, a pipe) is
  // written in place: renaming over it would replace the device node.
  struct stat st{};
  const bool special = stat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode);
  // Otherwise written beside the target and renamed into place, so a failed
  // write never leaves a truncated timeline under the final name.
  const std::string tmp = special ? path : path + ".tmp";
  FILE* f = fopen(tmp.c_str(), "w");
  if (f == nullptr) return Status::FromErrno(errno, fmt::format("opening {}", tmp));
  const bool ok = fwrite(text.data(), 1, text.size(), f) == text.size();
  const bool closed = fclose(f) == 0;
  if (!ok || !closed || (!special && rename(tmp.c_str(), path.c_str()) != 0)) {
    const int err = errno;
    if (!special) unlink(tmp.c_str());
    return Status::FromErrno(err ? err : EIO, fmt::format("writing {}", path));
  }
  return Status::Ok();
}

}  // namespace ztier::cli
