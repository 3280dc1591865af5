#include "base/status.h"

#include <cerrno>
#include <cstring>
#include <string>

namespace ztier {

std::string_view StatusCodeName(StatusCode code) {
  switch (code) {
    case StatusCode::kOk: return "OK";
    case StatusCode::kInvalidArgument: return "InvalidArgument";
    case StatusCode::kNotFound: return "NotFound";
    case StatusCode::kIoError: return "IoError";
    case StatusCode::kUnavailable: return "Unavailable";
    case StatusCode::kResourceExhausted: return "ResourceExhausted";
    case StatusCode::kFailedPrecondition: return "FailedPrecondition";
    case StatusCode::kCorruption: return "Corruption";
    case StatusCode::kCancelled: return "Cancelled";
    case StatusCode::kInternal: return "Internal";
  }
  return "Unknown";
}

Status Status::FromErrno(int err, std::string_view what) {
  if (err < 0) err = -err;
  char buf[128];
  // GNU strerror_r returns the text (possibly static), not an int.
  const char* text = strerror_r(err, buf, sizeof(buf));
  std::string msg(what);
  msg += ": ";
  msg += text;
  msg += " (errno ";
  msg += std::to_string(err);
  msg += ")";
  StatusCode code = StatusCode::kIoError;
  switch (err) {
    case ENOSPC:
    case ENOMEM:
    case EDQUOT: code = StatusCode::kResourceExhausted; break;
    case ENOENT: code = StatusCode::kNotFound; break;
    case EINVAL: code = StatusCode::kInvalidArgument; break;
    case ECANCELED: code = StatusCode::kCancelled; break;
    default: break;
  }
  return Status(code, err, std::move(msg));
}

std::string Status::ToString() const {
  if (ok()) return "OK";
  std::string s(StatusCodeName(code()));
  s += ": ";
  s += state_->msg;
  return s;
}

Status Status::WithContext(std::string_view prefix) const {
  if (ok()) return *this;
  std::string msg(prefix);
  msg += ": ";
  msg += state_->msg;
  return Status(state_->code, state_->err, std::move(msg));
}

}  // namespace ztier
