#include "base/log.h"

#include <atomic>
#include <memory>
#include <mutex>

namespace ztier {
namespace {

struct SinkState {
  std::mutex mu;
  std::shared_ptr<LogSink> sink;
  std::atomic<int> min_level{static_cast<int>(LogLevel::kInfo)};
  std::atomic<bool> has_sink{false};
};

SinkState& State() {
  static SinkState* state = new SinkState();  // never destroyed: safe at exit
  return *state;
}

}  // namespace

std::string_view LogLevelName(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug: return "debug";
    case LogLevel::kInfo: return "info";
    case LogLevel::kWarning: return "warning";
    case LogLevel::kError: return "error";
  }
  return "?";
}

void SetLogSink(LogSink sink, LogLevel min_level) {
  SinkState& s = State();
  std::lock_guard<std::mutex> lock(s.mu);
  s.has_sink = static_cast<bool>(sink);
  s.sink = sink ? std::make_shared<LogSink>(std::move(sink)) : nullptr;
  s.min_level = static_cast<int>(min_level);
}

bool LogEnabled(LogLevel level) {
  SinkState& s = State();
  return s.has_sink.load(std::memory_order_relaxed) &&
         static_cast<int>(level) >= s.min_level.load(std::memory_order_relaxed);
}

void LogMessage(LogLevel level, std::string_view message) {
  SinkState& s = State();
  std::shared_ptr<LogSink> sink;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    sink = s.sink;
  }
  if (sink && *sink) (*sink)(level, message);
}

}  // namespace ztier
