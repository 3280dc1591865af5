// Logging: the library never prints; it hands each message to a sink that
// the embedding program installs (the CLI prints to stderr, a trainer may
// forward to its own logger). With no sink installed, messages are dropped.
//
// Thread-safety: SetLogSink may be called at any time; Log() may be called
// from any thread. The sink itself must be safe to call concurrently.
#pragma once

#include <functional>
#include <string>
#include <string_view>

#include <fmt/format.h>

namespace ztier {

enum class LogLevel : int { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

std::string_view LogLevelName(LogLevel level);

using LogSink = std::function<void(LogLevel, std::string_view message)>;

// Installs `sink` (empty function: drop everything). Messages below
// `min_level` never reach the sink.
void SetLogSink(LogSink sink, LogLevel min_level = LogLevel::kInfo);

bool LogEnabled(LogLevel level);
void LogMessage(LogLevel level, std::string_view message);

template <typename... Args>
void Log(LogLevel level, fmt::format_string<Args...> f, Args&&... args) {
  if (!LogEnabled(level)) return;
  LogMessage(level, fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace ztier
