// `ztier bench sweep`'s decision rule on made-up figures (GB/s written as
// bytes/s): what it picks and when it declines to recommend anything.
#include "cli/sweep_rule.h"

#include <gtest/gtest.h>

namespace ztier::cli {
namespace {

constexpr double kGB = 1e9;

// A point's combined spread from its read and write runs, in GB/s.
Spread Point(std::vector<double> read_gb, std::vector<double> write_gb) {
  for (double& x : read_gb) x *= kGB;
  for (double& x : write_gb) x *= kGB;
  return SpreadOf(CombinedRuns(read_gb, write_gb));
}

TEST(SweepRule, SpreadIsMedianAndRange) {
  const Spread s = SpreadOf({3, 1, 2, 10});
  EXPECT_DOUBLE_EQ(s.median, 2.5);
  EXPECT_DOUBLE_EQ(s.min, 1);
  EXPECT_DOUBLE_EQ(s.max, 10);
  const Spread e = SpreadOf({});
  EXPECT_EQ(e.median, 0);
  EXPECT_EQ(e.max, 0);
}

TEST(SweepRule, CombinedIsTheTimeOfOneReadAndOneWrite) {
  // 1 GB read at 2 GB/s (0.5 s) and written at 1 GB/s (1 s): 2 GB in 1.5 s.
  EXPECT_NEAR(CombinedBandwidth(2 * kGB, 1 * kGB), 2 * kGB / 1.5, 1.0);
  EXPECT_EQ(CombinedBandwidth(0, kGB), 0);
  // Run i pairs with run i; a read run without its write is left out.
  const std::vector<double> c = CombinedRuns({kGB, 2 * kGB, 3 * kGB}, {kGB, 2 * kGB});
  ASSERT_EQ(c.size(), 2u);
  EXPECT_NEAR(c[1], 2 * kGB, 1.0);
}

TEST(SweepRule, NoisyWinnerWithOverlappingRangeIsNotRecommended) {
  // The case seen on a shared virtio disk: one libaio run at 2.28 GB/s took
  // the lead, but the baseline's runs reach as high as its others.
  const std::vector<Spread> points = {
      Point({1.20, 1.35, 1.10}, {1.0, 1.1, 0.9}),  // io_uring 1 MiB qd 4: baseline
      Point({2.28, 1.25, 1.15}, {1.6, 1.0, 1.1}),  // libaio 256 KiB qd 4
  };
  const SweepDecision d = DecideSweep(points, 0);
  EXPECT_EQ(d.best, 1u);  // its median is higher...
  EXPECT_FALSE(d.recommend.has_value());  // ...but within the baseline's range
}

TEST(SweepRule, ClearWinnerIsRecommended) {
  const std::vector<Spread> points = {
      Point({1.0, 1.1, 1.2}, {0.8, 0.9, 1.0}),  // baseline
      Point({2.0, 2.1, 2.2}, {1.8, 1.9, 2.0}),
      Point({1.5, 1.6, 1.7}, {1.4, 1.5, 1.6}),
  };
  const SweepDecision d = DecideSweep(points, 0);
  EXPECT_EQ(d.best, 1u);
  ASSERT_TRUE(d.recommend.has_value());
  EXPECT_EQ(*d.recommend, 1u);
}

TEST(SweepRule, SteadyPointClearingTheBaselineBeatsANoisyBestMedian) {
  const std::vector<Spread> points = {
      Point({1.0, 1.1, 1.2}, {1.0, 1.1, 1.2}),  // baseline: up to 1.2
      Point({3.0, 2.9, 1.1}, {3.0, 2.9, 1.1}),  // best median, one run within the baseline's
      Point({1.8, 1.9, 2.0}, {1.8, 1.9, 2.0}),  // every run beats the baseline
  };
  const SweepDecision d = DecideSweep(points, 0);
  EXPECT_EQ(d.best, 1u);
  ASSERT_TRUE(d.recommend.has_value());
  EXPECT_EQ(*d.recommend, 2u);
}

TEST(SweepRule, FastReadsSlowWritesLoseToBalanced) {
  // Reads alone would pick point 1; a step reads and writes the same bytes.
  const std::vector<Spread> points = {
      Point({1.5, 1.5, 1.5}, {1.5, 1.5, 1.5}),  // baseline: 1.5 combined
      Point({3.0, 3.0, 3.0}, {0.5, 0.5, 0.5}),  // 0.86 combined
  };
  const SweepDecision d = DecideSweep(points, 0);
  EXPECT_EQ(d.best, 0u);
  EXPECT_FALSE(d.recommend.has_value());
}

TEST(SweepRule, BaselineBestRecommendsNothing) {
  const std::vector<Spread> points = {
      Point({0.5, 0.5, 0.6}, {0.5, 0.5, 0.6}),
      Point({2.0, 2.1, 2.2}, {1.8, 1.9, 2.0}),  // baseline, clearly fastest
  };
  const SweepDecision d = DecideSweep(points, 1);
  EXPECT_EQ(d.best, 1u);
  EXPECT_FALSE(d.recommend.has_value());
}

}  // namespace
}  // namespace ztier::cli
