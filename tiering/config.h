// Config: the effective configuration of a ztier engine, and its YAML form.
//
// Config is a plain value: nested structs whose members hold the defaults
// (DeepSpeed's code defaults where the concept is the same). A YAML file is
// loaded strictly: an unknown key, a wrong type, an out-of-range value, a bad
// unit or a missing NVMe path parent is an error; all of them are collected
// and returned together in one InvalidArgument Status, one line per error:
//
//   config.yaml:12:5: tiers.nvme.buffer_cont: unknown key (did you mean
//   'buffer_count'?)
//
// Units: element counts ("1e8") and byte sizes ("1MiB") are described in
// tiering/units.h; every key, its unit, default and range in docs/config.md.
//
// String values may reference environment variables: ${VAR} (an error when
// VAR is unset) and ${VAR:-default} (default when VAR is unset or empty); $$
// is a literal $. Relative NVMe paths are relative to the process's working
// directory.
//
// Thread-safety: the functions are reentrant (they read the environment and
// the file system, nothing else). The library never prints.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"
#include "io/backend.h"
#include "tiering/units.h"

namespace ztier::tiering {

// Where this rank's parameter partitions live between uses.
enum class ParamTier : uint8_t {
  kNvme = 0,  // on the NVMe paths; pinned swap buffers stage them
  kHost,      // in (pinned) host memory; no NVMe is used
};

// Where this rank's gradient partitions live from their hand-in during
// backward until the optimizer step consumes them.
enum class GradTier : uint8_t {
  kHost = 0,  // in host memory (one partition-sized buffer per parameter)
  kNvme,      // in a gradient file on the optimizer paths, read back with the
              // optimizer state; host memory holds only staging
};

enum class CommBackend : uint8_t { kAuto = 0, kNccl, kLocal, kGloo };

enum class Checksum : uint8_t { kCrc32c = 0, kNone };

// How the coordinator follows module orders that change between steps:
// adaptive learns several orders with choice slots; single keeps one and
// drops it at the first deviation (DeepSpeed's rule).
enum class TracePolicy : uint8_t { kAdaptive = 0, kSingle };

// Where the optimizer state (fp32 master weights and Adam's two moments: 12
// bytes per parameter element) lives between optimizer steps.
enum class OptimizerTier : uint8_t {
  kNvme = 0,  // in state files on the optimizer paths, staged by sub-group
  kHost,      // in host memory for the whole run; no NVMe is used
};

// The CPU instruction set of the optimizer update.
enum class OptimizerIsa : uint8_t {
  kAuto = 0,  // the best this CPU has
  kAvx512,
  kAvx2,
  kScalar,  // portable C++, any CPU
};

std::string_view ParamTierName(ParamTier t);          // "nvme", "host"
std::string_view GradTierName(GradTier t);            // "host", "nvme"
std::string_view CommBackendName(CommBackend b);  // "auto", "nccl", "local", "gloo"
std::string_view ChecksumName(Checksum c);            // "crc32c", "none"
std::string_view TracePolicyName(TracePolicy p);      // "adaptive", "single"
std::string_view OptimizerTierName(OptimizerTier t);  // "nvme", "host"
// "auto", "avx512", "avx2", "scalar".
std::string_view OptimizerIsaName(OptimizerIsa i);
// The config spelling of an io backend: "auto", "io_uring", "libaio", "psync".
std::string_view IoBackendConfigName(io::BackendKind k);

// The NVMe path used when tiers.nvme.paths is not given (before expansion).
inline constexpr std::string_view kDefaultNvmePath =
    "${ZTIER_NVME_PATH:-ztier_nvme}";

struct DeviceTier {
  // Elements of full (gathered) parameters allowed on the device at once;
  // prefetch stops at this budget. kInfinite ("inf"): no limit.
  uint64_t max_live_parameters = 1'000'000'000;

  bool operator==(const DeviceTier&) const = default;
};

struct HostTier {
  // Allocate swap buffers and host-tier partitions in page-locked memory
  // (fast DMA, counts against RLIMIT_MEMLOCK).
  bool pin_memory = true;
  // With tiers.params == nvme: elements of parameter partitions that may
  // stay resident in host memory instead of going to NVMe.
  uint64_t max_in_cpu = 1'000'000'000;
  // When pinning is refused (memlock limit), continue with pageable memory
  // (slower copies) instead of failing.
  bool allow_unpinned = false;

  bool operator==(const HostTier&) const = default;
};

struct NvmeTier {
  // Directories that hold the swap files, one file per path per rank;
  // several paths are striped. Empty only when params live on the host. A
  // path's parent must exist; the path itself is created (mode 0700).
  std::vector<std::string> paths;
  // Pinned swap buffers that stage partitions between NVMe and the device.
  uint32_t buffer_count = 5;
  // Elements per swap buffer. A larger partition takes several adjacent
  // buffers; one larger than buffer_count buffers is rejected at start.
  uint64_t buffer_size = 100'000'000;
  // Bytes per element in a swap buffer (2: fp16/bf16, 4: fp32); a buffer is
  // buffer_size * buffer_element_bytes bytes (rounded up to the direct I/O
  // alignment). 1, 2, 4 or 8.
  uint32_t buffer_element_bytes = 2;

  bool operator==(const NvmeTier&) const = default;
};

struct TiersConfig {
  ParamTier params = ParamTier::kNvme;
  // nvme needs ztier's optimizer (its files go to OptimizerPaths).
  GradTier gradients = GradTier::kHost;
  DeviceTier device;
  HostTier host;
  NvmeTier nvme;

  bool operator==(const TiersConfig&) const = default;
};

struct IoConfig {
  // auto probes io_uring, libaio, psync in this order; an explicit backend
  // that is unavailable is an error.
  io::BackendKind backend = io::BackendKind::kAuto;
  // Bytes per I/O request; transfers are split into pieces of this size.
  // A multiple of 4 KiB, 4 KiB to 256 MiB.
  uint64_t block_size = 1ULL << 20;
  // Requests in flight at most, per I/O thread. 1 to 4096.
  uint32_t queue_depth = 32;
  // I/O submission threads, each with its own queue. 1 to 64.
  uint32_t threads = 1;
  // io_uring fixed buffers for the swap buffers (saves a page walk per I/O;
  // needs memlock).
  bool register_buffers = true;
  // io_uring kernel submission-queue polling (a kernel thread spins).
  bool sqpoll = false;
  // O_DIRECT: bypass the page cache (needs 4 KiB-aligned buffers/offsets).
  bool direct = true;

  bool operator==(const IoConfig&) const = default;
};

struct CoordinatorConfig {
  // Elements of parameters all-gathered ahead of use, at most.
  uint64_t prefetch_bucket_size = 50'000'000;
  // A released parameter is kept if it is used again within this many
  // elements of the trace ahead. kInfinite: always kept while reused.
  uint64_t max_reuse_distance = 1'000'000'000;
  // Parameters of at most this many elements are persistent (gathered once).
  uint64_t param_persistence_threshold = 100'000;
  // Elements of persistent parameters in total, at most. kInfinite: no cap.
  uint64_t model_persistence_threshold = kInfinite;
  // All-gathers queued at once, at most. 1 to 1024.
  uint32_t max_ongoing_fetch_events = 2;
  // Elements of NVMe reads issued ahead of use, in trace order. nullopt
  // ("auto"): as far as free swap buffers and max_live_parameters allow.
  std::optional<uint64_t> nvme_lookahead;
  TracePolicy trace_policy = TracePolicy::kAdaptive;
  // Module orders the adaptive policy keeps at once. 1 to 64.
  uint32_t trace_orders = 8;

  bool operator==(const CoordinatorConfig&) const = default;
};

struct CommConfig {
  CommBackend backend =
      CommBackend::kAuto;  // auto: nccl on CUDA, local with a local group, else gloo
  // Seconds a rank waits for another in one collective (gloo) before it fails
  // naming that rank; a rank whose process died is reported at once.
  uint32_t timeout = 60;

  bool operator==(const CommConfig&) const = default;
};

struct IntegrityConfig {
  Checksum checksum = Checksum::kCrc32c;  // per swapped extent, checked on read

  bool operator==(const IntegrityConfig&) const = default;
};

struct OptimizerConfig {
  OptimizerTier tier = OptimizerTier::kNvme;
  // Directories for the optimizer-state files (one per path per rank);
  // empty: tiers.nvme.paths, the same drives as the parameters. The same
  // rules as tiers.nvme.paths: a path's parent must exist (checked when
  // LoadOptions::check_paths), the path itself is created. Used only with
  // tier nvme.
  std::vector<std::string> paths;
  // Host buffers, each holding one sub-group's state during the step: reads
  // of the next sub-groups and writes of the previous ones overlap the update
  // while buffers last. Pageable (the state never goes to the device). 1 (no
  // overlap) to 64.
  uint32_t buffer_count = 4;
  // Elements per sub-group: the unit of the pipelined step (read, update,
  // write). Each buffer is sub_group_size * 12 bytes (+4 KiB header). 1 to
  // 1e10.
  uint64_t sub_group_size = 100'000'000;
  // Update threads (and checksum threads) per rank; 0: all cores. 0 to 1024.
  uint32_t threads = 0;
  // An explicit ISA the CPU lacks is an error when the optimizer is created,
  // not at config load (a config may be checked on another machine).
  OptimizerIsa isa = OptimizerIsa::kAuto;

  bool operator==(const OptimizerConfig&) const = default;
};

struct Config {
  TiersConfig tiers;
  IoConfig io;
  CoordinatorConfig coordinator;
  CommConfig comm;
  IntegrityConfig integrity;
  OptimizerConfig optimizer;

  bool operator==(const Config&) const = default;
};

struct LoadOptions {
  // Check the NVMe paths against the file system (parent exists, a present
  // path is a writable directory). Off for checking a config meant for
  // another machine.
  bool check_paths = true;
};

// Loads a YAML file. A file that cannot be read is NotFound/IoError; every
// problem in its content is reported (InvalidArgument, one line each).
Result<Config> LoadConfigFile(const std::string& path,
                              const LoadOptions& options = {});

// Loads YAML text; `source_name` prefixes each error line ("config.yaml").
Result<Config> LoadConfigText(std::string_view yaml,
                              std::string_view source_name,
                              const LoadOptions& options = {});

// Checks a Config built in code by the same rules as the loader (without
// line numbers; lines look like "io.queue_depth: ..."). Paths are checked
// when options.check_paths.
Status ValidateConfig(const Config& config, const LoadOptions& options = {});

// The YAML of `config`, every key present with a short unit comment.
// LoadConfigText(ConfigToYaml(c)) gives back c for every valid c.
std::string ConfigToYaml(const Config& config);

// A one-screen, human-readable summary of the effective config.
std::string SummarizeConfig(const Config& config);

// The directories the optimizer state goes to: optimizer.paths, else
// tiers.nvme.paths. Empty when neither is set (possible with tiers.params
// host): an error for optimizer.tier nvme, reported by the caller when the
// optimizer is created (the config itself loads, since an optimizer is
// optional).
std::vector<std::string> OptimizerPaths(const Config& config);

// Expands ${VAR} / ${VAR:-default} / $$ in `text`. Error messages name the
// variable; the caller adds where it was.
Result<std::string> ExpandEnv(std::string_view text);

// Levenshtein distance (for "did you mean" suggestions).
size_t EditDistance(std::string_view a, std::string_view b);

}  // namespace ztier::tiering
