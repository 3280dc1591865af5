// `ztier bench step --ranks processes`: world size 2 as forked processes over
// the gloo collective gives the report threads mode gives (same bytes moved,
// fetch counts), and a rank that dies fails the run with its error (the test
// asserts no wall time: a hang ends at ctest's timeout).

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

class BenchStepRanks : public ::testing::Test {
 protected:
  void SetUp() override {
    config_ = dir_.File("config.yaml");
    std::ofstream f(config_);
    f << "tiers:\n  nvme:\n    paths: [\"" << dir_.File("nvme") << "\"]\n"
      << "io:\n  direct: false\n"
      << "coordinator:\n  param_persistence_threshold: 0\n"
      << "comm:\n  timeout: 5\n";
  }
  // A small model (every parameter swapped: persistence threshold 0), few
  // steps, no bandwidth measurement.
  std::string Args(const std::string& ranks, uint32_t world) const {
    return "bench step --model " ZTIER_SOURCE_DIR "/configs/models/tiny.yaml --scale 1 "
           "--steps 2 --device-bw 1e9 --buffer-elements 16384 --buffer-count 8 --allow-unpinned "
           "--config " + config_ +
           " --world-size " + std::to_string(world) + " --ranks " + ranks;
  }
  static nlohmann::json Json(const CliRun& r) {
    // The JSON object is the last thing on stdout; stderr carries progress.
    const size_t at = r.out.find("\n{");
    const size_t begin = r.out.rfind('{', 0) == 0 ? 0 : (at == std::string::npos ? 0 : at + 1);
    return nlohmann::json::parse(r.out.substr(begin));
  }

  ztier::testing::ScratchDir dir_;
  std::string config_;
};

TEST_F(BenchStepRanks, ProcessesReport) {
  const CliRun r = Ztier(Args("processes", 2));
  ASSERT_EQ(r.status, 0) << r.out;
  EXPECT_NE(r.out.find("world size 2 (processes)"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("comm.backend set to gloo"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("step / bound"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("collective / rank"), std::string::npos) << r.out;
}

TEST_F(BenchStepRanks, ThreadsAndProcessesMoveTheSame) {
  const CliRun t = Ztier(Args("threads", 2) + " --json");
  ASSERT_EQ(t.status, 0) << t.out;
  const CliRun p = Ztier(Args("processes", 2) + " --json");
  ASSERT_EQ(p.status, 0) << p.out;
  const auto jt = Json(t), jp = Json(p);
  EXPECT_EQ(jt["ranks"], "threads");
  EXPECT_EQ(jp["ranks"], "processes");
  ASSERT_EQ(jt["per_step"].size(), jp["per_step"].size());
  for (size_t i = 0; i < jt["per_step"].size(); ++i) {
    EXPECT_EQ(jt["per_step"][i]["bytes_read"], jp["per_step"][i]["bytes_read"]) << i;
    EXPECT_EQ(jt["per_step"][i]["bytes_written"], jp["per_step"][i]["bytes_written"]) << i;
    EXPECT_EQ(jt["per_step"][i]["prefetch_hit_rate"], jp["per_step"][i]["prefetch_hit_rate"])
        << i;
  }
  EXPECT_EQ(jt["peak_device_bytes"], jp["peak_device_bytes"]);
  EXPECT_GT(jp["collective_seconds_per_rank"].get<double>(), 0);
}

TEST_F(BenchStepRanks, WorldSizeOneProcess) {
  const CliRun r = Ztier(Args("processes", 1));
  ASSERT_EQ(r.status, 0) << r.out;
  EXPECT_NE(r.out.find("world size 1 (processes)"), std::string::npos) << r.out;
}

TEST_F(BenchStepRanks, DeadRankFailsTheRun) {
  const CliRun r = Ztier(Args("processes", 2) + " --fail-rank 1");
  EXPECT_NE(r.status, 0) << r.out;
  // The first failure named is the rank that died; the other one fails on
  // its own within comm.timeout (5 s), not by the parent's kill.
  EXPECT_NE(r.out.find("rank 1 (pid"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("killed by signal 9"), std::string::npos) << r.out;
  EXPECT_LT(r.out.find("rank 1 (pid"), r.out.find("rank 0 (pid")) << r.out;
  // A hang instead would end at ctest's timeout for this test (120 s).
  EXPECT_EQ(r.out.find("SIGKILL) "), std::string::npos) << r.out;
}

}  // namespace
