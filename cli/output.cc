#include "cli/output.h"

#include <unistd.h>

#include <array>
#include <ctime>

#include "ztier/ztier.h"

namespace ztier::cli {
namespace {

std::string UtcNow() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  std::array<char, 32> buf{};
  std::strftime(buf.data(), buf.size(), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf.data();
}

std::string HostName() {
  std::array<char, 256> buf{};
  if (gethostname(buf.data(), buf.size() - 1) != 0) return "unknown";
  return buf.data();
}

}  // namespace

int ExitCodeFor(const Status& s) {
  switch (s.code()) {
    case StatusCode::kOk:
      return kExitOk;
    case StatusCode::kInvalidArgument:
    case StatusCode::kNotFound:
      return kExitUsage;
    default:
      return kExitFailure;
  }
}

std::string VersionLine() { return std::string("ztier ") + ZTIER_VERSION_STRING; }

nlohmann::json WithRunInfo(nlohmann::json doc) {
  doc["ztier_version"] = ZTIER_VERSION_STRING;
  doc["time"] = UtcNow();
  doc["host"] = HostName();
  return doc;
}

}  // namespace ztier::cli
