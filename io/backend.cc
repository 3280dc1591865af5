// Backend names, parsing, the run-time choice among backends, and the
// factories of backends this build leaves out.
#include "io/backend.h"

#include <cctype>
#include <string>
#include <utility>

#include "base/log.h"

namespace ztier::io {

std::string_view OpName(Op op) {
  switch (op) {
    case Op::kRead:
      return "read";
    case Op::kWrite:
      return "write";
  }
  return "?";
}

std::string_view BackendKindName(BackendKind kind) {
  switch (kind) {
    case BackendKind::kAuto:
      return "auto";
    case BackendKind::kIoUring:
      return "io_uring";
    case BackendKind::kLibaio:
      return "libaio";
    case BackendKind::kPsync:
      return "psync";
  }
  return "?";
}

Result<BackendKind> ParseBackendKind(std::string_view name) {
  std::string lower(name);
  for (char& c : lower) {
    c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  }
  if (lower == "auto") return BackendKind::kAuto;
  if (lower == "io_uring" || lower == "uring") return BackendKind::kIoUring;
  if (lower == "libaio" || lower == "aio") return BackendKind::kLibaio;
  if (lower == "psync") return BackendKind::kPsync;
  return Status::InvalidArgument(
      "unknown I/O backend '" + std::string(name) +
      "': valid names are auto, io_uring (or uring), libaio (or aio), psync");
}

bool BackendCompiled(BackendKind kind) {
  switch (kind) {
    case BackendKind::kAuto:
      return true;
    case BackendKind::kIoUring:
#ifdef ZTIER_HAVE_IO_URING
      return true;
#else
      return false;
#endif
    case BackendKind::kLibaio:
#ifdef ZTIER_HAVE_LIBAIO
      return true;
#else
      return false;
#endif
    case BackendKind::kPsync:
      return true;
  }
  return false;
}

#ifndef ZTIER_HAVE_IO_URING
Result<std::unique_ptr<Backend>> CreateIoUringBackend(const BackendOptions&) {
  return Status::Unavailable(
      "io_uring backend not compiled in: liburing was not found when ztier "
      "was configured (apt-get install liburing-dev, then reconfigure with "
      "-DZTIER_WITH_IO_URING=ON)");
}
#endif

#ifndef ZTIER_HAVE_LIBAIO
Result<std::unique_ptr<Backend>> CreateLibaioBackend(const BackendOptions&) {
  return Status::Unavailable(
      "libaio backend not compiled in: libaio was not found when ztier was "
      "configured (apt-get install libaio-dev, then reconfigure with "
      "-DZTIER_WITH_LIBAIO=ON)");
}
#endif

namespace {

Result<std::unique_ptr<Backend>> CreateExplicit(BackendKind kind,
                                                const BackendOptions& options) {
  switch (kind) {
    case BackendKind::kIoUring:
      return CreateIoUringBackend(options);
    case BackendKind::kLibaio:
      return CreateLibaioBackend(options);
    case BackendKind::kPsync:
      return CreatePsyncBackend(options);
    case BackendKind::kAuto:
      break;
  }
  return Status::Internal("CreateExplicit called with kAuto");
}

}  // namespace

Result<std::unique_ptr<Backend>> CreateBackend(BackendKind kind,
                                               const BackendOptions& options) {
  if (options.queue_depth == 0) {
    return Status::InvalidArgument("I/O queue_depth must be at least 1");
  }
  if (kind != BackendKind::kAuto) {
    Result<std::unique_ptr<Backend>> backend = CreateExplicit(kind, options);
    if (backend.ok()) {
      Log(LogLevel::kDebug, "io backend: {} (queue_depth {})",
          BackendKindName(kind), options.queue_depth);
    }
    return backend;
  }

  // Preference order: io_uring batches submissions and supports registered
  // buffers and files; libaio still avoids a thread per request; psync works
  // everywhere.
  constexpr BackendKind kOrder[] = {BackendKind::kIoUring, BackendKind::kLibaio,
                                    BackendKind::kPsync};
  std::string skipped;
  for (BackendKind candidate : kOrder) {
    Result<std::unique_ptr<Backend>> backend =
        CreateExplicit(candidate, options);
    if (backend.ok()) {
      if (skipped.empty()) {
        Log(LogLevel::kInfo, "io backend: {} (auto, queue_depth {})",
            BackendKindName(candidate), options.queue_depth);
      } else {
        Log(LogLevel::kInfo, "io backend: {} (auto, queue_depth {}; {})",
            BackendKindName(candidate), options.queue_depth, skipped);
      }
      return backend;
    }
    // Only "not available here" moves on to the next backend; a caller error
    // (bad option) or a bug would fail the same way everywhere, so it is
    // returned rather than hidden behind a slower backend.
    if (backend.status().code() != StatusCode::kUnavailable) {
      return backend.status().WithContext(
          fmt::format("io backend auto: {}", BackendKindName(candidate)));
    }
    if (!skipped.empty()) skipped += "; ";
    skipped += fmt::format("{} skipped: {}", BackendKindName(candidate),
                           backend.status().message());
  }
  return Status::Unavailable("no I/O backend is available: " + skipped);
}

}  // namespace ztier::io
