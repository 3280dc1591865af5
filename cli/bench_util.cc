#include "cli/bench_util.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <limits>
#include <string>

#include <fmt/format.h>

#include "tiering/units.h"

namespace ztier::cli {

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

Result<uint64_t> ParseSize(std::string_view text) {
  return tiering::ParseByteSize(text, {0, std::numeric_limits<uint64_t>::max(), false});
}

std::string FormatSize(uint64_t bytes) {
  static constexpr const char* kUnits[] = {"B",   "KiB", "MiB",
                                           "GiB", "TiB", "PiB"};
  int unit = 0;
  uint64_t whole = bytes;
  while (unit < 5 && whole >= 1024 && whole % 1024 == 0) {
    whole /= 1024;
    ++unit;
  }
  if (whole < 1024 || unit == 5)
    return fmt::format("{} {}", whole, kUnits[unit]);
  // Not a whole multiple of the next unit: pick the largest unit that keeps
  // the value >= 1 and show two decimals.
  double v = static_cast<double>(bytes);
  unit = 0;
  while (unit < 5 && v >= 1024.0) {
    v /= 1024.0;
    ++unit;
  }
  return fmt::format("{:.2f} {}", v, kUnits[unit]);
}

void LatencyHistogram::Merge(const LatencyHistogram& other) {
  for (size_t i = 0; i < kBuckets; ++i) buckets_[i] += other.buckets_[i];
  count_ += other.count_;
  sum_ns_ += other.sum_ns_;
  max_ns_ = std::max(max_ns_, other.max_ns_);
  min_ns_ = std::min(min_ns_, other.min_ns_);
}

void LatencyHistogram::BucketRange(size_t b, uint64_t* low, uint64_t* width) {
  if (b < kSub) {
    *low = b;
    *width = 1;
    return;
  }
  const uint64_t shift = b / kSub - 1;
  const uint64_t top = b % kSub + kSub;
  *low = top << shift;
  *width = uint64_t{1} << shift;
}

double LatencyHistogram::Percentile(double q) const {
  if (count_ == 0) return 0.0;
  q = std::clamp(q, 0.0, 1.0);
  // 1-based rank of the sample at fraction q (nearest-rank definition).
  uint64_t rank =
      static_cast<uint64_t>(std::ceil(q * static_cast<double>(count_)));
  rank = std::clamp<uint64_t>(rank, 1, count_);
  if (rank == count_) return static_cast<double>(max_ns_);  // known exactly
  uint64_t seen = 0;
  for (size_t b = 0; b < kBuckets; ++b) {
    seen += buckets_[b];
    if (seen >= rank) {
      uint64_t low = 0;
      uint64_t width = 0;
      BucketRange(b, &low, &width);
      const double mid =
          static_cast<double>(low) +
          (width > 1 ? static_cast<double>(width - 1) / 2.0 : 0.0);
      return std::clamp(mid, static_cast<double>(min_ns_),
                        static_cast<double>(max_ns_));
    }
  }
  return static_cast<double>(max_ns_);
}

}  // namespace ztier::cli
