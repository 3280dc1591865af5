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

#include "base/status.h"

namespace ztier::cli {

// Parses a byte size: plain bytes ("4096") or an integer with a binary
// suffix, case-insensitive: k/KB/KiB = 1024, m/MB/MiB = 1024^2, g/GB/GiB =
// 1024^3, t/TB/TiB = 1024^4 (the storage-benchmark convention: "4k" is 4096
// bytes). Errors name the text and say what is accepted.
Result<uint64_t> ParseSize(std::string_view text);

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

}  // namespace ztier::cli
