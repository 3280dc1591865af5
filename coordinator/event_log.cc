#include "coordinator/event_log.h"

#include <cerrno>

#include <fmt/format.h>

namespace ztier::coordinator {

std::string_view EventKindName(EventKind kind) {
  switch (kind) {
    case EventKind::kFetch: return "fetch";
    case EventKind::kPrefetch: return "prefetch";
    case EventKind::kWait: return "wait";
    case EventKind::kNvmeRead: return "nvme_read";
    case EventKind::kNvmeWrite: return "nvme_write";
    case EventKind::kRelease: return "release";
    case EventKind::kTraceComplete: return "trace_complete";
    case EventKind::kTraceInvalidated: return "trace_invalidated";
    case EventKind::kTraceFollow: return "trace_follow";
    case EventKind::kTraceSwitch: return "trace_switch";
    case EventKind::kTraceResync: return "trace_resync";
    case EventKind::kTraceOff: return "trace_off";
    case EventKind::kTraceLearned: return "trace_learned";
    case EventKind::kHintPrefetch: return "hint_prefetch";
    case EventKind::kSpeculate: return "speculate";
    case EventKind::kSpeculationWasted: return "speculation_wasted";
  }
  return "?";
}

std::string EventToJson(const CoordEvent& e) {
  std::string s = fmt::format(R"({{"step": {}, "seq": {}, "module": {}, "event": "{}", "params": [)",
                              e.step, e.seq, e.module, EventKindName(e.kind));
  for (size_t i = 0; i < e.params.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(e.params[i]);
  }
  s += fmt::format(R"(], "numel": {})", e.numel);
  if (e.order >= 0) s += fmt::format(R"(, "order": {})", e.order);
  if (e.slot >= 0) s += fmt::format(R"(, "slot": {})", e.slot);
  if (!e.note.empty()) s += fmt::format(R"(, "note": "{}")", e.note);
  s += "}";
  return s;
}

Result<std::unique_ptr<JsonLinesSink>> JsonLinesSink::Open(const std::string& path) {
  FILE* f = fopen(path.c_str(), "w");
  if (f == nullptr) return Status::FromErrno(errno, "open event log " + path);
  return std::unique_ptr<JsonLinesSink>(new JsonLinesSink(f, path));
}

JsonLinesSink::~JsonLinesSink() { (void)Close(); }

void JsonLinesSink::OnEvent(const CoordEvent& event) {
  if (f_ == nullptr) return;
  std::string line = EventToJson(event);
  line += '\n';
  if (fwrite(line.data(), 1, line.size(), f_) != line.size()) failed_ = true;
}

Status JsonLinesSink::Close() {
  if (f_ == nullptr) return Status::Ok();
  bool bad = failed_ || fflush(f_) != 0;
  int err = errno;
  fclose(f_);
  f_ = nullptr;
  if (bad) return Status::FromErrno(err ? err : EIO, "write event log " + path_);
  return Status::Ok();
}

}  // namespace ztier::coordinator
