#include "cli/bench_util.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <string>

#include <fmt/format.h>

namespace ztier::cli {

namespace {

bool EqualsIgnoreCase(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(a[i])) !=
        std::tolower(static_cast<unsigned char>(b[i]))) {
      return false;
    }
  }
  return true;
}

// Power of 1024 named by `suffix` ("" -> 0, "k"/"KB"/"KiB" -> 1, ...), or -1.
int SuffixPower(std::string_view suffix) {
  if (suffix.empty()) return 0;
  static constexpr std::string_view kLetters = "kmgt";
  const char first = static_cast<char>(
      std::tolower(static_cast<unsigned char>(suffix.front())));
  const size_t pos = kLetters.find(first);
  if (pos == std::string_view::npos) {
    return EqualsIgnoreCase(suffix, "b") ? 0 : -1;
  }
  const std::string_view rest = suffix.substr(1);
  if (rest.empty() || EqualsIgnoreCase(rest, "b") ||
      EqualsIgnoreCase(rest, "ib")) {
    return static_cast<int>(pos) + 1;
  }
  return -1;
}

}  // namespace

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

Result<uint64_t> ParseSize(std::string_view text) {
  const std::string_view original = text;
  while (!text.empty() &&
         std::isspace(static_cast<unsigned char>(text.front()))) {
    text.remove_prefix(1);
  }
  while (!text.empty() &&
         std::isspace(static_cast<unsigned char>(text.back()))) {
    text.remove_suffix(1);
  }
  size_t digits = 0;
  while (digits < text.size() &&
         std::isdigit(static_cast<unsigned char>(text[digits]))) {
    ++digits;
  }
  auto bad = [&](std::string_view why) {
    return Status::InvalidArgument(fmt::format(
        "size '{}' {}: use bytes or an integer with k/m/g/t (KiB, MiB, GiB, "
        "TiB; 1024-based), e.g. 4k, 1MiB, 2GiB",
        original, why));
  };
  if (digits == 0) return bad("does not start with a number");
  size_t suffix_begin = digits;
  while (suffix_begin < text.size() &&
         std::isspace(static_cast<unsigned char>(text[suffix_begin]))) {
    ++suffix_begin;
  }
  const int power = SuffixPower(text.substr(suffix_begin));
  if (power < 0) return bad("has an unknown unit");
  uint64_t value = 0;
  for (size_t i = 0; i < digits; ++i) {
    const uint64_t d = static_cast<uint64_t>(text[i] - '0');
    if (value > (UINT64_MAX - d) / 10) return bad("is too large");
    value = value * 10 + d;
  }
  for (int i = 0; i < power; ++i) {
    if (value > (UINT64_MAX >> 10)) return bad("is too large");
    value <<= 10;
  }
  return value;
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
