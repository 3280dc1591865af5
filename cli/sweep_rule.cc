#include "cli/sweep_rule.h"

#include <algorithm>

#include "cli/bench_util.h"

namespace ztier::cli {

Spread SpreadOf(const std::vector<double>& samples) {
  if (samples.empty()) return {};
  const auto [lo, hi] = std::minmax_element(samples.begin(), samples.end());
  return {Median(samples), *lo, *hi};
}

double CombinedBandwidth(double read_bytes_per_s, double write_bytes_per_s) {
  if (read_bytes_per_s <= 0 || write_bytes_per_s <= 0) return 0;
  return 2.0 / (1.0 / read_bytes_per_s + 1.0 / write_bytes_per_s);
}

std::vector<double> CombinedRuns(const std::vector<double>& read_bytes_per_s,
                                 const std::vector<double>& write_bytes_per_s) {
  const size_t n = std::min(read_bytes_per_s.size(), write_bytes_per_s.size());
  std::vector<double> out(n);
  for (size_t i = 0; i < n; ++i) {
    out[i] = CombinedBandwidth(read_bytes_per_s[i], write_bytes_per_s[i]);
  }
  return out;
}

SweepDecision DecideSweep(const std::vector<Spread>& combined, size_t baseline) {
  SweepDecision d;
  for (size_t i = 1; i < combined.size(); ++i) {
    if (combined[i].median > combined[d.best].median) d.best = i;
  }
  // Among the points whose slowest run beats the baseline's fastest, the
  // highest median: a noisy best-median point must not hide a steady one
  // that clearly beats the baseline.
  for (size_t i = 0; i < combined.size(); ++i) {
    if (i == baseline || !(combined[i].min > combined[baseline].max)) continue;
    if (!d.recommend || combined[i].median > combined[*d.recommend].median) d.recommend = i;
  }
  return d;
}

}  // namespace ztier::cli
