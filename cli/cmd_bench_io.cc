// `ztier bench io`: a closed-loop block I/O benchmark through ztier's own
// Engine and backends, with the options and the numbers of the usual storage
// benchmarks, so the two can be run side by side on one file
// (scripts/compare_fio.sh does that).
//
// Each of --threads workers owns its Backend and Engine (created on its own
// thread, since an io_uring ring may be bound to the thread that submits),
// a contiguous 1/N slice of the file and qd buffers of bs bytes, and keeps qd
// transfers of bs in flight until its share of the bytes is moved (or the
// time is up), reissuing each completed one at once. The hot loop allocates
// nothing and makes no system call of its own beyond one (vDSO) clock read
// per completion batch; the rest is the engine's.
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "base/log.h"
#include "base/status.h"
#include "cli/bench_util.h"
#include "cli/commands.h"
#include "cli/output.h"
#include "io/backend.h"
#include "io/engine.h"
#include "io/file.h"

namespace ztier::cli {
namespace {

using Clock = std::chrono::steady_clock;

// Buffers are page aligned: enough for any direct-I/O alignment up to 4 KiB
// and what io_uring fixed buffers want.
constexpr uint64_t kBufferAlign = 4096;
// Stripe units and the layout pass are multiples of this (bytes).
constexpr uint64_t kStripeGranule = 4096;
// The layout pass writes with 1 MiB requests from an 8 MiB buffer and keeps
// up to 4 such transfers queued (bytes / count).
constexpr uint64_t kLayoutBlock = 1 << 20;
constexpr uint64_t kLayoutChunk = 8 << 20;
constexpr size_t kLayoutPending = 4;
// Progress: only runs longer than this show it (seconds); a terminal gets a
// line rewritten every second, a pipe or file a new line every 5 seconds.
constexpr double kProgressAfterS = 3.0;
constexpr auto kProgressTick = std::chrono::seconds(1);
constexpr int kProgressPlainEveryTicks = 5;

// Command-line values as typed (IoBenchOptions, bench_util.h) plus the
// output choice; validated into a Config.
struct Flags : IoBenchOptions {
  bool json = false;
};

struct Config {
  io::BackendKind backend = io::BackendKind::kAuto;
  std::string rw;
  io::Op op = io::Op::kRead;
  bool random = false;
  uint64_t bs = 0;    // bytes per request
  uint32_t qd = 0;    // requests in flight per thread
  uint64_t size = 0;  // bytes covered by the run (all threads)
  uint32_t threads = 1;
  uint64_t blocks_per_thread = 0;  // bs-sized blocks in each thread's slice
  double time_s = 0;               // > 0: time based
  uint64_t loops = 1;              // passes over the slice when not time based
  bool direct = true;
  bool sqpoll = false;
  bool register_io = false;
  uint64_t seed = 1;
  uint32_t submit_batch = 1;  // resubmissions per push to the device
  bool progress = true;       // progress lines on stderr (long runs only)
  std::vector<std::string> files;
  uint64_t stripe = 0;  // bytes per stripe unit over the files
};

// SplitMix64: a tiny, fast generator; quality is ample for offsets and
// buffer contents.
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t Next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  // Uniform in [0, n) by the multiply-high method (no division per call).
  uint64_t Below(uint64_t n) {
    return static_cast<uint64_t>((static_cast<unsigned __int128>(Next()) * n) >>
                                 64);
  }

 private:
  uint64_t state_;
};

struct FreeDeleter {
  void operator()(void* p) const { free(p); }
};
using AlignedBuffer = std::unique_ptr<uint8_t, FreeDeleter>;

Result<AlignedBuffer> AllocateBuffer(uint64_t bytes) {
  const uint64_t rounded =
      (bytes + kBufferAlign - 1) / kBufferAlign * kBufferAlign;
  void* p = nullptr;
  const int rc = posix_memalign(&p, kBufferAlign, rounded);
  if (rc != 0) {
    return Status::FromErrno(
        rc, fmt::format("allocating {} of I/O buffers", FormatSize(rounded)));
  }
  return AlignedBuffer(static_cast<uint8_t*>(p));
}

// Fills with random bytes, none of the 8-byte words zero (so a write moves
// data a compressing or deduplicating device cannot shortcut).
void FillRandom(uint8_t* p, uint64_t bytes, uint64_t seed) {
  Rng rng(seed);
  uint64_t i = 0;
  for (; i + 8 <= bytes; i += 8) {
    const uint64_t v = rng.Next() | 1;
    memcpy(p + i, &v, 8);
  }
  for (; i < bytes; ++i) p[i] = static_cast<uint8_t>(rng.Next() | 1);
}

double Seconds(Clock::duration d) {
  return std::chrono::duration<double>(d).count();
}

double TimevalSeconds(const timeval& tv) {
  return static_cast<double>(tv.tv_sec) + static_cast<double>(tv.tv_usec) / 1e6;
}

// Bytes of logical range [0, logical) that file `i` of `n` holds when striped
// in units of `stripe` bytes.
uint64_t FileShare(uint64_t logical, uint64_t stripe, size_t i, size_t n) {
  const uint64_t round = stripe * n;
  const uint64_t full = logical / round;
  const uint64_t rem = logical % round;
  const uint64_t before = stripe * i;
  const uint64_t extra = rem > before ? std::min(stripe, rem - before) : 0;
  return full * stripe + extra;
}

void PrintError(std::string_view msg) {
  fmt::print(stderr, "ztier bench io: error: {}\n", msg);
}

// ---------------------------------------------------------------------------
// Validation

Result<Config> MakeConfig(const IoBenchOptions& f) {
  Config c;
  auto kind = io::ParseBackendKind(f.backend);
  if (!kind.ok()) {
    return Status::InvalidArgument(fmt::format(
        "--backend '{}' is not one of auto, io_uring, libaio, psync",
        f.backend));
  }
  c.backend = kind.value();

  c.rw = f.rw;
  if (f.rw == "read") {
    c.op = io::Op::kRead;
  } else if (f.rw == "write") {
    c.op = io::Op::kWrite;
  } else if (f.rw == "randread") {
    c.op = io::Op::kRead;
    c.random = true;
  } else if (f.rw == "randwrite") {
    c.op = io::Op::kWrite;
    c.random = true;
  } else {
    return Status::InvalidArgument(fmt::format(
        "--rw '{}' is not one of read, write, randread, randwrite", f.rw));
  }

  auto bs = ParseSize(f.bs);
  if (!bs.ok()) return bs.status().WithContext("--bs");
  c.bs = bs.value();
  // Request lengths are 32-bit; 1 GiB per request is far past any benefit.
  if (c.bs == 0 || c.bs > (uint64_t{1} << 30)) {
    return Status::InvalidArgument(
        fmt::format("--bs {} must be between 1 byte and 1 GiB", f.bs));
  }
  auto size = ParseSize(f.size);
  if (!size.ok()) return size.status().WithContext("--size");

  if (f.qd == 0 || f.qd > 65536) {
    return Status::InvalidArgument(
        fmt::format("--qd {} must be between 1 and 65536", f.qd));
  }
  c.qd = f.qd;
  if (f.threads == 0 || f.threads > 1024) {
    return Status::InvalidArgument(
        fmt::format("--threads {} must be between 1 and 1024", f.threads));
  }
  c.threads = f.threads;

  // Each thread gets whole blocks; a remainder of --size is left out, as the
  // slices must not overlap.
  c.blocks_per_thread = size.value() / c.bs / c.threads;
  if (c.blocks_per_thread == 0) {
    return Status::InvalidArgument(fmt::format(
        "--size {} is smaller than --bs {} times --threads {}: each thread "
        "needs at least one block",
        f.size, f.bs, f.threads));
  }
  c.size = c.blocks_per_thread * c.bs * c.threads;

  if (f.time_s < 0 || (f.time_s > 0 && f.time_s < 0.01)) {
    return Status::InvalidArgument(
        fmt::format("--time {} must be at least 0.01 seconds", f.time_s));
  }
  c.time_s = f.time_s;
  if (f.loops == 0)
    return Status::InvalidArgument("--loops must be at least 1");
  c.loops = f.loops;

  c.direct = f.direct;
  c.sqpoll = f.sqpoll;
  c.register_io = f.register_io;
  c.seed = f.seed;
  if (f.submit_batch == 0) {
    return Status::InvalidArgument("--submit-batch must be at least 1");
  }
  c.submit_batch = std::min(f.submit_batch, f.qd);
  c.progress = f.progress;
  // One stripe unit per request where bs allows it, so that consecutive
  // blocks go to consecutive files; rounded up to 4 KiB so that the unit is
  // a multiple of any file's direct-I/O alignment.
  c.stripe = (c.bs + kStripeGranule - 1) / kStripeGranule * kStripeGranule;

  c.files = f.files;
  if (c.files.empty()) {
    const char* env = getenv("ZTIER_NVME_PATH");
    const std::string dir = (env && *env) ? env : "./ztier_nvme";
    if (mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
      return Status::FromErrno(errno,
                               fmt::format("creating directory {}", dir));
    }
    c.files.push_back(dir + "/bench_io.dat");
  }
  return c;
}

// ---------------------------------------------------------------------------
// Laying out the file

// Makes sure every file holds its share of [0, c.size): for reads the range is
// written (reading a hole or an unwritten extent measures nothing), for
// writes it is only reserved, as writes will fill it.
// `backend` (the run's kind and queue depth) does the writing.
Status PrepareFile(const Config& c, const io::StripedFile& file,
                   std::unique_ptr<io::Backend> backend) {
  bool short_file = false;
  for (size_t i = 0; i < file.file_count(); ++i) {
    auto sz = file.file(i).Size();
    if (!sz.ok()) return sz.status();
    if (sz.value() < file.base_offset() +
                         FileShare(c.size, c.stripe, i, file.file_count())) {
      short_file = true;
    }
  }
  if (!short_file) return Status::Ok();
  // Reserving keeps the extents contiguous but is only an optimisation: a
  // filesystem without fallocate still gets the writes. Running out of space
  // is the one failure worth stopping for.
  if (Status s = file.Allocate(c.size);
      !s.ok() && s.code() == StatusCode::kResourceExhausted) {
    return s;
  }
  if (c.op == io::Op::kWrite) return Status::Ok();

  fmt::print(stderr, "ztier bench io: laying out {} ({}) before reading it\n",
             file.Describe(), FormatSize(c.size));
  io::EngineOptions eo;
  // 1 MiB requests whatever --bs is: a 4 KiB random-read run should not lay
  // out its file 4 KiB at a time. The engine cuts at stripe boundaries.
  eo.block_size = kLayoutBlock;
  eo.queue_depth = c.qd;
  auto engine = io::Engine::Create(std::move(backend), eo);
  if (!engine.ok()) return engine.status().WithContext("laying out");
  auto buf = AllocateBuffer(kLayoutChunk);
  if (!buf.ok()) return buf.status();
  FillRandom(buf->get(), kLayoutChunk, c.seed ^ 0x6c61796f7574ULL);

  Status failure;
  for (uint64_t off = 0; off < c.size && failure.ok();) {
    while ((*engine)->pending() >= kLayoutPending) {
      ZTIER_RETURN_IF_ERROR((*engine)->Poll(true));
    }
    io::Transfer t;
    t.op = io::Op::kWrite;
    t.file = &file;
    t.offset = off;
    t.length = std::min(kLayoutChunk, c.size - off);
    t.buf = buf->get();
    t.on_done = [&failure](const Status& s) {
      if (!s.ok() && failure.ok()) failure = s;
    };
    ZTIER_RETURN_IF_ERROR((*engine)->Submit(std::move(t)));
    off += std::min(kLayoutChunk, c.size - off);
  }
  ZTIER_RETURN_IF_ERROR((*engine)->Drain());
  if (!failure.ok()) return failure.WithContext("laying out");
  return Status::Ok();
}

// ---------------------------------------------------------------------------
// Workers

// Start line for the workers: they set up, report, then all start together
// (or all give up if one failed to set up).
struct Gate {
  std::mutex mu;
  std::condition_variable cv;
  uint32_t ready = 0;
  uint32_t finished = 0;
  bool go = false;
  bool abort = false;
};

class Worker {
 public:
  Worker(const Config& c, const io::StripedFile& file, io::BackendKind kind,
         uint32_t index)
      : c_(c),
        file_(file),
        kind_(kind),
        index_(index),
        slice_begin_(static_cast<uint64_t>(index) * c.blocks_per_thread * c.bs),
        rng_(c.seed * 0x9e3779b97f4a7c15ULL + index + 1) {}

  // Thread body: set up, wait at the gate, run, report.
  void Main(Gate* gate) {
    status_ = Setup();
    {
      std::unique_lock lock(gate->mu);
      ++gate->ready;
      gate->cv.notify_all();
      gate->cv.wait(lock, [gate] { return gate->go || gate->abort; });
      if (gate->abort || !status_.ok()) {
        ++gate->finished;
        gate->cv.notify_all();
        engine_.reset();
        return;
      }
    }
    Run();
    engine_.reset();  // cancels and reaps anything left before buffers go
    std::lock_guard lock(gate->mu);
    ++gate->finished;
    gate->cv.notify_all();
  }

  const Status& status() const { return status_; }
  uint64_t bytes() const { return completed_ * c_.bs; }
  uint64_t ios() const { return completed_; }
  Clock::time_point start() const { return start_; }
  Clock::time_point end() const { return end_; }
  const LatencyHistogram& histogram() const { return hist_; }
  const std::string& backend_name() const { return backend_name_; }
  const io::EngineStats& engine_stats() const { return engine_stats_; }
  uint64_t progress_bytes() const {
    return progress_bytes_.load(std::memory_order_relaxed);
  }

 private:
  Status Setup() {
    io::BackendOptions bo;
    bo.queue_depth = c_.qd;
    bo.sqpoll = c_.sqpoll;
    auto backend = io::CreateBackend(kind_, bo);
    if (!backend.ok()) return backend.status();
    backend_name_ = std::string((*backend)->name());
    io::EngineOptions eo;
    eo.block_size = c_.bs;
    eo.queue_depth = c_.qd;
    auto engine = io::Engine::Create(std::move(backend).value(), eo);
    if (!engine.ok()) return engine.status();
    engine_ = std::move(engine).value();

    const uint64_t buf_bytes = c_.bs * c_.qd;
    auto buf = AllocateBuffer(buf_bytes);
    if (!buf.ok()) return buf.status();
    buffer_ = std::move(buf).value();
    // Touch every page now so that first-use page faults do not land in
    // the timed run; writes get random content, reads only need the pages.
    if (c_.op == io::Op::kWrite) {
      FillRandom(buffer_.get(), buf_bytes, c_.seed + 0x5752495445ULL + index_);
    } else {
      memset(buffer_.get(), 0xa5, buf_bytes);
    }
    if (c_.register_io) {
      const iovec region{buffer_.get(), static_cast<size_t>(buf_bytes)};
      ZTIER_RETURN_IF_ERROR(engine_->RegisterBuffers(std::span(&region, 1))
                                .WithContext("--register: buffers"));
      ZTIER_RETURN_IF_ERROR(
          engine_->RegisterFiles({&file_}).WithContext("--register: files"));
    }
    submit_time_.assign(c_.qd, Clock::time_point());
    done_.assign(c_.qd, 0);
    handling_.assign(c_.qd, 0);
    return Status::Ok();
  }

  uint64_t NextOffset() {
    uint64_t block;
    if (c_.random) {
      block = rng_.Below(c_.blocks_per_thread);
    } else {
      block = next_block_;
      if (++next_block_ == c_.blocks_per_thread) next_block_ = 0;
    }
    return slice_begin_ + block * c_.bs;
  }

  void Issue(uint32_t slot, Clock::time_point now) {
    io::Transfer t;
    t.op = c_.op;
    t.file = &file_;
    t.offset = NextOffset();
    t.length = c_.bs;
    t.buf = buffer_.get() + static_cast<uint64_t>(slot) * c_.bs;
    // Two words of capture: std::function keeps it inline, no allocation.
    t.on_done = [this, slot](const Status& s) { OnDone(slot, s); };
    submit_time_[slot] = now;
    ++issued_;
    Status s = engine_->Submit(std::move(t));
    if (!s.ok()) {
      --issued_;
      if (status_.ok()) status_ = s;
    }
  }

  void OnDone(uint32_t slot, const Status& s) {
    if (!s.ok()) {
      if (status_.ok()) status_ = s;
      return;
    }
    done_[n_done_++] = slot;
  }

  void Run() {
    const bool timed = c_.time_s > 0;
    const uint64_t target =
        timed ? UINT64_MAX : c_.loops * c_.blocks_per_thread;
    start_ = Clock::now();
    const Clock::time_point deadline =
        start_ + std::chrono::duration_cast<Clock::duration>(
                     std::chrono::duration<double>(c_.time_s));
    Clock::time_point now = start_;
    const uint32_t first =
        static_cast<uint32_t>(std::min<uint64_t>(c_.qd, target));
    for (uint32_t slot = 0; slot < first && status_.ok(); ++slot) {
      Issue(slot, now);
    }
    bool failed = false;  // the backend itself failed: stop polling
    while (!failed && engine_->pending() > 0) {
      Status s = engine_->Poll(/*wait=*/true);
      if (!s.ok()) {
        if (status_.ok()) status_ = s;
        break;
      }
      // Handle what this Poll reaped, then what the non-blocking Polls that
      // push resubmissions out reap on the way, until nothing is left.
      while (n_done_ > 0 && !failed) {
        // One clock read per batch: the completions handled together are
        // stamped with the same time.
        now = Clock::now();
        std::swap(done_, handling_);
        const uint32_t n = n_done_;
        n_done_ = 0;
        for (uint32_t i = 0; i < n; ++i) {
          hist_.Add(static_cast<uint64_t>(
              std::chrono::duration_cast<std::chrono::nanoseconds>(
                  now - submit_time_[handling_[i]])
                  .count()));
        }
        completed_ += n;
        progress_bytes_.store(completed_ * c_.bs, std::memory_order_relaxed);
        const bool stop = !status_.ok() || (timed && now >= deadline);
        uint32_t unsubmitted = 0;
        for (uint32_t i = 0;
             i < n && !stop && issued_ < target && status_.ok(); ++i) {
          Issue(handling_[i], now);
          // Hand the requests to the device every --submit-batch of them
          // rather than once after the whole batch: with 30 completions
          // reaped at once, the first would otherwise wait for the other
          // 29 to be prepared and submitted before it reaches the drive.
          if (++unsubmitted == c_.submit_batch) {
            unsubmitted = 0;
            if (Status ps = engine_->Poll(/*wait=*/false); !ps.ok()) {
              if (status_.ok()) status_ = ps;
              failed = true;
              break;
            }
          }
        }
      }
    }
    end_ = now;
    engine_stats_ = engine_->stats();
  }

  const Config& c_;
  const io::StripedFile& file_;
  const io::BackendKind kind_;
  const uint32_t index_;
  const uint64_t slice_begin_;  // bytes
  Rng rng_;
  std::unique_ptr<io::Engine> engine_;
  AlignedBuffer buffer_;
  std::string backend_name_;
  Status status_;
  std::vector<Clock::time_point> submit_time_;  // per slot
  // Slots whose request completed: filled by OnDone, swapped with
  // handling_ while they are resubmitted (both hold qd entries).
  std::vector<uint32_t> done_;
  std::vector<uint32_t> handling_;
  uint32_t n_done_ = 0;
  uint64_t next_block_ = 0;
  uint64_t issued_ = 0;     // requests submitted
  uint64_t completed_ = 0;  // requests completed successfully
  Clock::time_point start_;
  Clock::time_point end_;
  LatencyHistogram hist_;
  io::EngineStats engine_stats_;
  // Read by the progress line on the main thread; written once per batch.
  alignas(64) std::atomic<uint64_t> progress_bytes_{0};
};

// ---------------------------------------------------------------------------
// Progress and report

class Progress {
 public:
  explicit Progress(const Config& c)
      : enabled_(c.progress), tty_(isatty(STDERR_FILENO)) {
    if (c.time_s <= 0) total_bytes_ = c.size * c.loops;
    time_s_ = c.time_s;
  }
  void Tick(double elapsed_s, uint64_t bytes) {
    if (!enabled_ || elapsed_s < kProgressAfterS) return;
    ++ticks_;
    if (!tty_ && (ticks_ - 1) % kProgressPlainEveryTicks != 0) return;
    const double rate =
        elapsed_s > 0 ? static_cast<double>(bytes) / elapsed_s : 0;
    std::string done = total_bytes_
                           ? fmt::format("{:.0f}% of {}",
                                         100.0 * static_cast<double>(bytes) /
                                             static_cast<double>(total_bytes_),
                                         FormatSize(total_bytes_))
                           : fmt::format("{:.0f}/{:.0f} s", elapsed_s, time_s_);
    const std::string line =
        fmt::format("ztier bench io: {:6.1f} s  {:7.3f} GB/s  {}", elapsed_s,
                    rate / 1e9, done);
    if (tty_) {
      fmt::print(stderr, "\r{}\x1b[K", line);
      shown_ = true;
    } else {
      fmt::print(stderr, "{}\n", line);
    }
    fflush(stderr);
  }
  void Finish() {
    if (shown_) {
      fmt::print(stderr, "\r\x1b[K");
      fflush(stderr);
    }
  }

 private:
  bool enabled_;
  bool tty_;
  bool shown_ = false;
  uint64_t total_bytes_ = 0;
  double time_s_ = 0;
  uint64_t ticks_ = 0;
};

struct Outcome {
  std::string backend;
  uint64_t bytes = 0;
  uint64_t ios = 0;
  double seconds = 0;
  double user_s = 0;
  double sys_s = 0;
  LatencyHistogram hist;
  io::EngineStats engine;
};

void PrintHuman(const Config& c, const io::StripedFile& file,
                const Outcome& o) {
  const double bw =
      o.seconds > 0 ? static_cast<double>(o.bytes) / o.seconds : 0;
  const double iops =
      o.seconds > 0 ? static_cast<double>(o.ios) / o.seconds : 0;
  const double cpu = o.user_s + o.sys_s;
  const double gb = static_cast<double>(o.bytes) / 1e9;
  fmt::print(
      "ztier bench io: {} bs {} qd {} threads {} backend {} {} file {}\n", c.rw,
      FormatSize(c.bs), c.qd, c.threads, o.backend,
      c.direct ? "O_DIRECT" : "buffered", file.Describe());
  fmt::print("  moved      {} ({} bytes, {} requests) in {:.3f} s\n",
             FormatSize(o.bytes), o.bytes, o.ios, o.seconds);
  fmt::print("  bandwidth  {:.3f} GB/s  {:.3f} GiB/s\n", bw / 1e9,
             bw / static_cast<double>(1ull << 30));
  fmt::print("  iops       {:.0f}\n", iops);
  fmt::print(
      "  latency us p50 {:.1f}  p99 {:.1f}  p99.9 {:.1f}  mean {:.1f}  "
      "max {:.1f}\n",
      o.hist.Percentile(0.50) / 1e3, o.hist.Percentile(0.99) / 1e3,
      o.hist.Percentile(0.999) / 1e3, o.hist.mean_ns() / 1e3,
      static_cast<double>(o.hist.max_ns()) / 1e3);
  fmt::print(
      "  cpu        user {:.3f} s  sys {:.3f} s  ({:.1f}% of one core)  "
      "{:.4f} s per GB\n",
      o.user_s, o.sys_s, o.seconds > 0 ? 100.0 * cpu / o.seconds : 0.0,
      gb > 0 ? cpu / gb : 0.0);
  if (o.engine.short_transfers || o.engine.retries) {
    fmt::print("  engine     {} short transfers, {} retries\n",
               o.engine.short_transfers, o.engine.retries);
  }
}

void PrintJson(const Config& c, const io::StripedFile& file, const Outcome& o) {
  const double bw =
      o.seconds > 0 ? static_cast<double>(o.bytes) / o.seconds : 0;
  const double iops =
      o.seconds > 0 ? static_cast<double>(o.ios) / o.seconds : 0;
  const double gb = static_cast<double>(o.bytes) / 1e9;
  nlohmann::json files = nlohmann::json::array();
  for (size_t i = 0; i < file.file_count(); ++i)
    files.push_back(file.file(i).path());
  nlohmann::json j = {
      {"backend", o.backend},
      {"rw", c.rw},
      {"bs", c.bs},
      {"qd", c.qd},
      {"threads", c.threads},
      {"size", c.size},
      {"bytes", o.bytes},
      {"ios", o.ios},
      {"seconds", o.seconds},
      {"bw_bytes_per_s", bw},
      {"iops", iops},
      {"lat_us",
       {{"p50", o.hist.Percentile(0.50) / 1e3},
        {"p99", o.hist.Percentile(0.99) / 1e3},
        {"p999", o.hist.Percentile(0.999) / 1e3},
        {"mean", o.hist.mean_ns() / 1e3},
        {"min", static_cast<double>(o.hist.min_ns()) / 1e3},
        {"max", static_cast<double>(o.hist.max_ns()) / 1e3}}},
      {"cpu",
       {{"user_s", o.user_s},
        {"sys_s", o.sys_s},
        {"s_per_gb", gb > 0 ? (o.user_s + o.sys_s) / gb : 0.0}}},
      {"direct", c.direct},
      {"files", files},
      {"stripe_bytes", file.stripe_bytes()},
      {"sqpoll", c.sqpoll},
      {"register", c.register_io},
      {"seed", c.seed},
      {"submit_batch", c.submit_batch},
      {"engine",
       {{"requests", o.engine.requests},
        {"short_transfers", o.engine.short_transfers},
        {"retries", o.engine.retries}}},
  };
  if (c.time_s > 0) {
    j["time_s"] = c.time_s;
  } else {
    j["loops"] = c.loops;
  }
  std::cout << WithRunInfo(std::move(j)).dump(2) << std::endl;
}

// ---------------------------------------------------------------------------

// Lays out the file if needed, runs the workers and sums their results.
// `file` receives the opened file (for the report).
Result<Outcome> Measure(const Config& c,
                        std::unique_ptr<io::StripedFile>* file_out) {
  // Resolve "auto" once, here (it logs its choice once), and give the
  // workers the explicit kind. This first backend also lays out the file.
  io::BackendOptions bo;
  bo.queue_depth = c.qd;
  bo.sqpoll = c.sqpoll;
  auto first = io::CreateBackend(c.backend, bo);
  if (!first.ok()) return first.status();
  const io::BackendKind kind = (*first)->kind();

  io::OpenOptions oo;
  oo.direct = c.direct;
  auto opened = io::StripedFile::Open(c.files, c.stripe, oo);
  if (!opened.ok()) return opened.status();
  *file_out = std::move(opened).value();
  const io::StripedFile& file = **file_out;
  if (c.direct && c.bs % file.alignment() != 0) {
    return Status::InvalidArgument(fmt::format(
        "--bs {} bytes is not a multiple of {} bytes, the direct-I/O "
        "alignment of {}: use a multiple of it, or --no-direct",
        c.bs, file.alignment(), file.Describe()));
  }
  ZTIER_RETURN_IF_ERROR(PrepareFile(c, file, std::move(first).value()));

  std::vector<std::unique_ptr<Worker>> workers;
  for (uint32_t i = 0; i < c.threads; ++i) {
    workers.push_back(std::make_unique<Worker>(c, file, kind, i));
  }
  Gate gate;
  std::vector<std::thread> threads;
  threads.reserve(c.threads);
  try {
    for (auto& w : workers) {
      threads.emplace_back([&gate, w = w.get()] { w->Main(&gate); });
    }
  } catch (const std::system_error& e) {
    {
      std::lock_guard lock(gate.mu);
      gate.abort = true;
    }
    gate.cv.notify_all();
    for (auto& t : threads) t.join();
    return Status::Internal(fmt::format("could not start thread {} of {}: {}",
                                        threads.size() + 1, c.threads,
                                        e.what()));
  }

  rusage ru_start{};
  Clock::time_point start;
  bool setup_ok = true;
  {
    std::unique_lock lock(gate.mu);
    gate.cv.wait(lock, [&] { return gate.ready == c.threads; });
    for (auto& w : workers) setup_ok = setup_ok && w->status().ok();
    getrusage(RUSAGE_SELF, &ru_start);
    start = Clock::now();
    (setup_ok ? gate.go : gate.abort) = true;
    gate.cv.notify_all();
  }

  Progress progress(c);
  {
    std::unique_lock lock(gate.mu);
    while (!gate.cv.wait_for(lock, kProgressTick,
                             [&] { return gate.finished == c.threads; })) {
      lock.unlock();
      uint64_t bytes = 0;
      for (auto& w : workers) bytes += w->progress_bytes();
      progress.Tick(Seconds(Clock::now() - start), bytes);
      lock.lock();
    }
  }
  for (auto& t : threads) t.join();
  rusage ru_end{};
  getrusage(RUSAGE_SELF, &ru_end);
  progress.Finish();

  for (auto& w : workers) {
    if (!w->status().ok()) return w->status();
  }

  Outcome o;
  o.backend = workers.front()->backend_name();
  Clock::time_point end = start;
  for (auto& w : workers) {
    o.bytes += w->bytes();
    o.ios += w->ios();
    o.hist.Merge(w->histogram());
    end = std::max(end, w->end());
    o.engine.requests += w->engine_stats().requests;
    o.engine.bytes += w->engine_stats().bytes;
    o.engine.short_transfers += w->engine_stats().short_transfers;
    o.engine.retries += w->engine_stats().retries;
    o.engine.failed_transfers += w->engine_stats().failed_transfers;
  }
  o.seconds = Seconds(end - start);
  o.user_s =
      TimevalSeconds(ru_end.ru_utime) - TimevalSeconds(ru_start.ru_utime);
  o.sys_s = TimevalSeconds(ru_end.ru_stime) - TimevalSeconds(ru_start.ru_stime);
  return o;
}

int RunBenchIo(const Flags& flags) {
  auto config = MakeConfig(flags);
  if (!config.ok()) {
    PrintError(config.status().message());
    return kExitUsage;
  }
  Config c = config.value();
  c.progress = !flags.json;
  std::unique_ptr<io::StripedFile> file;
  auto o = Measure(c, &file);
  if (!o.ok()) {
    PrintError(o.status().ToString());
    return ExitCodeFor(o.status());
  }
  if (flags.json) {
    PrintJson(c, *file, *o);
  } else {
    PrintHuman(c, *file, *o);
  }
  return 0;
}

constexpr const char* kFooter = R"(
Sizes: bytes or a number with a unit: 4k = 4K = 4KiB = 4096 (1024-based),
1MB = 1000000 (1000-based); docs/config.md "Numbers and units" has the grammar.
--file may be given several times: the run then stripes over the files
round-robin in units of --bs rounded up to 4 KiB. Default file:
${ZTIER_NVME_PATH:-./ztier_nvme}/bench_io.dat (the directory is created 0700).
Each of --threads threads has its own backend and engine and a contiguous
1/N slice of --size; results are summed. A read run first writes ("lays out")
any file shorter than its share; a write run only reserves it (fallocate).
Sequential runs walk the slice in order, random ones pick uniformly random
bs-aligned blocks (--seed). Without --time, each thread moves its slice
--loops times; with --time it wraps around until the time is up.
Each thread keeps --qd requests in flight; a completed one is reissued at
once and handed to the device every --submit-batch reissues (1, the default,
as fio does: a batch of 30 4 KiB reads submitted together reaches the drive
only when the last is prepared, which costs IOPS).
Latency is from submission to completion (us), CPU is user+sys of the whole
process over the run (getrusage). Runs longer than 3 s show progress on
stderr: rewritten each second on a terminal, a line every 5 s otherwise,
never with --json. Errors print one line and exit with status 2.)";

}  // namespace

Result<IoBenchResult> RunIoBenchmark(const IoBenchOptions& options) {
  ZTIER_ASSIGN_OR_RETURN(Config c, MakeConfig(options));
  std::unique_ptr<io::StripedFile> file;
  ZTIER_ASSIGN_OR_RETURN(Outcome o, Measure(c, &file));
  IoBenchResult r;
  r.backend = o.backend;
  r.rw = c.rw;
  r.bs = c.bs;
  r.qd = c.qd;
  r.threads = c.threads;
  r.size = c.size;
  r.bytes = o.bytes;
  r.ios = o.ios;
  r.seconds = o.seconds;
  r.bw_bytes_per_s = o.seconds > 0 ? static_cast<double>(o.bytes) / o.seconds : 0;
  r.iops = o.seconds > 0 ? static_cast<double>(o.ios) / o.seconds : 0;
  r.lat_p50_us = o.hist.Percentile(0.50) / 1e3;
  r.lat_p99_us = o.hist.Percentile(0.99) / 1e3;
  r.lat_mean_us = o.hist.mean_ns() / 1e3;
  r.cpu_s = o.user_s + o.sys_s;
  r.file = file->Describe();
  return r;
}

void RegisterBenchIo(CLI::App& bench, int* exit_code) {
  auto flags = std::make_shared<Flags>();
  CLI::App* cmd = bench.add_subcommand(
      "io", "Block I/O benchmark of ztier's engine (fio-like options)");
  cmd->add_option("--backend", flags->backend,
                  "auto, io_uring, libaio or psync (auto logs its choice)")
      ->capture_default_str();
  cmd->add_option("--rw", flags->rw, "read, write, randread or randwrite")
      ->capture_default_str();
  cmd->add_option("--bs", flags->bs, "Bytes per request")
      ->capture_default_str();
  cmd->add_option("--qd", flags->qd, "Requests in flight per thread")
      ->capture_default_str();
  cmd->add_option("--size", flags->size, "Bytes of file covered (all threads)")
      ->capture_default_str();
  cmd->add_option("--file", flags->files,
                  "File to use; repeat to stripe over several");
  cmd->add_option("--threads", flags->threads,
                  "Threads, each with its own engine and file slice")
      ->capture_default_str();
  CLI::Option* time = cmd->add_option(
      "--time", flags->time_s, "Run for SECONDS, wrapping around the file");
  // --time with --loops is refused in RunBenchIo rather than by CLI11, so
  // that it exits with status 2 like every other usage error.
  CLI::Option* loops = cmd->add_option("--loops", flags->loops,
                                       "Passes over --size (without --time)")
                           ->capture_default_str();
  cmd->add_flag("--direct,!--no-direct", flags->direct,
                "O_DIRECT (default) or buffered through the page cache");
  cmd->add_flag("--sqpoll", flags->sqpoll,
                "io_uring: kernel submission-queue polling thread");
  cmd->add_flag("--register", flags->register_io,
                "io_uring: register buffers and files");
  cmd->add_option("--seed", flags->seed, "Seed of random offsets and data")
      ->capture_default_str();
  cmd->add_option("--submit-batch", flags->submit_batch,
                  "Reissued requests per submission (1: each at once)")
      ->capture_default_str();
  cmd->add_flag("--json", flags->json, "Print one JSON object on stdout");
  cmd->footer(kFooter);
  cmd->callback([flags, exit_code, time, loops] {
    if (time->count() > 0 && loops->count() > 0) {
      PrintError("--time and --loops exclude each other: give one");
      *exit_code = kExitUsage;
      return;
    }
    *exit_code = RunBenchIo(*flags);
  });
}

}  // namespace ztier::cli
