// The decision rule of `ztier bench sweep`, kept free of I/O so that it can
// be tested on made-up figures: which grid point to recommend, if any, over
// the point the config already uses.
#pragma once

#include <cstddef>
#include <optional>
#include <vector>

namespace ztier::cli {

// Median and range (min..max) of one figure over a point's runs (bytes/s).
struct Spread {
  double median = 0;
  double min = 0;
  double max = 0;
};

// Median (bench_util.h's Median) and min..max of `samples`; all 0 when empty.
Spread SpreadOf(const std::vector<double>& samples);

// Bytes/s of reading and then writing the same bytes, as a training step
// moves its swapped state (read it in, write it back): 2 B / (B/read +
// B/write), the harmonic mean of the two bandwidths. It is bound by the slower
// direction, as the step is; a point fast at reads but slow at writes cannot
// win on its reads alone. 0 when either bandwidth is 0 (that run moved
// nothing).
double CombinedBandwidth(double read_bytes_per_s, double write_bytes_per_s);

// The combined bandwidth of each measured run: run i's read with run i's
// write (the two were measured back to back). Extra runs of one direction
// are left out.
std::vector<double> CombinedRuns(const std::vector<double>& read_bytes_per_s,
                                 const std::vector<double>& write_bytes_per_s);

struct SweepDecision {
  size_t best = 0;  // the point with the highest combined median
  // Of the points that beat the baseline beyond the noise (their slowest
  // combined run is faster than the baseline's fastest: the two ranges do
  // not overlap), the one with the highest median; often `best`, but not
  // when `best` is too noisy to clear the baseline. Unset: no point beats
  // the baseline beyond the run-to-run spread.
  std::optional<size_t> recommend;
};

// `combined[i]`: point i's combined bandwidth over its runs; `baseline`:
// the index of the point the config uses now. `combined` must not be empty
// and `baseline` must index it.
SweepDecision DecideSweep(const std::vector<Spread>& combined, size_t baseline);

}  // namespace ztier::cli
