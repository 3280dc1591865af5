// Helpers shared by the `ztier bench` commands: byte-size parsing and
// formatting, and a latency histogram cheap enough to update once per I/O.
//
// Everything here is a plain value type; a LatencyHistogram is filled by one
// thread and merged into another only after that thread has finished.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"

namespace ztier::cli {

// Parses a byte size in ztier's one size grammar (tiering/units.h): "4096",
// "4k" or "4KiB" (4096), "1MB" (1000000), "1.5GiB". Errors name the text and
// the units accepted.
Result<uint64_t> ParseSize(std::string_view text);

// The median of `v`: its middle value, or the mean of the two middle values
// when the count is even; 0 when empty. Every `ztier bench` figure called a
// median is this one.
double Median(std::vector<double> v);

// "1 MiB", "4 KiB", "1.50 GiB", "1000 B": exact binary units where the value
// is a whole multiple, else two decimals.
std::string FormatSize(uint64_t bytes);

// Log-linear histogram of durations in nanoseconds: exact below 128 ns, then
// 128 buckets per power of two, so any value is placed within 1/128 (0.8%)
// of itself and a percentile (bucket midpoint) is within 0.4%. Add() is a
// count-leading-zeros, a shift and an increment: no allocation, no branch on
// the data beyond the small-value case.
class LatencyHistogram {
 public:
  void Add(uint64_t ns) {
    ++buckets_[BucketOf(ns)];
    ++count_;
    sum_ns_ += ns;
    if (ns > max_ns_) max_ns_ = ns;
    if (ns < min_ns_) min_ns_ = ns;
  }
  void Merge(const LatencyHistogram& other);

  uint64_t count() const { return count_; }
  double mean_ns() const {
    return count_ ? static_cast<double>(sum_ns_) / static_cast<double>(count_)
                  : 0.0;
  }
  uint64_t max_ns() const { return count_ ? max_ns_ : 0; }
  uint64_t min_ns() const { return count_ ? min_ns_ : 0; }
  // The value at fraction `q` (0..1) of the sorted samples, in ns; 0 when
  // empty. The result is clamped to [min, max] of what was added.
  double Percentile(double q) const;

 private:
  static constexpr int kSubBits = 7;  // 128 sub-buckets per power of two
  static constexpr uint64_t kSub = uint64_t{1} << kSubBits;
  // Values below kSub get one bucket each; each further power of two (2^7 ..
  // 2^63) gets kSub buckets.
  static constexpr size_t kBuckets = kSub + (64 - kSubBits) * kSub;

  static size_t BucketOf(uint64_t ns) {
    if (ns < kSub) return static_cast<size_t>(ns);
    const int exp = 63 - __builtin_clzll(ns);  // >= kSubBits
    const int shift = exp - kSubBits;
    // (ns >> shift) lies in [kSub, 2*kSub): the top kSubBits+1 bits.
    return static_cast<size_t>((static_cast<uint64_t>(shift) + 1) * kSub +
                               ((ns >> shift) - kSub));
  }
  // Lowest value and width (ns) of bucket `b`.
  static void BucketRange(size_t b, uint64_t* low, uint64_t* width);

  std::array<uint64_t, kBuckets> buckets_{};
  uint64_t count_ = 0;
  uint64_t sum_ns_ = 0;
  uint64_t max_ns_ = 0;
  uint64_t min_ns_ = UINT64_MAX;
};

// The options of `ztier bench io`, as typed on its command line (sizes are
// text such as "1MiB"; RunIoBenchmark validates them with the same messages
// as the command).
struct IoBenchOptions {
  std::string backend = "auto";  // auto, io_uring, libaio, psync
  std::string rw = "read";       // read, write, randread, randwrite
  std::string bs = "1MiB";       // bytes per request
  uint32_t qd = 32;              // requests in flight per thread
  std::string size = "1GiB";     // bytes of file covered, all threads
  // Files to stripe over; empty: ${ZTIER_NVME_PATH:-./ztier_nvme}/bench_io.dat.
  std::vector<std::string> files;
  uint32_t threads = 1;
  double time_s = 0;   // > 0: run this long (seconds), wrapping around
  uint64_t loops = 1;  // passes over `size` when not time based
  bool direct = true;
  bool sqpoll = false;
  bool register_io = false;
  uint64_t seed = 1;
  uint32_t submit_batch = 1;
  // Progress lines on stderr for runs longer than 3 s.
  bool progress = true;
};

// What one `bench io` run measured.
struct IoBenchResult {
  std::string backend;  // the backend that ran (auto resolved)
  std::string rw;
  uint64_t bs = 0;       // bytes per request
  uint32_t qd = 0;
  uint32_t threads = 0;
  uint64_t size = 0;     // bytes covered
  uint64_t bytes = 0;    // bytes moved
  uint64_t ios = 0;      // requests completed
  double seconds = 0;
  double bw_bytes_per_s = 0;
  double iops = 0;
  double lat_p50_us = 0, lat_p99_us = 0, lat_mean_us = 0;
  double cpu_s = 0;      // user + sys of the process over the run
  std::string file;      // description of the file(s)
};

// Runs the `ztier bench io` measurement (cmd_bench_io.cc) with `options`:
// lays out the file if a read needs it, runs the workers, returns the sums.
// Errors: InvalidArgument naming the bad option, or the I/O error.
Result<IoBenchResult> RunIoBenchmark(const IoBenchOptions& options);

}  // namespace ztier::cli
