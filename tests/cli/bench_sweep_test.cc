// `ztier bench sweep` end to end on a small grid: every point carries read
// and write figures over --runs runs, the config's point is marked, and bad
// options exit with status 2 before any I/O. Which point wins is the drive's
// business (and noisy); the rule itself is tested in sweep_rule_test.cc.

#include <cstdio>
#include <fstream>
#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/cli/cli_run.h"
#include "tests/testutil/testutil.h"

namespace {

using ztier::testing::CliRun;

CliRun Ztier(const std::string& args) { return ztier::testing::RunZtier(args); }

class BenchSweep : public ::testing::Test {
 protected:
  void SetUp() override {
    // The default point: psync (present everywhere), 256 KiB, qd 1.
    std::ofstream f(dir_.File("config.yaml"));
    f << "io:\n  backend: psync\n  block_size: 256KiB\n  queue_depth: 1\n";
  }
  // psync, buffered, 2 MiB per run: a few milliseconds per run.
  std::string Args(const std::string& extra, const std::string& bs = "128KiB,256KiB",
                   const std::string& size = "2MiB") const {
    return "bench sweep --bs " + bs + " --size " + size + " --qd 1 --threads 1 --no-direct " +
           "--config " + dir_.File("config.yaml") + " --file " +
           dir_.File("s.dat") + " --csv " + dir_.File("s.csv") + " --json " +
           dir_.File("s.json") + " " + extra;
  }
  ztier::testing::ScratchDir dir_;
};

TEST_F(BenchSweep, EveryPointHasReadAndWriteOverItsRuns) {
  const CliRun r = Ztier(Args("--runs 3 --backends psync"));
  ASSERT_EQ(r.status, 0) << r.out;
  std::ifstream js(dir_.File("s.json"));
  const nlohmann::json j = nlohmann::json::parse(js);
  ASSERT_EQ(j.at("points").size(), 2u);
  EXPECT_EQ(j.at("runs"), 3);
  int defaults = 0;
  for (const auto& p : j.at("points")) {
    for (const char* dir : {"read", "write"}) {
      const auto& d = p.at(dir);
      ASSERT_EQ(d.at("runs_bw_bytes_per_s").size(), 3u) << dir;
      EXPECT_GT(d.at("median_bw_bytes_per_s").get<double>(), 0.0) << dir;
      EXPECT_LE(d.at("min_bw_bytes_per_s").get<double>(),
                d.at("median_bw_bytes_per_s").get<double>());
      EXPECT_LE(d.at("median_bw_bytes_per_s").get<double>(),
                d.at("max_bw_bytes_per_s").get<double>());
    }
    EXPECT_GT(p.at("combined").at("median_bw_bytes_per_s").get<double>(), 0.0);
    if (p.at("default").get<bool>()) {
      ++defaults;
      EXPECT_EQ(p.at("bs"), 256 * 1024);
    }
  }
  EXPECT_EQ(defaults, 1);
  EXPECT_EQ(j.at("default").at("backend"), "psync");
  // Either an io: block beyond the noise or an explicit "no recommendation".
  const bool recommended = !j.at("recommendation").is_null();
  EXPECT_EQ(r.out.find("io:\n  backend:") != std::string::npos, recommended) << r.out;
  // Every run of every point and direction is a CSV row (plus the header).
  std::ifstream csv(dir_.File("s.csv"));
  int lines = 0;
  for (std::string line; std::getline(csv, line);) ++lines;
  EXPECT_EQ(lines, 1 + 2 * 2 * 3);
}

TEST_F(BenchSweep, DefaultPointOutsideTheGridIsAdded) {
  const CliRun r = Ztier(Args("--runs 1 --backends psync", "128KiB"));
  ASSERT_EQ(r.status, 0) << r.out;
  std::ifstream js(dir_.File("s.json"));
  const nlohmann::json j = nlohmann::json::parse(js);
  ASSERT_EQ(j.at("points").size(), 2u);
  EXPECT_FALSE(j.at("points")[1].at("in_grid").get<bool>());
  EXPECT_TRUE(j.at("points")[1].at("default").get<bool>());
}

TEST_F(BenchSweep, BadOptionsExitTwoNamingThem) {
  CliRun r = Ztier(Args("--runs 0 --backends psync"));
  EXPECT_EQ(r.status, 2) << r.out;
  EXPECT_NE(r.out.find("--runs"), std::string::npos) << r.out;
  r = Ztier(Args("--backends psync", "128KiB,256KiB", "64KiB"));
  EXPECT_EQ(r.status, 2) << r.out;
  EXPECT_NE(r.out.find("--size"), std::string::npos) << r.out;
  r = Ztier(Args("--backends psync --qd many"));  // refused by the option parser
  EXPECT_EQ(r.status, 2) << r.out;
  EXPECT_NE(r.out.find("--qd"), std::string::npos) << r.out;
  r = Ztier(Args("--backends nosuch"));
  EXPECT_EQ(r.status, 2) << r.out;
  EXPECT_NE(r.out.find("nosuch"), std::string::npos) << r.out;
  // Zero block size, depth or threads: refused before any run (a zero
  // divisor once crashed the size check).
  for (const std::string& extra : {std::string("--qd 0"), std::string("--threads 0")}) {
    r = Ztier(Args("--backends psync " + extra));
    EXPECT_EQ(r.status, 2) << extra << ": " << r.out;
    EXPECT_NE(r.out.find("at least 1"), std::string::npos) << extra << ": " << r.out;
  }
  r = Ztier(Args("--backends psync", "0"));
  EXPECT_EQ(r.status, 2) << r.out;
  EXPECT_NE(r.out.find("at least 1"), std::string::npos) << r.out;
}

TEST_F(BenchSweep, FailedRunRemovesTheOutputsItCreated) {
  // The scratch file's folder does not exist: the first run fails.
  const std::string args = "bench sweep --bs 128KiB --size 2MiB --qd 1 --threads 1 --no-direct "
                           "--backends psync --config " + dir_.File("config.yaml") +
                           " --file " + dir_.File("missing/s.dat") + " --csv " +
                           dir_.File("s.csv") + " --json " + dir_.File("s.json");
  const CliRun r = Ztier(args);
  EXPECT_NE(r.status, 0) << r.out;
  EXPECT_FALSE(std::ifstream(dir_.File("s.csv")).good()) << r.out;
  EXPECT_FALSE(std::ifstream(dir_.File("s.json")).good()) << r.out;
}

}  // namespace
