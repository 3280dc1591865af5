// Status: the one error type of ztier's C++ layers.
//
// A Status is either OK (cheap: no allocation) or an error with a code, an
// optional errno and a message that says what failed and how to fix it. It is
// a value type, safe to copy and move between threads. Functions that can fail
// return Status or Result<T> and callers must look at them ([[nodiscard]]).
//
// errno becomes a Status in exactly one place, Status::FromErrno(), so every
// I/O error text has the same shape: "<what>: <strerror> (errno N)".
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace ztier {

enum class StatusCode : uint8_t {
  kOk = 0,
  kInvalidArgument,    // the caller passed something wrong (config, request)
  kNotFound,           // an id, file or key that does not exist
  kIoError,            // the OS or device failed an operation
  kUnavailable,        // a backend / device / library is not present here
  kResourceExhausted,  // out of buffers, memory, disk space
  kFailedPrecondition, // the call is not valid in the current state
  kCorruption,         // data on disk failed its checksum or format check
  kCancelled,          // the operation was cancelled on shutdown
  kInternal,           // a broken invariant inside ztier (a bug)
};

std::string_view StatusCodeName(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;  // OK
  static Status Ok() { return Status(); }

  static Status InvalidArgument(std::string msg) {
    return Status(StatusCode::kInvalidArgument, 0, std::move(msg));
  }
  static Status NotFound(std::string msg) {
    return Status(StatusCode::kNotFound, 0, std::move(msg));
  }
  static Status IoError(std::string msg, int err = 0) {
    return Status(StatusCode::kIoError, err, std::move(msg));
  }
  static Status Unavailable(std::string msg) {
    return Status(StatusCode::kUnavailable, 0, std::move(msg));
  }
  static Status ResourceExhausted(std::string msg) {
    return Status(StatusCode::kResourceExhausted, 0, std::move(msg));
  }
  static Status FailedPrecondition(std::string msg) {
    return Status(StatusCode::kFailedPrecondition, 0, std::move(msg));
  }
  static Status Corruption(std::string msg) {
    return Status(StatusCode::kCorruption, 0, std::move(msg));
  }
  static Status Cancelled(std::string msg) {
    return Status(StatusCode::kCancelled, 0, std::move(msg));
  }
  static Status Internal(std::string msg) {
    return Status(StatusCode::kInternal, 0, std::move(msg));
  }
  // The single place errno becomes a Status. `err` is a positive errno value.
  // The code follows the errno: ENOSPC/ENOMEM -> kResourceExhausted,
  // ENOENT -> kNotFound, EINVAL -> kInvalidArgument, ECANCELED -> kCancelled,
  // ENOSYS/EOPNOTSUPP/EPERM(io_uring) -> kIoError (callers refine).
  static Status FromErrno(int err, std::string_view what);

  bool ok() const { return state_ == nullptr; }
  StatusCode code() const { return state_ ? state_->code : StatusCode::kOk; }
  // Positive errno behind the error, or 0 if none.
  int err() const { return state_ ? state_->err : 0; }
  std::string_view message() const {
    return state_ ? std::string_view(state_->msg) : std::string_view();
  }
  // "IoError: <message>", or "OK".
  std::string ToString() const;

  // Returns a copy whose message is "<prefix>: <message>", same code and errno.
  Status WithContext(std::string_view prefix) const;

 private:
  struct State {
    StatusCode code;
    int err;
    std::string msg;
  };
  Status(StatusCode code, int err, std::string msg)
      : state_(std::make_shared<const State>(
            State{code, err, std::move(msg)})) {}
  // Shared and immutable: copying an error Status costs one refcount.
  std::shared_ptr<const State> state_;
};

// Result<T>: a T or an error Status. Access value() only when ok().
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) {  // NOLINT
    if (std::get<Status>(v_).ok()) {
      v_ = Status::Internal("Result constructed from an OK Status");
    }
  }
  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status& status() const {
    static const Status kOk;
    return ok() ? kOk : std::get<Status>(v_);
  }
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace ztier

// Returns the Status of `expr` from the enclosing function if it is an error.
#define ZTIER_RETURN_IF_ERROR(expr)              \
  do {                                           \
    ::ztier::Status _zt_status = (expr);         \
    if (!_zt_status.ok()) return _zt_status;     \
  } while (0)

#define ZTIER_CONCAT_INNER(a, b) a##b
#define ZTIER_CONCAT(a, b) ZTIER_CONCAT_INNER(a, b)
// Declares `lhs` from a Result<T> expression or returns its error Status.
#define ZTIER_ASSIGN_OR_RETURN(lhs, expr)                          \
  auto ZTIER_CONCAT(_zt_result_, __LINE__) = (expr);               \
  if (!ZTIER_CONCAT(_zt_result_, __LINE__).ok())                   \
    return ZTIER_CONCAT(_zt_result_, __LINE__).status();           \
  lhs = std::move(ZTIER_CONCAT(_zt_result_, __LINE__)).value()
