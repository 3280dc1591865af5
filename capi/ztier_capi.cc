// The C API (include/ztier/ztier.h) over one RankRuntime per engine.
//
// Every entry point runs inside Guard(): C++ exceptions become a status and
// a message, never cross the boundary. Engine calls take the engine's mutex
// (the hooks are one training thread's anyway); stats and the async-error
// query read only what is safe from any thread. Handles are checked against
// the set of live engines, so a destroyed handle is refused, not followed.
//
// Initial parameter data: the coordinator lays out the NVMe store once all
// parameters are known (Finalize), so the rank's partition of each
// registered parameter is held here, in host memory, until the first call
// that needs the store (fetch, step end, partition access), then written to
// its tier and dropped.
#include "ztier/ztier.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cerrno>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include <fmt/format.h>

#include "base/status.h"
#include "checkpoint/checkpoint.h"
#include "coordinator/background_step.h"
#include "coordinator/collective.h"
#include "coordinator/coordinator.h"
#include "coordinator/runtime.h"
#include "optim/adam.h"
#include "optim/grad_math.h"
#include "tiering/config.h"

namespace co = ztier::coordinator;
namespace ti = ztier::tiering;
using ztier::Result;
using ztier::Status;
using ztier::StatusCode;

struct ztier_local_group {
  std::shared_ptr<co::LocalGroup> group;
};

struct ztier_engine {
  struct Param {
    uint64_t numel = 0;
    co::DType dtype = co::DType::kFloat32;
    uint64_t part_numel = 0;
    std::vector<uint8_t> pending;  // initial partition until finalize (bytes)
    int64_t spilled_at = -1;       // or: its offset in the engine's spill file
    std::vector<uint8_t> grad;     // gradient partition (bytes), once handed in (host tier)
    bool has_grad = false;
    double sq_norm = 0;            // sum of squares of the gradient partition
    int64_t segment = -1;          // its index among the optimizer's segments
    std::string name;              // for checkpoints (ztier_param_set_name)
    std::optional<std::vector<uint64_t>> shape;  // none: never given (flat)
  };

  std::mutex mu;  // serialises the calls on this engine
  std::unique_ptr<co::RankRuntime> rt;
  std::shared_ptr<co::LocalGroup> group;  // kept alive while the engine lives
  uint32_t rank = 0, world = 1;
  co::ParamTier tier = co::ParamTier::kNvme;
  bool finalized = false;
  std::string failed;  // non-empty: the engine is unusable, and why
  std::unordered_map<uint64_t, Param> params;
  // With parameters on NVMe, initial partitions wait for the layout in an
  // unlinked file beside the swap files, not in host memory (a model larger
  // than memory is registered whole before its first fetch). -1: none yet.
  int spill_fd = -1;
  uint64_t spill_bytes = 0;
  ~ztier_engine() {
    // A background save is abandoned (not published): its thread ends first.
    if (save_thread.joinable()) save_thread.join();
    save_job.reset();
    if (spill_fd >= 0) close(spill_fd);
  }
  std::vector<uint64_t> param_order;  // registration order
  std::unordered_set<uint64_t> modules;
  std::atomic<uint64_t> grad_reduces{0};
  std::vector<ztier::optim::AdamHyper> hypers;  // the optimizer's groups, once created
  // With tiers.gradients: nvme, the reduce-scatter's destination before a
  // partition goes to the gradient store (one, sized to the largest).
  std::vector<uint8_t> grad_scratch;

  // An optimizer step begun during backward (ztier_optimizer_step_begin),
  // until finished or cancelled. Declared after `rt`: destroyed (cancelled)
  // before the runtime it uses.
  std::unique_ptr<co::BackgroundStep> early;

  // A checkpoint save running in the background (ztier_checkpoint_save_async):
  // its optimizer-state part runs on `save_thread`; `save_result` is the
  // outcome of the last one, until ztier_checkpoint_wait reports it.
  std::unique_ptr<ztier::checkpoint::SaveJob> save_job;
  std::thread save_thread;
  Status save_result;

  std::mutex async_mu;  // guards the latched background error
  ztier_status_t async_status = ZTIER_STATUS_OK;
  std::string async_message;
};

namespace {

thread_local std::string t_last_error;

std::mutex g_live_mu;
std::unordered_set<const ztier_engine*>& LiveEngines() {
  static auto* live = new std::unordered_set<const ztier_engine*>();  // never destroyed
  return *live;
}
bool IsLive(const ztier_engine* e) {
  std::lock_guard<std::mutex> lock(g_live_mu);
  return LiveEngines().count(e) != 0;
}

constexpr const char* kStatusNames[] = {
    "ZTIER_STATUS_OK",
    "ZTIER_STATUS_INVALID_ARGUMENT",
    "ZTIER_STATUS_NOT_FOUND",
    "ZTIER_STATUS_IO_ERROR",
    "ZTIER_STATUS_UNAVAILABLE",
    "ZTIER_STATUS_RESOURCE_EXHAUSTED",
    "ZTIER_STATUS_FAILED_PRECONDITION",
    "ZTIER_STATUS_CORRUPTION",
    "ZTIER_STATUS_CANCELLED",
    "ZTIER_STATUS_INTERNAL",
    "ZTIER_STATUS_INVALID_HANDLE",
    "ZTIER_STATUS_BAD_STRUCT_SIZE",
    "ZTIER_STATUS_ENGINE_FAILED",
};
static_assert(sizeof(kStatusNames) / sizeof(kStatusNames[0]) == ZTIER_STATUS_COUNT,
              "one name per status");

ztier_status_t ToC(StatusCode code) {
  switch (code) {
    case StatusCode::kOk: return ZTIER_STATUS_OK;
    case StatusCode::kInvalidArgument: return ZTIER_STATUS_INVALID_ARGUMENT;
    case StatusCode::kNotFound: return ZTIER_STATUS_NOT_FOUND;
    case StatusCode::kIoError: return ZTIER_STATUS_IO_ERROR;
    case StatusCode::kUnavailable: return ZTIER_STATUS_UNAVAILABLE;
    case StatusCode::kResourceExhausted: return ZTIER_STATUS_RESOURCE_EXHAUSTED;
    case StatusCode::kFailedPrecondition: return ZTIER_STATUS_FAILED_PRECONDITION;
    case StatusCode::kCorruption: return ZTIER_STATUS_CORRUPTION;
    case StatusCode::kCancelled: return ZTIER_STATUS_CANCELLED;
    case StatusCode::kInternal: return ZTIER_STATUS_INTERNAL;
  }
  return ZTIER_STATUS_INTERNAL;
}

// Records the detail for ztier_last_error() and returns `status`.
ztier_status_t Fail(ztier_status_t status, const char* fn, std::string_view detail) {
  try {
    t_last_error = fmt::format("{}: {}", fn, detail);
  } catch (...) {
    t_last_error.clear();  // no memory for the text; the status still says it
  }
  return status;
}

ztier_status_t FromStatus(const Status& s, const char* fn) {
  if (s.ok()) return ZTIER_STATUS_OK;
  return Fail(ToC(s.code()), fn, s.message());
}

// Runs `body` and turns any exception into a status.
template <typename F>
ztier_status_t Guard(const char* fn, F&& body) noexcept {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return Fail(ZTIER_STATUS_RESOURCE_EXHAUSTED, fn, "out of host memory");
  } catch (const std::exception& e) {
    // No formatting here: this handler is outside any try block.
    return Fail(ZTIER_STATUS_INTERNAL, fn, e.what());
  } catch (...) {
    return Fail(ZTIER_STATUS_INTERNAL, fn, "unexpected exception");
  }
}

ztier_status_t CheckHandle(const ztier_engine* e, const char* fn) {
  if (e == nullptr) return Fail(ZTIER_STATUS_INVALID_HANDLE, fn, "the engine handle is NULL");
  if (!IsLive(e)) {
    return Fail(ZTIER_STATUS_INVALID_HANDLE, fn,
                fmt::format("{} is not a live engine (destroyed already, or not from "
                            "ztier_engine_create)",
                            static_cast<const void*>(e)));
  }
  return ZTIER_STATUS_OK;
}

// Errors that only a background thread produces: a fetch that returns one
// reports a failed read or gather, which the async query then also shows.
bool IsBackgroundCode(StatusCode c) {
  return c == StatusCode::kIoError || c == StatusCode::kCorruption;
}

void LatchAsync(ztier_engine& e, const Status& s) {
  if (s.ok()) return;
  std::lock_guard<std::mutex> lock(e.async_mu);
  if (e.async_status != ZTIER_STATUS_OK) return;
  e.async_status = ToC(s.code());
  e.async_message = std::string(s.message());
}

// Checks the handle, takes the engine's lock, runs `body(engine)` (returning
// a Status) and converts the result.
template <typename F>
ztier_status_t WithEngine(ztier_engine* e, const char* fn, F&& body) noexcept {
  return Guard(fn, [&]() -> ztier_status_t {
    if (ztier_status_t h = CheckHandle(e, fn); h != ZTIER_STATUS_OK) return h;
    std::lock_guard<std::mutex> lock(e->mu);
    if (!e->failed.empty()) {
      return Fail(ZTIER_STATUS_ENGINE_FAILED, fn,
                  fmt::format("the engine failed earlier and cannot be used (destroy it): {}",
                              e->failed));
    }
    LatchAsync(*e, e->rt->coordinator().PendingAsyncError());
    Status s = body(*e);
    if (!s.ok() && s.code() == StatusCode::kInternal) e->failed = std::string(s.message());
    return FromStatus(s, fn);
  });
}

// A C enum argument as the int the caller passed. C allows any int in an
// enum-typed object; C++ only the enum's range, so a typed load of a bad
// value (say 42) would itself be undefined: read the bytes instead.
template <typename E>
int RawEnum(const E& e) {
  static_assert(sizeof(E) == sizeof(int), "C enums are int-sized");
  int v = 0;
  memcpy(&v, &e, sizeof(v));
  return v;
}

Result<co::DType> ToDType(const ztier_dtype_t& dtype) {
  const int d = RawEnum(dtype);
  switch (d) {
    case ZTIER_DTYPE_FLOAT32: return co::DType::kFloat32;
    case ZTIER_DTYPE_FLOAT16: return co::DType::kFloat16;
    case ZTIER_DTYPE_BFLOAT16: return co::DType::kBFloat16;
    case ZTIER_DTYPE_UINT8: return co::DType::kUInt8;
  }
  return Status::InvalidArgument(fmt::format(
      "dtype {} is not a ztier_dtype_t (0 float32, 1 float16, 2 bfloat16, 3 uint8)", d));
}

ztier_dtype_t FromDType(co::DType d) {
  switch (d) {
    case co::DType::kFloat32: return ZTIER_DTYPE_FLOAT32;
    case co::DType::kFloat16: return ZTIER_DTYPE_FLOAT16;
    case co::DType::kBFloat16: return ZTIER_DTYPE_BFLOAT16;
    case co::DType::kUInt8: return ZTIER_DTYPE_UINT8;
  }
  return ZTIER_DTYPE_UINT8;
}

// Lays out the store and moves the held initial partitions to their tier,
// once. A failure here leaves partitions nowhere: the engine is unusable.
// Whole-buffer pread/pwrite on the spill file (retrying short transfers).
Status SpillIo(int fd, bool write, uint8_t* buf, uint64_t bytes, uint64_t offset) {
  while (bytes > 0) {
    const ssize_t n = write ? pwrite(fd, buf, bytes, static_cast<off_t>(offset))
                            : pread(fd, buf, bytes, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      return Status::FromErrno(n < 0 ? errno : EIO,
                               write ? "write the initial-partition spill file"
                                     : "read the initial-partition spill file");
    }
    buf += n;
    bytes -= static_cast<uint64_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return Status::Ok();
}

// Moves p's initial partition to the spill file (parameters on NVMe).
Status Spill(ztier_engine& e, ztier_engine::Param& p) {
  if (e.spill_fd < 0) {
    const auto& paths = e.rt->options().config.tiers.nvme.paths;
    if (paths.empty()) return Status::Ok();  // kept in memory
    const std::string dir = paths.front();
    mkdir(dir.c_str(), 0700);  // the store creates it too; EEXIST is fine
    e.spill_fd = open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (e.spill_fd < 0) {
      return Status::FromErrno(errno, fmt::format("create an unlinked spill file in {}", dir));
    }
  }
  ZTIER_RETURN_IF_ERROR(
      SpillIo(e.spill_fd, true, p.pending.data(), p.pending.size(), e.spill_bytes));
  p.spilled_at = static_cast<int64_t>(e.spill_bytes);
  e.spill_bytes += p.pending.size();
  std::vector<uint8_t>().swap(p.pending);
  return Status::Ok();
}

Status EnsureFinalized(ztier_engine& e) {
  if (e.finalized) return Status::Ok();
  co::Coordinator& c = e.rt->coordinator();
  Status s = c.Finalize();
  for (size_t i = 0; s.ok() && i < e.param_order.size(); ++i) {
    const uint64_t id = e.param_order[i];
    ztier_engine::Param& p = e.params.at(id);
    if (p.spilled_at >= 0) {
      p.pending.resize(p.part_numel * co::DTypeBytes(p.dtype));
      s = SpillIo(e.spill_fd, false, p.pending.data(), p.pending.size(),
                  static_cast<uint64_t>(p.spilled_at));
      if (!s.ok()) break;
    }
    s = c.WritePartition(id, p.pending.data());
    if (!s.ok()) s = s.WithContext(fmt::format("initial data of parameter {}", id));
    std::vector<uint8_t>().swap(p.pending);
  }
  if (e.spill_fd >= 0) {
    close(e.spill_fd);  // unlinked: its blocks go back now
    e.spill_fd = -1;
  }
  if (!s.ok()) {
    e.failed = std::string(s.message());
    return s.WithContext("laying out the parameters (first fetch / step end)");
  }
  e.finalized = true;
  return Status::Ok();
}

// Stops a step begun during backward and forgets it (nothing committed).
void CancelEarly(ztier_engine& e) {
  if (e.early == nullptr) return;
  e.early->Cancel();
  e.early.reset();
}

Result<ztier_engine::Param*> FindParam(ztier_engine& e, uint64_t id) {
  auto it = e.params.find(id);
  if (it == e.params.end()) {
    return Status::NotFound(fmt::format("parameter {} is not registered", id));
  }
  return &it->second;
}

Status CheckBytes(const ztier_engine::Param& p, uint64_t id, size_t bytes, const void* buf,
                  const char* what) {
  const uint64_t want = p.part_numel * co::DTypeBytes(p.dtype);
  if (buf == nullptr) {
    return Status::InvalidArgument(fmt::format("{} of parameter {}: buffer is NULL", what, id));
  }
  if (bytes != want) {
    return Status::InvalidArgument(fmt::format(
        "{} of parameter {}: {} bytes given, its partition is {} bytes ({} elements of {})",
        what, id, bytes, want, p.part_numel, co::DTypeName(p.dtype)));
  }
  return Status::Ok();
}

void CopyText(const std::string& text, char* out, size_t out_bytes) {
  if (out == nullptr || out_bytes == 0) return;
  const size_t n = std::min(text.size(), out_bytes - 1);
  memcpy(out, text.data(), n);
  out[n] = '\0';
}

}  // namespace

extern "C" {

const char* ztier_status_string(ztier_status_t status) {
  const int s = RawEnum(status);
  if (s < 0 || s >= ZTIER_STATUS_COUNT) return "unknown status";
  return kStatusNames[s];
}

const char* ztier_last_error(void) { return t_last_error.c_str(); }

ztier_status_t ztier_version(uint32_t* major, uint32_t* minor, uint32_t* patch) {
  if (major) *major = ZTIER_VERSION_MAJOR;
  if (minor) *minor = ZTIER_VERSION_MINOR;
  if (patch) *patch = ZTIER_VERSION_PATCH;
  return ZTIER_STATUS_OK;
}

const char* ztier_version_string(void) { return ZTIER_VERSION_STRING; }

// ---------------------------------------------------------------- local group

ztier_status_t ztier_local_group_create(uint32_t world_size, ztier_local_group_t** out) {
  constexpr const char* fn = "ztier_local_group_create";
  return Guard(fn, [&]() -> ztier_status_t {
    if (out == nullptr) return Fail(ZTIER_STATUS_INVALID_ARGUMENT, fn, "out is NULL");
    if (world_size == 0) {
      return Fail(ZTIER_STATUS_INVALID_ARGUMENT, fn, "world_size must be at least 1");
    }
    auto g = std::make_unique<ztier_local_group>();
    g->group = co::LocalGroup::Create(world_size);
    *out = g.release();
    return ZTIER_STATUS_OK;
  });
}

ztier_status_t ztier_local_group_destroy(ztier_local_group_t* group) {
  return Guard("ztier_local_group_destroy", [&]() -> ztier_status_t {
    delete group;
    return ZTIER_STATUS_OK;
  });
}

// ---------------------------------------------------------------- engine

// ztier_engine_options_t before the gloo fields.
constexpr size_t kEngineOptionsSizeV1 = offsetof(ztier_engine_options_t, gloo_store_path);

// The caller's store as the collective's: a value larger than the first
// buffer is read again at its size.
co::KeyValueStore StoreCallbacks(const ztier_store_t& st) {
  co::KeyValueStore kv;
  kv.set = [st](const std::string& key, std::span<const uint8_t> value) -> Status {
    if (st.set(st.context, key.c_str(), value.data(), value.size()) != 0) {
      return Status::IoError(fmt::format("the store's set failed for key '{}'", key));
    }
    return Status::Ok();
  };
  kv.get = [st](const std::string& key,
                std::chrono::milliseconds timeout) -> Result<std::vector<uint8_t>> {
    const auto ms = static_cast<uint32_t>(
        std::clamp<int64_t>(timeout.count(), 1, std::numeric_limits<uint32_t>::max()));
    std::vector<uint8_t> value(1024);
    for (int attempt = 0; attempt < 2; ++attempt) {
      size_t bytes = 0;
      const int rc = st.get(st.context, key.c_str(), value.data(), value.size(), &bytes, ms);
      if (rc == 1) {
        return Status::FromErrno(
            ETIMEDOUT, fmt::format("the store's get timed out on key '{}' (asked to wait up "
                                   "to {} ms)",
                                   key, ms));
      }
      if (rc != 0) return Status::IoError(fmt::format("the store's get failed for key '{}'", key));
      if (bytes <= value.size()) {
        value.resize(bytes);
        return value;
      }
      value.resize(bytes);
    }
    return Status::IoError(fmt::format("the store's value for key '{}' kept growing", key));
  };
  return kv;
}

ztier_status_t ztier_engine_options_init_sized(ztier_engine_options_t* options, size_t size) {
  constexpr const char* fn = "ztier_engine_options_init";
  if (options == nullptr) return Fail(ZTIER_STATUS_INVALID_ARGUMENT, fn, "options is NULL");
  if (size != sizeof(*options) && size != kEngineOptionsSizeV1) {
    return Fail(ZTIER_STATUS_BAD_STRUCT_SIZE, fn,
                fmt::format("the options struct is {} bytes, this library knows {} and {}",
                            size, kEngineOptionsSizeV1, sizeof(*options)));
  }
  // Only the caller's bytes: a struct from an earlier header is shorter.
  memset(options, 0, size);
  options->size = size;
  options->world_size = 1;
  options->comm = ZTIER_COMM_NONE;
  options->device = ZTIER_DEVICE_AUTO;
  return ZTIER_STATUS_OK;
}

ztier_status_t(ztier_engine_options_init)(ztier_engine_options_t* options) {
  return ztier_engine_options_init_sized(options, kEngineOptionsSizeV1);
}

ztier_status_t ztier_engine_create(const ztier_engine_options_t* o, ztier_engine_t** out) {
  constexpr const char* fn = "ztier_engine_create";
  return Guard(fn, [&]() -> ztier_status_t {
    if (o == nullptr || out == nullptr) {
      return Fail(ZTIER_STATUS_INVALID_ARGUMENT, fn, "options and out must not be NULL");
    }
    if (o->size != sizeof(ztier_engine_options_t) && o->size != kEngineOptionsSizeV1) {
      return Fail(ZTIER_STATUS_BAD_STRUCT_SIZE, fn,
                  fmt::format("options->size is {}, this library knows {} and {} "
                              "(call ztier_engine_options_init)",
                              o->size, kEngineOptionsSizeV1, sizeof(ztier_engine_options_t)));
    }
    // A caller built against the header without the gloo fields.
    ztier_engine_options_t opts;
    (void)ztier_engine_options_init_sized(&opts, sizeof(opts));
    std::memcpy(&opts, o, o->size);
    o = &opts;
    if ((o->config_path == nullptr) == (o->config_text == nullptr)) {
      return Fail(ZTIER_STATUS_INVALID_ARGUMENT, fn,
                  "set exactly one of config_path and config_text");
    }
    if (o->world_size == 0 || o->rank >= o->world_size) {
      return Fail(ZTIER_STATUS_INVALID_ARGUMENT, fn,
                  fmt::format("rank {} of world size {}: need 0 <= rank < world_size",
                              o->rank, o->world_size));
    }
    auto config = o->config_path ? ti::LoadConfigFile(o->config_path)
                                 : ti::LoadConfigText(o->config_text, "config_text");
    if (!config.ok()) return FromStatus(config.status(), fn);

    auto e = std::make_unique<ztier_engine>();
    co::RuntimeOptions ro;
    ro.config = *config;
    ro.rank = o->rank;
    ro.world_size = o->world_size;
    const int comm = RawEnum(o->comm);
    switch (comm) {
      case ZTIER_COMM_NONE:
        if (o->world_size != 1) {
          return Fail(ZTIER_STATUS_INVALID_ARGUMENT, fn,
                      fmt::format("world size {} needs a communicator (comm)", o->world_size));
        }
        break;
      case ZTIER_COMM_LOCAL_GROUP:
        if (o->local_group == nullptr) {
          return Fail(ZTIER_STATUS_INVALID_HANDLE, fn,
                      "comm is ZTIER_COMM_LOCAL_GROUP but local_group is NULL");
        }
        if (o->local_group->group->world_size() != o->world_size) {
          return Fail(ZTIER_STATUS_INVALID_ARGUMENT, fn,
                      fmt::format("the local group has {} ranks, world_size is {}",
                                  o->local_group->group->world_size(), o->world_size));
        }
        e->group = o->local_group->group;
        ro.local_group = e->group.get();
        ro.config.comm.backend = ti::CommBackend::kLocal;
        break;
      case ZTIER_COMM_NCCL_UNIQUE_ID:
        if (o->nccl_unique_id == nullptr || o->nccl_unique_id_bytes != 128) {
          return Fail(ZTIER_STATUS_INVALID_ARGUMENT, fn,
                      "ZTIER_COMM_NCCL_UNIQUE_ID needs the 128 bytes of rank 0's ncclUniqueId");
        }
        ro.nccl_unique_id.assign(static_cast<const uint8_t*>(o->nccl_unique_id),
                                 static_cast<const uint8_t*>(o->nccl_unique_id) + 128);
        ro.config.comm.backend = ti::CommBackend::kNccl;
        break;
      case ZTIER_COMM_NCCL_COMM:
        if (o->nccl_comm == nullptr) {
          return Fail(ZTIER_STATUS_INVALID_ARGUMENT, fn,
                      "ZTIER_COMM_NCCL_COMM needs nccl_comm (an ncclComm_t)");
        }
        ro.nccl_comm = o->nccl_comm;
        ro.config.comm.backend = ti::CommBackend::kNccl;
        break;
      case ZTIER_COMM_GLOO: {
        const bool path = o->gloo_store_path != nullptr && o->gloo_store_path[0] != '\0';
        const bool store = o->gloo_store != nullptr;
        if (path == store) {
          return Fail(ZTIER_STATUS_INVALID_ARGUMENT, fn,
                      "ZTIER_COMM_GLOO needs exactly one of gloo_store_path (a directory "
                      "every rank sees) and gloo_store (callbacks)");
        }
        if (store && (o->gloo_store->set == nullptr || o->gloo_store->get == nullptr)) {
          return Fail(ZTIER_STATUS_INVALID_ARGUMENT, fn,
                      "gloo_store needs both its set and get callbacks");
        }
        if (path) ro.gloo.store_path = o->gloo_store_path;
        if (store) ro.gloo.store = StoreCallbacks(*o->gloo_store);
        if (o->gloo_prefix != nullptr) ro.gloo.prefix = o->gloo_prefix;
        ro.config.comm.backend = ti::CommBackend::kGloo;
        break;
      }
      default:
        return Fail(ZTIER_STATUS_INVALID_ARGUMENT, fn,
                    fmt::format("comm {} is not a ztier_comm_kind_t", comm));
    }
    const int device = RawEnum(o->device);
    switch (device) {
      case ZTIER_DEVICE_AUTO: ro.device = co::DeviceKind::kAuto; break;
      case ZTIER_DEVICE_HOST: ro.device = co::DeviceKind::kHost; break;
      case ZTIER_DEVICE_CUDA: ro.device = co::DeviceKind::kCuda; break;
      default:
        return Fail(ZTIER_STATUS_INVALID_ARGUMENT, fn,
                    fmt::format("device {} is not a ztier_device_kind_t",
                                device));
    }
    ro.cuda_device = o->cuda_device;
    auto rt = co::RankRuntime::Create(ro);
    if (!rt.ok()) return FromStatus(rt.status(), fn);
    e->rt = std::move(*rt);
    e->rank = o->rank;
    e->world = o->world_size;
    e->tier = config->tiers.params == ti::ParamTier::kHost ? co::ParamTier::kHost
                                                           : co::ParamTier::kNvme;
    {
      std::lock_guard<std::mutex> lock(g_live_mu);
      LiveEngines().insert(e.get());
    }
    *out = e.release();
    return ZTIER_STATUS_OK;
  });
}

ztier_status_t ztier_engine_destroy(ztier_engine_t* engine) {
  constexpr const char* fn = "ztier_engine_destroy";
  return Guard(fn, [&]() -> ztier_status_t {
    if (engine == nullptr) return ZTIER_STATUS_OK;
    {
      std::lock_guard<std::mutex> lock(g_live_mu);
      if (LiveEngines().erase(engine) == 0) {
        return Fail(ZTIER_STATUS_INVALID_HANDLE, fn,
                    fmt::format("{} is not a live engine (destroyed already?)",
                                static_cast<const void*>(engine)));
      }
    }
    delete engine;  // the runtime drains the pipeline first
    return ZTIER_STATUS_OK;
  });
}

// ---------------------------------------------------------------- set-up

ztier_status_t ztier_param_register(ztier_engine_t* engine, uint64_t id, uint64_t numel,
                                    ztier_dtype_t dtype, const void* full_data) {
  return WithEngine(engine, "ztier_param_register", [&](ztier_engine& e) -> Status {
    if (e.finalized) {
      return Status::FailedPrecondition(fmt::format(
          "parameter {}: register every parameter before the first fetch, step end or "
          "partition access",
          id));
    }
    ZTIER_ASSIGN_OR_RETURN(co::DType dt, ToDType(dtype));
    if (full_data == nullptr) {
      return Status::InvalidArgument(fmt::format("parameter {}: full_data is NULL", id));
    }
    co::Coordinator& c = e.rt->coordinator();
    ZTIER_RETURN_IF_ERROR(c.RegisterParam(id, numel, dt, e.tier));
    ztier_engine::Param p;
    p.numel = numel;
    p.dtype = dt;
    p.part_numel = c.partition_numel(id);
    // This rank's slice [rank x p, (rank+1) x p) of the flat parameter,
    // zero padded past numel (elements).
    const uint64_t esize = co::DTypeBytes(dt);
    p.pending.assign(p.part_numel * esize, 0);
    const uint64_t begin = std::min<uint64_t>(uint64_t{e.rank} * p.part_numel, numel);
    const uint64_t end = std::min<uint64_t>(begin + p.part_numel, numel);
    if (end > begin) {
      memcpy(p.pending.data(), static_cast<const uint8_t*>(full_data) + begin * esize,
             (end - begin) * esize);
    }
    if (e.tier == co::ParamTier::kNvme) ZTIER_RETURN_IF_ERROR(Spill(e, p));
    e.params.emplace(id, std::move(p));
    e.param_order.push_back(id);
    return Status::Ok();
  });
}

ztier_status_t ztier_module_register(ztier_engine_t* engine, uint64_t id, const char* name,
                                     const uint64_t* param_ids, size_t param_count,
                                     int64_t parent) {
  return WithEngine(engine, "ztier_module_register", [&](ztier_engine& e) -> Status {
    if (param_count > 0 && param_ids == nullptr) {
      return Status::InvalidArgument(
          fmt::format("module {}: param_ids is NULL with param_count {}", id, param_count));
    }
    if (parent < -1) {
      return Status::InvalidArgument(
          fmt::format("module {}: parent {} (use -1 for none)", id, parent));
    }
    if (parent >= 0 && e.modules.count(static_cast<uint64_t>(parent)) == 0) {
      return Status::NotFound(fmt::format(
          "module {}: parent module {} is not registered (register parents first)", id,
          parent));
    }
    std::vector<uint64_t> ids(param_ids, param_ids + param_count);
    ZTIER_RETURN_IF_ERROR(
        e.rt->coordinator().RegisterModule(id, name ? std::string(name) : std::string(), ids));
    e.modules.insert(id);
    return Status::Ok();
  });
}

// ---------------------------------------------------------------- hooks

ztier_status_t ztier_module_fetch(ztier_engine_t* engine, uint64_t id, int forward) {
  return WithEngine(engine, "ztier_module_fetch", [&](ztier_engine& e) -> Status {
    ZTIER_RETURN_IF_ERROR(EnsureFinalized(e));
    Status s = e.rt->coordinator().Fetch(id, forward != 0);
    if (IsBackgroundCode(s.code())) LatchAsync(e, s);
    return s;
  });
}

ztier_status_t ztier_module_hint(ztier_engine_t* engine, const uint64_t* ids, size_t count) {
  return WithEngine(engine, "ztier_module_hint", [&](ztier_engine& e) -> Status {
    if (ids == nullptr && count > 0) return Status::InvalidArgument("ids is NULL");
    ZTIER_RETURN_IF_ERROR(EnsureFinalized(e));
    return e.rt->coordinator().Hint(std::span<const uint64_t>(ids, count));
  });
}

ztier_status_t ztier_module_release(ztier_engine_t* engine, uint64_t id, int backward) {
  return WithEngine(engine, "ztier_module_release", [&](ztier_engine& e) -> Status {
    if (!e.finalized) {
      if (e.modules.count(id) == 0) {
        return Status::NotFound(fmt::format("module {} is not registered", id));
      }
      return Status::FailedPrecondition(
          fmt::format("release of module {} without a matching fetch", id));
    }
    return e.rt->coordinator().Release(id, backward != 0);
  });
}

ztier_status_t ztier_param_data(ztier_engine_t* engine, uint64_t id, void** out) {
  return WithEngine(engine, "ztier_param_data", [&](ztier_engine& e) -> Status {
    if (out == nullptr) return Status::InvalidArgument("out is NULL");
    ZTIER_RETURN_IF_ERROR(FindParam(e, id).status());
    ZTIER_ASSIGN_OR_RETURN(void* p, e.rt->coordinator().ParamData(id));
    *out = p;
    return Status::Ok();
  });
}

namespace {

// The gradient store of tiers.gradients: nvme (the optimizer's), else null.
ztier::swapper::GradStore* GradStoreOf(ztier_engine& e) {
  auto* opt = e.rt->optimizer();
  return opt != nullptr ? opt->grad_store() : nullptr;
}

bool GradsOnNvme(const ztier_engine& e) {
  return e.rt->options().config.tiers.gradients == ti::GradTier::kNvme;
}

// The gradient store and parameter p's segment in it; an error when the
// gradient has nowhere to go there.
Result<ztier::swapper::GradStore*> StoreFor(ztier_engine& e, const ztier_engine::Param& p,
                                            uint64_t id) {
  ztier::swapper::GradStore* store = GradStoreOf(e);
  if (store == nullptr) {
    return Status::FailedPrecondition(
        "tiers.gradients is nvme: gradient partitions live in the optimizer's gradient store; "
        "create ztier's optimizer (ztier_optimizer_create) before the first gradient, or set "
        "tiers.gradients: host");
  }
  if (p.segment < 0) {
    return Status::FailedPrecondition(fmt::format(
        "parameter {} has no optimizer state, so its gradient has no place in the gradient "
        "store (tiers.gradients: nvme): give it to the optimizer, or do not hand its gradient in",
        id));
  }
  return store;
}

// ztier_param_grad_reduce / _accumulate: the reduce-scattered partition
// replaces the held one or (accumulate, when one is held) is added to it.
Status HandInGradient(ztier_engine& e, uint64_t id, const void* full_grad, bool accumulate) {
  ZTIER_ASSIGN_OR_RETURN(ztier_engine::Param * p, FindParam(e, id));
  if (full_grad == nullptr) {
    return Status::InvalidArgument(fmt::format("gradient of parameter {}: NULL", id));
  }
  if (p->dtype == co::DType::kUInt8) {
    return Status::InvalidArgument(fmt::format("parameter {} is uint8: it has no gradient", id));
  }
  ZTIER_RETURN_IF_ERROR(EnsureFinalized(e));
  accumulate = accumulate && p->has_grad;
  // A second gradient for a parameter a begun step already took (the
  // trainer accumulates over another backward): that step is void.
  if (e.early != nullptr && e.early->IsReady(id)) CancelEarly(e);
  const uint64_t bytes = p->part_numel * co::DTypeBytes(p->dtype);
  const auto type = co::ElementType(p->dtype);
  if (GradsOnNvme(e)) {
    ZTIER_ASSIGN_OR_RETURN(auto* store, StoreFor(e, *p, id));
    // One rank on the host emulation with an unpadded partition: the full
    // gradient is the partition, in host memory; it goes to the store as it
    // is (no partition-sized scratch: the largest parameter's worth of RAM).
    const ti::DeviceBackend* d = e.rt->device();
    const bool direct = e.world == 1 && p->part_numel == p->numel && d != nullptr &&
                        d->name() != "cuda";
    const void* part = full_grad;
    if (!direct) {
      if (e.grad_scratch.size() < bytes) e.grad_scratch.resize(bytes);
      ZTIER_RETURN_IF_ERROR(
          e.rt->coordinator().ReduceScatterGradient(id, full_grad, e.grad_scratch.data()));
      part = e.grad_scratch.data();
    }
    // From here the held gradient is being replaced: a failure leaves none.
    p->has_grad = false;
    ZTIER_RETURN_IF_ERROR(
        store->Put(static_cast<uint32_t>(p->segment), part, accumulate, &p->sq_norm));
  } else if (accumulate) {
    // Reduced aside first: a failed reduce leaves the held sum as it was.
    if (e.grad_scratch.size() < bytes) e.grad_scratch.resize(bytes);
    ZTIER_RETURN_IF_ERROR(
        e.rt->coordinator().ReduceScatterGradient(id, full_grad, e.grad_scratch.data()));
    ztier::optim::AccumulateGrad(p->grad.data(), e.grad_scratch.data(), p->part_numel, type);
    p->sq_norm = ztier::optim::SumSquares(p->grad.data(), p->part_numel, type);
  } else {
    // The old gradient is gone from here on: a failed reduce must not leave
    // a half-overwritten buffer that reads back as valid.
    p->has_grad = false;
    // Kept across steps (ztier_grad_clear keeps the buffer): a fresh one
    // would be zero-filled and page-faulted in every step.
    p->grad.resize(bytes);
    ZTIER_RETURN_IF_ERROR(
        e.rt->coordinator().ReduceScatterGradient(id, full_grad, p->grad.data()));
    p->sq_norm = ztier::optim::SumSquares(p->grad.data(), p->part_numel, type);
  }
  p->has_grad = true;
  e.grad_reduces.fetch_add(1, std::memory_order_relaxed);
  if (e.early != nullptr) e.early->Ready(id, p->grad.data());
  return Status::Ok();
}

}  // namespace

ztier_status_t ztier_param_grad_reduce(ztier_engine_t* engine, uint64_t id,
                                       const void* full_grad) {
  return WithEngine(engine, "ztier_param_grad_reduce", [&](ztier_engine& e) -> Status {
    return HandInGradient(e, id, full_grad, /*accumulate=*/false);
  });
}

ztier_status_t ztier_param_grad_accumulate(ztier_engine_t* engine, uint64_t id,
                                           const void* full_grad) {
  return WithEngine(engine, "ztier_param_grad_accumulate", [&](ztier_engine& e) -> Status {
    return HandInGradient(e, id, full_grad, /*accumulate=*/true);
  });
}

ztier_status_t ztier_grad_stats(ztier_engine_t* engine, ztier_grad_stats_t* stats) {
  constexpr const char* fn = "ztier_grad_stats";
  if (stats != nullptr && stats->size != sizeof(ztier_grad_stats_t)) {
    return Guard(fn, [&]() -> ztier_status_t {
      if (ztier_status_t h = CheckHandle(engine, fn); h != ZTIER_STATUS_OK) return h;
      return Fail(ZTIER_STATUS_BAD_STRUCT_SIZE, fn,
                  fmt::format("stats->size is {}, this library knows {}", stats->size,
                              sizeof(ztier_grad_stats_t)));
    });
  }
  return WithEngine(engine, fn, [&](ztier_engine& e) -> Status {
    if (stats == nullptr) return Status::InvalidArgument("stats is NULL");
    double sq = 0;
    uint64_t count = 0;
    // Registration order: the same sum on every rank for the same gradients.
    for (uint64_t id : e.param_order) {
      const auto& p = e.params.at(id);
      if (!p.has_grad) continue;
      sq += p.sq_norm;
      ++count;
    }
    stats->sq_norm = sq;
    stats->count = count;
    stats->nonfinite = std::isfinite(sq) ? 0 : 1;
    stats->tier = GradsOnNvme(e) ? ZTIER_GRAD_TIER_NVME : ZTIER_GRAD_TIER_HOST;
    return Status::Ok();
  });
}

ztier_status_t ztier_exchange_u64(ztier_engine_t* engine, uint64_t value, uint64_t* out,
                                  size_t out_count) {
  return WithEngine(engine, "ztier_exchange_u64", [&](ztier_engine& e) -> Status {
    if (out == nullptr) return Status::InvalidArgument("out is NULL");
    if (out_count < e.world) {
      return Status::InvalidArgument(fmt::format(
          "out_count is {}, the world size {}: one value per rank", out_count, e.world));
    }
    ZTIER_RETURN_IF_ERROR(EnsureFinalized(e));
    ZTIER_ASSIGN_OR_RETURN(std::vector<uint64_t> all, e.rt->coordinator().ExchangeHost(value));
    std::copy(all.begin(), all.end(), out);
    return Status::Ok();
  });
}

ztier_status_t ztier_step_end(ztier_engine_t* engine) {
  return WithEngine(engine, "ztier_step_end", [&](ztier_engine& e) -> Status {
    ZTIER_RETURN_IF_ERROR(EnsureFinalized(e));
    return e.rt->coordinator().ResetStep();
  });
}

ztier_status_t ztier_release_all(ztier_engine_t* engine, int persistent) {
  return WithEngine(engine, "ztier_release_all", [&](ztier_engine& e) -> Status {
    if (!e.finalized) return Status::Ok();  // nothing was ever fetched
    return e.rt->coordinator().ReleaseAll(persistent != 0);
  });
}

// ---------------------------------------------------------------- optimizer

ztier_status_t ztier_param_info(ztier_engine_t* engine, uint64_t id, ztier_param_info_t* info) {
  constexpr const char* fn = "ztier_param_info";
  if (info != nullptr && info->size != sizeof(ztier_param_info_t)) {
    return Guard(fn, [&]() -> ztier_status_t {
      if (ztier_status_t h = CheckHandle(engine, fn); h != ZTIER_STATUS_OK) return h;
      return Fail(ZTIER_STATUS_BAD_STRUCT_SIZE, fn,
                  fmt::format("info->size is {}, this library knows {}", info->size,
                              sizeof(ztier_param_info_t)));
    });
  }
  return WithEngine(engine, fn, [&](ztier_engine& e) -> Status {
    if (info == nullptr) return Status::InvalidArgument("info is NULL");
    ZTIER_ASSIGN_OR_RETURN(ztier_engine::Param * p, FindParam(e, id));
    info->numel = p->numel;
    info->partition_numel = p->part_numel;
    info->partition_offset = uint64_t{e.rank} * p->part_numel;
    info->dtype = FromDType(p->dtype);
    switch (e.rt->coordinator().param_status(id)) {
      case co::ParamStatus::kNotAvailable: info->state = ZTIER_PARAM_NOT_AVAILABLE; break;
      case co::ParamStatus::kInflight: info->state = ZTIER_PARAM_INFLIGHT; break;
      case co::ParamStatus::kAvailable: info->state = ZTIER_PARAM_AVAILABLE; break;
    }
    info->has_grad = p->has_grad ? 1 : 0;
    return Status::Ok();
  });
}

ztier_status_t ztier_partition_read(ztier_engine_t* engine, uint64_t id, void* out,
                                    size_t bytes) {
  return WithEngine(engine, "ztier_partition_read", [&](ztier_engine& e) -> Status {
    ZTIER_ASSIGN_OR_RETURN(ztier_engine::Param * p, FindParam(e, id));
    ZTIER_RETURN_IF_ERROR(CheckBytes(*p, id, bytes, out, "partition read"));
    ZTIER_RETURN_IF_ERROR(EnsureFinalized(e));
    Status s = e.rt->coordinator().ReadPartition(id, out);
    if (IsBackgroundCode(s.code())) LatchAsync(e, s);
    return s;
  });
}

ztier_status_t ztier_partition_write(ztier_engine_t* engine, uint64_t id, const void* in,
                                     size_t bytes) {
  return WithEngine(engine, "ztier_partition_write", [&](ztier_engine& e) -> Status {
    ZTIER_ASSIGN_OR_RETURN(ztier_engine::Param * p, FindParam(e, id));
    ZTIER_RETURN_IF_ERROR(CheckBytes(*p, id, bytes, in, "partition write"));
    ZTIER_RETURN_IF_ERROR(EnsureFinalized(e));
    return e.rt->coordinator().WritePartition(id, in);
  });
}

namespace {

// The bodies of ztier_grad_partition_read/_write (checkpoints use them too).
Status ReadGradPartition(ztier_engine& e, ztier_engine::Param& p, uint64_t id, void* out) {
  if (!p.has_grad) {
    return Status::FailedPrecondition(fmt::format(
        "parameter {} has no gradient partition (hand one in with "
        "ztier_param_grad_reduce)",
        id));
  }
  if (GradsOnNvme(e)) {
    ZTIER_ASSIGN_OR_RETURN(auto* store, StoreFor(e, p, id));
    return store->Read(static_cast<uint32_t>(p.segment), out);
  }
  memcpy(out, p.grad.data(), p.grad.size());
  return Status::Ok();
}

Status WriteGradPartition(ztier_engine& e, ztier_engine::Param& p, uint64_t id, const void* in) {
  if (e.early != nullptr && e.early->IsReady(id)) CancelEarly(e);
  const auto type = co::ElementType(p.dtype);
  if (GradsOnNvme(e)) {
    ZTIER_RETURN_IF_ERROR(EnsureFinalized(e));
    ZTIER_ASSIGN_OR_RETURN(auto* store, StoreFor(e, p, id));
    p.has_grad = false;
    ZTIER_RETURN_IF_ERROR(
        store->Put(static_cast<uint32_t>(p.segment), in, /*accumulate=*/false, &p.sq_norm));
    p.has_grad = true;
    return Status::Ok();
  }
  const auto* src = static_cast<const uint8_t*>(in);
  p.grad.assign(src, src + p.part_numel * co::DTypeBytes(p.dtype));
  p.sq_norm = ztier::optim::SumSquares(p.grad.data(), p.part_numel, type);
  p.has_grad = true;
  if (e.early != nullptr) e.early->Ready(id, p.grad.data());
  return Status::Ok();
}

}  // namespace

ztier_status_t ztier_grad_partition_read(ztier_engine_t* engine, uint64_t id, void* out,
                                         size_t bytes) {
  return WithEngine(engine, "ztier_grad_partition_read", [&](ztier_engine& e) -> Status {
    ZTIER_ASSIGN_OR_RETURN(ztier_engine::Param * p, FindParam(e, id));
    ZTIER_RETURN_IF_ERROR(CheckBytes(*p, id, bytes, out, "gradient read"));
    return ReadGradPartition(e, *p, id, out);
  });
}

ztier_status_t ztier_grad_partition_write(ztier_engine_t* engine, uint64_t id, const void* in,
                                          size_t bytes) {
  return WithEngine(engine, "ztier_grad_partition_write", [&](ztier_engine& e) -> Status {
    ZTIER_ASSIGN_OR_RETURN(ztier_engine::Param * p, FindParam(e, id));
    ZTIER_RETURN_IF_ERROR(CheckBytes(*p, id, bytes, in, "gradient write"));
    return WriteGradPartition(e, *p, id, in);
  });
}

ztier_status_t ztier_grad_clear(ztier_engine_t* engine) {
  return WithEngine(engine, "ztier_grad_clear", [&](ztier_engine& e) -> Status {
    CancelEarly(e);
    // The buffers stay for the next step's gradients (see grad_reduce).
    for (auto& [id, p] : e.params) {
      p.has_grad = false;
      p.sq_norm = 0;
    }
    // A latched failed write goes with the gradients it lost.
    if (auto* store = GradStoreOf(e)) store->Clear();
    return Status::Ok();
  });
}

// ---------------------------------------------------------------- observing

// ---------------------------------------------------------------- optimizer step

namespace {

// A struct whose `size` this library does not know: checked before the
// engine call (ZTIER_STATUS_BAD_STRUCT_SIZE has no Status code).
ztier_status_t BadSize(ztier_engine* engine, const char* fn, const char* what, size_t size,
                       size_t known) {
  return Guard(fn, [&]() -> ztier_status_t {
    if (ztier_status_t h = CheckHandle(engine, fn); h != ZTIER_STATUS_OK) return h;
    return Fail(ZTIER_STATUS_BAD_STRUCT_SIZE, fn,
                fmt::format("{}->size is {}, this library knows {}", what, size, known));
  });
}

// Sizes of ztier_optimizer_options_t this library reads: 0.1's (without
// grad_scale) and today's.
constexpr size_t kOptionsSizeV1 = offsetof(ztier_optimizer_options_t, grad_scale);
constexpr size_t kOptionsSizeWithScale = sizeof(ztier_optimizer_options_t);
bool KnownOptionsSize(size_t size) {
  return size == kOptionsSizeV1 || size == kOptionsSizeWithScale;
}

Result<ztier::optim::AdamHyper> ToHyper(const ztier_optimizer_options_t& o) {
  ztier::optim::AdamHyper h;
  const int kind = RawEnum(o.kind);
  if (kind != ZTIER_OPTIMIZER_ADAMW && kind != ZTIER_OPTIMIZER_ADAM) {
    return Status::InvalidArgument(
        fmt::format("options->kind {} is not a ztier_optimizer_kind_t (0 AdamW, 1 Adam)", kind));
  }
  h.adamw = kind == ZTIER_OPTIMIZER_ADAMW;
  h.lr = o.lr;
  h.beta1 = o.beta1;
  h.beta2 = o.beta2;
  h.eps = o.eps;
  h.weight_decay = o.weight_decay;
  h.bias_correction = o.bias_correction != 0;
  // grad_scale came in 0.2; a struct of 0.1's size has none (1: unchanged).
  h.grad_scale = o.size >= kOptionsSizeWithScale ? o.grad_scale : 1.0;
  ZTIER_RETURN_IF_ERROR(ztier::optim::ValidateHyper(h));
  return h;
}

// Ends a background checkpoint save (a collective: every rank reaches it at
// the same call), keeping its outcome for ztier_checkpoint_wait; a failure
// is also latched as the engine's asynchronous error.
void SettleSave(ztier_engine& e) {
  if (e.save_job == nullptr) return;
  if (e.save_thread.joinable()) e.save_thread.join();  // the state is written
  Status s = e.save_job->Finish();
  e.save_job.reset();
  if (!s.ok()) LatchAsync(e, s.WithContext("background checkpoint save"));
  e.save_result = s;
}

// What an optimizer call does about a background save reading the state.
enum class Settle {
  kFinish,  // finish it (collective): the call changes the state
  kJoin,    // wait for its state part (local): the call reads the state
  kNone,    // nothing: the call touches no state
};

// The optimizer, once a background save allows the call.
Result<ztier::swapper::OptimizerSwapper*> GetOptimizer(ztier_engine& e,
                                                       Settle settle = Settle::kFinish) {
  if (settle == Settle::kFinish) SettleSave(e);
  if (settle == Settle::kJoin && e.save_thread.joinable()) e.save_thread.join();
  ztier::swapper::OptimizerSwapper* opt = e.rt->optimizer();
  if (opt == nullptr) {
    return Status::FailedPrecondition("the engine has no optimizer: call ztier_optimizer_create");
  }
  return opt;
}

}  // namespace

ztier_status_t ztier_optimizer_options_init(ztier_optimizer_options_t* options) {
  if (options == nullptr) {
    return Fail(ZTIER_STATUS_INVALID_ARGUMENT, "ztier_optimizer_options_init", "options is NULL");
  }
  memset(options, 0, sizeof(*options));
  options->size = sizeof(*options);
  options->kind = ZTIER_OPTIMIZER_ADAMW;
  options->lr = 1e-3;
  options->beta1 = 0.9;
  options->beta2 = 0.999;
  options->eps = 1e-8;
  options->weight_decay = 0.01;
  options->bias_correction = 1;
  options->grad_scale = 1.0;
  return ZTIER_STATUS_OK;
}

namespace {

// Every group's options checked (sizes, values, one kind for all).
Result<std::vector<ztier::optim::AdamHyper>> ToHypers(const ztier_optimizer_options_t* groups,
                                                      size_t group_count) {
  if (groups == nullptr) return Status::InvalidArgument("groups is NULL");
  if (group_count == 0) return Status::InvalidArgument("group_count is 0: give one group at least");
  if (group_count > ztier::swapper::OptimizerSwapper::kMaxGroups) {
    return Status::InvalidArgument(fmt::format("group_count {} is more than the {} groups allowed",
                                               group_count, ztier::swapper::OptimizerSwapper::kMaxGroups));
  }
  std::vector<ztier::optim::AdamHyper> hypers;
  for (size_t g = 0; g < group_count; ++g) {
    if (!KnownOptionsSize(groups[g].size)) {
      return Status::InvalidArgument(
          fmt::format("groups[{}].size is {}, this library knows {} (call "
                      "ztier_optimizer_options_init)",
                      g, groups[g].size, sizeof(ztier_optimizer_options_t)));
    }
    auto h = ToHyper(groups[g]);
    if (!h.ok()) return h.status().WithContext(fmt::format("groups[{}]", g));
    if (g > 0 && h->adamw != hypers[0].adamw) {
      return Status::InvalidArgument(fmt::format(
          "groups[{}].kind differs from groups[0].kind: one optimizer runs one kind", g));
    }
    hypers.push_back(*h);
  }
  return hypers;
}

// The optimizer over `segments` (layout order) with `hypers`, once per engine.
Status CreateOptimizer(ztier_engine& e, std::vector<ztier::optim::AdamHyper> hypers,
                       std::vector<ztier::swapper::OptimizerSegment> segments) {
  if (e.rt->optimizer() != nullptr) {
    return Status::FailedPrecondition("the engine already has an optimizer");
  }
  if (segments.empty()) {
    return Status::FailedPrecondition(
        "no float parameter is registered: register the parameters before the optimizer");
  }
  ZTIER_RETURN_IF_ERROR(EnsureFinalized(e));
  ZTIER_RETURN_IF_ERROR(e.rt->CreateOptimizer(std::move(segments)));
  e.hypers = std::move(hypers);
  const auto& laid = e.rt->optimizer()->segments();
  for (size_t k = 0; k < laid.size(); ++k) {
    e.params.at(laid[k].id).segment = static_cast<int64_t>(k);
  }
  return Status::Ok();
}

// A step's groups, checked against the optimizer's (count and kind).
Result<std::vector<ztier::optim::AdamHyper>> StepHypers(ztier_engine& e,
                                                        const ztier_optimizer_options_t* groups,
                                                        size_t group_count) {
  ZTIER_ASSIGN_OR_RETURN(auto hypers, ToHypers(groups, group_count));
  if (hypers.size() != e.hypers.size()) {
    return Status::InvalidArgument(fmt::format(
        "group_count is {}, but the optimizer was created with {} groups", hypers.size(),
        e.hypers.size()));
  }
  if (hypers[0].adamw != e.hypers[0].adamw) {
    return Status::InvalidArgument(
        "the groups' kind differs from the optimizer's (AdamW and Adam cannot be switched)");
  }
  return hypers;
}

bool SameHypers(const std::vector<ztier::optim::AdamHyper>& a,
                const std::vector<ztier::optim::AdamHyper>& b) {
  if (a.size() != b.size()) return false;
  for (size_t k = 0; k < a.size(); ++k) {
    const auto& x = a[k];
    const auto& y = b[k];
    if (x.lr != y.lr || x.beta1 != y.beta1 || x.beta2 != y.beta2 || x.eps != y.eps ||
        x.weight_decay != y.weight_decay || x.adamw != y.adamw ||
        x.bias_correction != y.bias_correction || x.grad_scale != y.grad_scale) {
      return false;
    }
  }
  return true;
}

Status StepOptimizer(ztier_engine& e) {
  return e.rt->OptimizerStep(e.hypers, [&e](uint64_t id) -> const void* {
    const ztier_engine::Param& p = e.params.at(id);
    if (!p.has_grad) return nullptr;
    // In the gradient store any non-null pointer says "it has one".
    return GradsOnNvme(e) ? static_cast<const void*>(&p) : p.grad.data();
  });
}

}  // namespace

ztier_status_t ztier_optimizer_create(ztier_engine_t* engine,
                                      const ztier_optimizer_options_t* options) {
  if (options != nullptr && !KnownOptionsSize(options->size)) {
    return BadSize(engine, "ztier_optimizer_create", "options", options->size, sizeof(*options));
  }
  return WithEngine(engine, "ztier_optimizer_create", [&](ztier_engine& e) -> Status {
    if (options == nullptr) return Status::InvalidArgument("options is NULL");
    ZTIER_ASSIGN_OR_RETURN(ztier::optim::AdamHyper h, ToHyper(*options));
    std::vector<ztier::swapper::OptimizerSegment> segments;
    for (uint64_t id : e.param_order) {
      const ztier_engine::Param& p = e.params.at(id);
      if (p.dtype == co::DType::kUInt8) continue;
      segments.push_back({id, p.part_numel, co::ElementType(p.dtype), 0});
    }
    return CreateOptimizer(e, {h}, std::move(segments));
  });
}

ztier_status_t ztier_optimizer_create_groups(ztier_engine_t* engine,
                                             const ztier_optimizer_options_t* groups,
                                             size_t group_count, const uint64_t* param_ids,
                                             const uint32_t* param_groups, size_t param_count) {
  return WithEngine(engine, "ztier_optimizer_create_groups", [&](ztier_engine& e) -> Status {
    ZTIER_ASSIGN_OR_RETURN(auto hypers, ToHypers(groups, group_count));
    if (param_count > 0 && (param_ids == nullptr || param_groups == nullptr)) {
      return Status::InvalidArgument(fmt::format(
          "param_ids or param_groups is NULL with param_count {}", param_count));
    }
    std::unordered_map<uint64_t, uint32_t> group_of;
    for (size_t i = 0; i < param_count; ++i) {
      const uint64_t id = param_ids[i];
      ZTIER_ASSIGN_OR_RETURN(ztier_engine::Param * p, FindParam(e, id));
      if (p->dtype == co::DType::kUInt8) {
        return Status::InvalidArgument(
            fmt::format("param_ids[{}]: parameter {} is uint8: it has no gradient", i, id));
      }
      if (param_groups[i] >= group_count) {
        return Status::InvalidArgument(fmt::format(
            "param_groups[{}] is {}, but there are {} groups", i, param_groups[i], group_count));
      }
      if (!group_of.emplace(id, param_groups[i]).second) {
        return Status::InvalidArgument(
            fmt::format("param_ids[{}]: parameter {} is listed twice", i, id));
      }
    }
    std::vector<ztier::swapper::OptimizerSegment> segments;
    for (uint64_t id : e.param_order) {
      auto it = group_of.find(id);
      if (it == group_of.end()) continue;
      const ztier_engine::Param& p = e.params.at(id);
      segments.push_back({id, p.part_numel, co::ElementType(p.dtype), it->second});
    }
    return CreateOptimizer(e, std::move(hypers), std::move(segments));
  });
}

ztier_status_t ztier_optimizer_step(ztier_engine_t* engine,
                                    const ztier_optimizer_options_t* options) {
  if (options != nullptr && !KnownOptionsSize(options->size)) {
    return BadSize(engine, "ztier_optimizer_step", "options", options->size, sizeof(*options));
  }
  return WithEngine(engine, "ztier_optimizer_step", [&](ztier_engine& e) -> Status {
    ZTIER_RETURN_IF_ERROR(GetOptimizer(e).status());
    CancelEarly(e);
    if (options != nullptr) {
      if (e.hypers.size() != 1) {
        return Status::InvalidArgument(fmt::format(
            "the optimizer has {} parameter groups: give each its options with "
            "ztier_optimizer_step_groups (or options NULL to keep the last ones)",
            e.hypers.size()));
      }
      ZTIER_ASSIGN_OR_RETURN(ztier::optim::AdamHyper h, ToHyper(*options));
      if (h.adamw != e.hypers[0].adamw) {
        return Status::InvalidArgument(
            "options->kind differs from the optimizer's (AdamW and Adam cannot be switched)");
      }
      e.hypers[0] = h;
    }
    return StepOptimizer(e);
  });
}

ztier_status_t ztier_optimizer_step_groups(ztier_engine_t* engine,
                                           const ztier_optimizer_options_t* groups,
                                           size_t group_count) {
  return WithEngine(engine, "ztier_optimizer_step_groups", [&](ztier_engine& e) -> Status {
    ZTIER_RETURN_IF_ERROR(GetOptimizer(e).status());
    ZTIER_ASSIGN_OR_RETURN(auto hypers, StepHypers(e, groups, group_count));
    CancelEarly(e);
    e.hypers = std::move(hypers);
    return StepOptimizer(e);
  });
}

ztier_status_t ztier_optimizer_step_begin(ztier_engine_t* engine,
                                          const ztier_optimizer_options_t* groups,
                                          size_t group_count) {
  return WithEngine(engine, "ztier_optimizer_step_begin", [&](ztier_engine& e) -> Status {
    ZTIER_ASSIGN_OR_RETURN(auto* opt, GetOptimizer(e));
    ZTIER_ASSIGN_OR_RETURN(auto hypers, StepHypers(e, groups, group_count));
    if (e.early != nullptr) {
      return Status::FailedPrecondition(
          "an optimizer step is already begun: finish or cancel it first");
    }
    if (GradsOnNvme(e)) {
      return Status::FailedPrecondition(
          "tiers.gradients is nvme: the step reads the gradients back with the state, so it "
          "cannot begin during backward (use ztier_optimizer_step, or tiers.gradients: host)");
    }
    e.early = co::BackgroundStep::Start(opt, std::move(hypers));
    // Gradients handed in before the begin are ready as they are.
    for (auto& [id, p] : e.params) {
      if (p.has_grad) e.early->Ready(id, p.grad.data());
    }
    return Status::Ok();
  });
}

ztier_status_t ztier_optimizer_step_finish(ztier_engine_t* engine,
                                           const ztier_optimizer_options_t* groups,
                                           size_t group_count) {
  return WithEngine(engine, "ztier_optimizer_step_finish", [&](ztier_engine& e) -> Status {
    ZTIER_ASSIGN_OR_RETURN(auto* opt, GetOptimizer(e));
    ZTIER_ASSIGN_OR_RETURN(auto hypers, StepHypers(e, groups, group_count));
    if (e.early != nullptr && !SameHypers(hypers, e.early->hypers())) {
      CancelEarly(e);  // begun with other hyperparameters: run it again
    }
    e.hypers = std::move(hypers);
    if (e.early == nullptr) return StepOptimizer(e);
    Status s = e.early->Finish();
    if (!s.ok()) {
      CancelEarly(e);
      return s;
    }
    // Publish the updated partitions, then commit the state.
    std::vector<uint64_t> ids;
    std::vector<const void*> data;
    for (const auto& [id, bytes] : e.early->staged()) {
      ids.push_back(id);
      data.push_back(bytes.data());
    }
    s = e.rt->coordinator().WritePartitions(ids, data);
    if (!s.ok()) {
      const uint64_t step = opt->step();
      CancelEarly(e);  // discards the uncommitted state
      return s.WithContext(fmt::format(
          "optimizer step {} failed and was not applied (the state of step {} is intact; fix "
          "the cause and run the same step again: the gradients are kept)",
          step + 1, step));
    }
    s = opt->Commit();
    e.early.reset();
    return s;
  });
}

ztier_status_t ztier_optimizer_step_cancel(ztier_engine_t* engine) {
  return WithEngine(engine, "ztier_optimizer_step_cancel", [&](ztier_engine& e) -> Status {
    CancelEarly(e);
    return Status::Ok();
  });
}

ztier_status_t ztier_optimizer_state_read(ztier_engine_t* engine, uint64_t id,
                                          ztier_state_array_t array, float* out, size_t bytes) {
  return WithEngine(engine, "ztier_optimizer_state_read", [&](ztier_engine& e) -> Status {
    ZTIER_ASSIGN_OR_RETURN(auto* opt, GetOptimizer(e, Settle::kJoin));
    if (e.early != nullptr) {
      return Status::FailedPrecondition(
          "an optimizer step is begun: read the state after ztier_optimizer_step_finish");
    }
    ZTIER_ASSIGN_OR_RETURN(ztier_engine::Param * p, FindParam(e, id));
    const int a = RawEnum(array);
    if (a < ZTIER_STATE_MASTER || a > ZTIER_STATE_EXP_AVG_SQ) {
      return Status::InvalidArgument(fmt::format(
          "array {} is not a ztier_state_array_t (0 master, 1 exp_avg, 2 exp_avg_sq)", a));
    }
    if (out == nullptr) return Status::InvalidArgument("out is NULL");
    if (bytes != p->part_numel * sizeof(float)) {
      return Status::InvalidArgument(fmt::format(
          "optimizer state of parameter {}: {} bytes given, it is {} bytes ({} float32)", id,
          bytes, p->part_numel * sizeof(float), p->part_numel));
    }
    return opt->ReadState(id, static_cast<ztier::swapper::StateArray>(a), out);
  });
}

ztier_status_t ztier_optimizer_stats(ztier_engine_t* engine, ztier_optimizer_stats_t* stats) {
  if (stats != nullptr && stats->size != sizeof(*stats)) {
    return BadSize(engine, "ztier_optimizer_stats", "stats", stats->size, sizeof(*stats));
  }
  return WithEngine(engine, "ztier_optimizer_stats", [&](ztier_engine& e) -> Status {
    if (stats == nullptr) return Status::InvalidArgument("stats is NULL");
    ZTIER_ASSIGN_OR_RETURN(auto* opt, GetOptimizer(e, Settle::kNone));
    const ztier::swapper::OptimizerStepStats last = opt->last_step_stats();
    ztier_optimizer_stats_t s;
    memset(&s, 0, sizeof(s));
    s.size = sizeof(s);
    s.step = opt->step();
    s.elements = opt->total_elements();
    s.sub_groups = opt->sub_group_count();
    s.threads = opt->threads();
    s.isa = static_cast<uint32_t>(opt->isa());
    s.peak_buffers = last.peak_buffers;
    s.slot_bytes = opt->slot_bytes();
    s.bytes_read = last.bytes_read;
    s.bytes_written = last.bytes_written;
    s.param_bytes = last.param_bytes;
    s.step_s = last.seconds;
    s.read_wait_s = last.read_wait_s;
    s.update_s = last.update_s;
    s.drain_s = last.drain_s;
    *stats = s;
    return Status::Ok();
  });
}

ztier_status_t ztier_engine_stats(ztier_engine_t* engine, ztier_stats_t* stats) {
  constexpr const char* fn = "ztier_engine_stats";
  return Guard(fn, [&]() -> ztier_status_t {
    if (ztier_status_t h = CheckHandle(engine, fn); h != ZTIER_STATUS_OK) return h;
    if (stats == nullptr) return Fail(ZTIER_STATUS_INVALID_ARGUMENT, fn, "stats is NULL");
    // The struct before the trace counters ended at stall_device_s.
    constexpr size_t kV1 = offsetof(ztier_stats_t, fetch_calls_with_demand);
    if (stats->size != sizeof(ztier_stats_t) && stats->size != kV1) {
      return Fail(ZTIER_STATUS_BAD_STRUCT_SIZE, fn,
                  fmt::format("stats->size is {}, this library knows {} (and {})", stats->size,
                              sizeof(ztier_stats_t), kV1));
    }
    const size_t caller_size = stats->size;
    const co::CoordinatorStats c = engine->rt->coordinator().stats();
    ztier_stats_t s;
    memset(&s, 0, sizeof(s));
    s.size = sizeof(s);
    s.steps = c.steps;
    s.fetch_calls = c.fetch_calls;
    s.demand_gathers = c.demand_gathers;
    s.prefetch_gathers = c.prefetch_gathers;
    s.releases = c.releases;
    s.nvme_reads = c.nvme_reads;
    if (const ztier::swapper::ParamSwapper* sw = engine->rt->swapper()) {
      const auto ss = sw->stats();
      s.nvme_bytes_read = ss.bytes_read;
      s.nvme_bytes_written = ss.bytes_written;
    }
    s.grad_reduces = engine->grad_reduces.load(std::memory_order_relaxed);
    s.live_numel = c.live_numel;
    s.peak_live_numel = c.peak_live_numel;
    s.peak_swap_buffers = c.peak_swap_buffers;
    s.trace_mode = static_cast<uint32_t>(engine->rt->coordinator().trace_mode());
    s.stall_nvme_s = c.stall_nvme_s;
    s.stall_device_s = c.stall_device_s;
    s.fetch_calls_with_demand = c.fetch_calls_with_demand;
    s.trace_orders = c.trace_orders;
    s.trace_switches = c.trace_switches;
    s.trace_resyncs = c.trace_resyncs;
    s.trace_off = c.trace_off;
    s.hints = c.hints;
    s.hint_gathers = c.hint_gathers;
    s.speculative_gathers = c.speculative_gathers;
    s.speculation_hits = c.speculation_hits;
    s.speculation_misses = c.speculation_misses;
    s.speculation_wasted = c.speculation_wasted;
    s.repacks = c.repacks;
    s.size = caller_size;
    memcpy(stats, &s, caller_size);
    return ZTIER_STATUS_OK;
  });
}

ztier_status_t ztier_engine_async_error(ztier_engine_t* engine, ztier_status_t* status,
                                        char* message, size_t message_bytes) {
  constexpr const char* fn = "ztier_engine_async_error";
  return Guard(fn, [&]() -> ztier_status_t {
    if (ztier_status_t h = CheckHandle(engine, fn); h != ZTIER_STATUS_OK) return h;
    if (status == nullptr) return Fail(ZTIER_STATUS_INVALID_ARGUMENT, fn, "status is NULL");
    LatchAsync(*engine, engine->rt->coordinator().PendingAsyncError());
    std::lock_guard<std::mutex> lock(engine->async_mu);
    *status = engine->async_status;
    CopyText(engine->async_message, message, message_bytes);
    return ZTIER_STATUS_OK;
  });
}

ztier_status_t ztier_engine_clear_async_error(ztier_engine_t* engine) {
  constexpr const char* fn = "ztier_engine_clear_async_error";
  return Guard(fn, [&]() -> ztier_status_t {
    if (ztier_status_t h = CheckHandle(engine, fn); h != ZTIER_STATUS_OK) return h;
    std::lock_guard<std::mutex> lock(engine->async_mu);
    engine->async_status = ZTIER_STATUS_OK;
    engine->async_message.clear();
    return ZTIER_STATUS_OK;
  });
}

ztier_status_t ztier_engine_device(ztier_engine_t* engine, ztier_device_kind_t* kind,
                                   int32_t* ordinal) {
  constexpr const char* fn = "ztier_engine_device";
  return Guard(fn, [&]() -> ztier_status_t {
    if (ztier_status_t h = CheckHandle(engine, fn); h != ZTIER_STATUS_OK) return h;
    if (kind == nullptr) return Fail(ZTIER_STATUS_INVALID_ARGUMENT, fn, "kind is NULL");
    const ti::DeviceBackend* d = engine->rt->device();
    const bool cuda = d != nullptr && d->name() == "cuda";
    *kind = cuda ? ZTIER_DEVICE_CUDA : ZTIER_DEVICE_HOST;
    if (ordinal) *ordinal = cuda ? engine->rt->options().cuda_device : -1;
    return ZTIER_STATUS_OK;
  });
}

ztier_status_t ztier_engine_describe(ztier_engine_t* engine, char* out, size_t out_bytes) {
  return WithEngine(engine, "ztier_engine_describe", [&](ztier_engine& e) -> Status {
    // Copied as ztier_engine_async_error copies: NULL or 0 bytes copies nothing.
    CopyText(e.rt->Describe(), out, out_bytes);
    return Status::Ok();
  });
}

}  // extern "C"

// ---------------------------------------------------------------- checkpoints

namespace {

namespace ck = ztier::checkpoint;

// What the checkpoint library needs of this engine.
ck::RankAccess AccessOf(ztier_engine& e) {
  ck::RankAccess a;
  ck::BindRuntime(*e.rt, &a);
  for (uint64_t id : e.param_order) {
    const ztier_engine::Param& p = e.params.at(id);
    a.params.push_back({id, p.name, p.shape, p.numel, p.dtype, p.part_numel, p.has_grad, p.segment});
  }
  a.read_grad = [&e](uint64_t id, void* out) {
    return ReadGradPartition(e, e.params.at(id), id, out);
  };
  a.write_grad = [&e](uint64_t id, const void* in) {
    return WriteGradPartition(e, e.params.at(id), id, in);
  };
  a.hypers = e.hypers;
  a.library_version = ZTIER_VERSION_STRING;
  return a;
}

Status CheckDir(const char* dir) {
  if (dir == nullptr || dir[0] == '\0') {
    return Status::InvalidArgument("the checkpoint directory is NULL or empty");
  }
  return Status::Ok();
}

// Begins a save (ztier_checkpoint_save and _save_async). Refusals go
// through the save's first agreement between the ranks, so that one rank's
// refusal fails the save everywhere instead of hanging it.
Result<std::unique_ptr<ck::SaveJob>> BeginSave(ztier_engine& e, const char* dir,
                                               const void* user_data, size_t user_bytes) {
  ZTIER_RETURN_IF_ERROR(EnsureFinalized(e));
  SettleSave(e);  // one save at a time (a collective: every rank saves here)
  Status refused = CheckDir(dir);
  if (refused.ok() && user_bytes > 0 && user_data == nullptr) {
    refused = Status::InvalidArgument("user_data is NULL with user_bytes > 0");
  }
  if (refused.ok() && user_bytes > ck::kMaxJsonBytes) {
    refused = Status::InvalidArgument(
        fmt::format("user_bytes {} is above the limit {}", user_bytes, ck::kMaxJsonBytes));
  }
  if (refused.ok() && e.early != nullptr) {
    refused = Status::FailedPrecondition(
        "an optimizer step is begun: finish (or cancel) it before saving a checkpoint");
  }
  if (refused.ok()) refused = e.rt->coordinator().CheckNoneActive("a checkpoint save");
  const bool ok = refused.ok();
  const auto* u = static_cast<const uint8_t*>(ok ? user_data : nullptr);
  return ck::SaveJob::Begin(AccessOf(e), ok ? dir : "",
                            std::span<const uint8_t>(u, ok ? user_bytes : 0), ck::Fs::Posix(),
                            refused);
}

}  // namespace

extern "C" {

ztier_status_t ztier_param_set_name(ztier_engine_t* engine, uint64_t id, const char* name,
                                    const uint64_t* shape, size_t ndim) {
  return WithEngine(engine, "ztier_param_set_name", [&](ztier_engine& e) -> Status {
    ZTIER_ASSIGN_OR_RETURN(ztier_engine::Param * p, FindParam(e, id));
    if (name == nullptr) return Status::InvalidArgument("name is NULL");
    if (ndim > 64 || (ndim > 0 && shape == nullptr)) {
      return Status::InvalidArgument(
          fmt::format("shape: {} dimensions at {} (at most 64, and not NULL)", ndim,
                      static_cast<const void*>(shape)));
    }
    unsigned __int128 product = 1;
    for (size_t d = 0; d < ndim; ++d) {
      product *= shape[d];
      if (product > p->numel) break;  // no overflow: it can only grow past numel
    }
    if (product != p->numel) {
      return Status::InvalidArgument(fmt::format(
          "the shape's product differs from parameter {}'s {} elements", id, p->numel));
    }
    p->name = name;
    p->shape.emplace(shape, shape + ndim);
    return Status::Ok();
  });
}

ztier_status_t ztier_checkpoint_save(ztier_engine_t* engine, const char* dir,
                                     const void* user_data, size_t user_bytes) {
  return WithEngine(engine, "ztier_checkpoint_save", [&](ztier_engine& e) -> Status {
    ZTIER_ASSIGN_OR_RETURN(auto job, BeginSave(e, dir, user_data, user_bytes));
    return job->Finish();
  });
}

ztier_status_t ztier_checkpoint_save_async(ztier_engine_t* engine, const char* dir,
                                           const void* user_data, size_t user_bytes) {
  return WithEngine(engine, "ztier_checkpoint_save_async", [&](ztier_engine& e) -> Status {
    ZTIER_ASSIGN_OR_RETURN(e.save_job, BeginSave(e, dir, user_data, user_bytes));
    e.save_result = Status::Ok();
    // The optimizer state is written while training goes on; nothing else
    // reads or changes it until the save is settled (SettleSave).
    ck::SaveJob* job = e.save_job.get();
    e.save_thread = std::thread([job] { (void)job->WriteState(); });
    return Status::Ok();
  });
}

ztier_status_t ztier_checkpoint_wait(ztier_engine_t* engine) {
  return WithEngine(engine, "ztier_checkpoint_wait", [&](ztier_engine& e) -> Status {
    SettleSave(e);
    Status s = e.save_result;
    e.save_result = Status::Ok();
    return s;
  });
}

ztier_status_t ztier_checkpoint_load(ztier_engine_t* engine, const char* dir) {
  return WithEngine(engine, "ztier_checkpoint_load", [&](ztier_engine& e) -> Status {
    ZTIER_RETURN_IF_ERROR(CheckDir(dir));
    ZTIER_RETURN_IF_ERROR(EnsureFinalized(e));
    if (e.save_thread.joinable()) e.save_thread.join();  // a background save's reads end first
    ZTIER_RETURN_IF_ERROR(e.rt->coordinator().CheckNoneActive("a checkpoint load"));
    CancelEarly(e);
    bool wrote = false;
    ck::RankAccess access = AccessOf(e);
    // The engine's pending gradients give way to the checkpoint's, once the
    // checkpoint is known to fit.
    access.before_load = [&e] {
      for (auto& [id, p] : e.params) {
        p.has_grad = false;
        p.sq_norm = 0;
      }
      if (auto* store = GradStoreOf(e)) store->Clear();
    };
    Result<ck::Manifest> loaded = ck::Load(access, dir, &wrote);
    if (!loaded.ok()) {
      if (wrote) {
        e.failed = fmt::format("a checkpoint load from {} failed part-way ({}); the engine holds "
                               "a mix of states",
                               dir, loaded.status().message());
      }
      return loaded.status();
    }
    if (!loaded->groups.empty()) e.hypers = loaded->groups;
    return Status::Ok();
  });
}

}  // extern "C"

namespace {

// ztier_checkpoint_user_data and _rank_user_data: rank 0's (rank < 0) or
// `rank`'s user data.
ztier_status_t CopyUserData(const char* fn, const char* dir, int64_t rank, void* out,
                            size_t capacity, size_t* bytes) {
  return Guard(fn, [&]() -> ztier_status_t {
    if (Status s = CheckDir(dir); !s.ok()) return FromStatus(s, fn);
    if (bytes == nullptr) return FromStatus(Status::InvalidArgument("bytes is NULL"), fn);
    Result<std::string> text = rank < 0 ? ck::ReadUserData(dir)
                                        : ck::ReadUserData(dir, static_cast<uint32_t>(rank));
    if (!text.ok()) return FromStatus(text.status(), fn);
    *bytes = text->size();
    if (out == nullptr || capacity < text->size()) {
      if (out == nullptr && capacity == 0) return ZTIER_STATUS_OK;  // a size query
      return FromStatus(Status::InvalidArgument(fmt::format(
                            "capacity {} is below the user data's {} bytes", capacity, text->size())),
                        fn);
    }
    memcpy(out, text->data(), text->size());
    return ZTIER_STATUS_OK;
  });
}

}  // namespace

extern "C" {

ztier_status_t ztier_checkpoint_user_data(const char* dir, void* out, size_t capacity,
                                          size_t* bytes) {
  return CopyUserData("ztier_checkpoint_user_data", dir, -1, out, capacity, bytes);
}

ztier_status_t ztier_checkpoint_rank_user_data(const char* dir, uint32_t rank, void* out,
                                               size_t capacity, size_t* bytes) {
  return CopyUserData("ztier_checkpoint_rank_user_data", dir, rank, out, capacity, bytes);
}

ztier_status_t ztier_checkpoint_verify(const char* dir, char* summary, size_t summary_bytes) {
  return Guard("ztier_checkpoint_verify", [&]() -> ztier_status_t {
    const char* fn = "ztier_checkpoint_verify";
    if (Status s = CheckDir(dir); !s.ok()) return FromStatus(s, fn);
    std::string text;
    Status s = ck::Verify(dir, &text);
    CopyText(s.ok() ? text : std::string(s.message()), summary, summary_bytes);
    return FromStatus(s, fn);
  });
}

ztier_status_t ztier_checkpoint_export(const char* dir, const char* out_path) {
  return Guard("ztier_checkpoint_export", [&]() -> ztier_status_t {
    const char* fn = "ztier_checkpoint_export";
    if (Status s = CheckDir(dir); !s.ok()) return FromStatus(s, fn);
    if (out_path == nullptr || out_path[0] == '\0') {
      return FromStatus(Status::InvalidArgument("out_path is NULL or empty"), fn);
    }
    return FromStatus(ck::ExportTorch(dir, out_path), fn);
  });
}

}  // extern "C"
