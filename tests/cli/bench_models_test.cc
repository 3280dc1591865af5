// Every `ztier bench` command that takes --model runs on every shape shipped
// in configs/models/: the small ones at the command's own default scale (the
// optimizer's 1/64 of `tiny` once left 28 KiB of state, less than one I/O
// block, and the drive measurement refused it), the large ones scaled down
// until a run takes seconds. Exit statuses follow the CLI's convention: 0
// success, 2 a bad option or model.

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/cli/cli_run.h"
#include "tests/testutil/testutil.h"

namespace {

using ztier::testing::CliRun;

CliRun Ztier(const std::string& args, const std::string& err_file) {
  return ztier::testing::RunZtier(args, err_file);
}

// --scale per shipped shape: none (the command's default) for the small
// ones; for the large ones a divisor that leaves a few million elements
// (gpt2-xl 1.6e9 / 512, llama2-70b 6.9e10 / 16384: about 4e6 each).
const std::map<std::string, std::string>& ScaleFor() {
  static const std::map<std::string, std::string> m = {
      {"tiny", ""},
      {"llama-tiny", ""},
      {"moe-small", ""},
      {"gpt2-xl", "--scale 512"},
      {"llama2-7b", "--scale 2048"},
      {"llama2-13b", "--scale 4096"},
      {"llama2-70b", "--scale 16384"},
  };
  return m;
}

std::vector<std::string> ShapeNames() {
  std::vector<std::string> names;
  for (const auto& [name, scale] : ScaleFor()) names.push_back(name);
  return names;
}

TEST(BenchModels, EveryShippedShapeHasAScale) {
  // A shape added to configs/models/ must be added to the table above, or
  // the tests below would not cover it.
  std::set<std::string> shipped;
  for (const auto& e : std::filesystem::directory_iterator(ZTIER_SOURCE_DIR "/configs/models")) {
    if (e.path().extension() == ".yaml") shipped.insert(e.path().stem().string());
  }
  ASSERT_FALSE(shipped.empty());
  for (const auto& name : shipped) {
    EXPECT_TRUE(ScaleFor().count(name)) << name << ".yaml is not in ScaleFor()";
  }
}

class BenchModel
    : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {
 protected:
  void SetUp() override {
    config_ = dir_.File("config.yaml");
    std::ofstream f(config_);
    // Buffered I/O: the scratch directory may be on a file system without
    // O_DIRECT; the engine and sizes are the same.
    f << "tiers:\n  nvme:\n    paths: [\"" << dir_.File("nvme") << "\"]\n"
      << "optimizer:\n  paths: [\"" << dir_.File("opt") << "\"]\n"
      << "io:\n  direct: false\n";
  }
  // One short run of `command` on `model`, JSON on stdout.
  std::string Args(const std::string& command, const std::string& model) const {
    std::string a = "bench " + command + " --model " + model + " " + ScaleFor().at(model) +
                    " --config " + config_ + " --json";
    if (command == "step") {
      // One measured step; the drive measurement kept small (8 MiB).
      a += " --steps 1 --bench-size 8MiB --allow-unpinned";
    } else {
      a += " --runs 1 --no-progress";
    }
    return a;
  }

  ztier::testing::ScratchDir dir_;
  std::string config_;
};

TEST_P(BenchModel, Runs) {
  const auto& [command, model] = GetParam();
  const CliRun r = Ztier(Args(command, model), dir_.File("stderr.txt"));
  ASSERT_EQ(r.status, 0) << r.err;
  const nlohmann::json j = nlohmann::json::parse(r.out, nullptr, /*allow_exceptions=*/false);
  ASSERT_FALSE(j.is_discarded()) << "not JSON: " << r.out;
  if (command == "step") {
    EXPECT_EQ(j.at("steps").get<int>(), 1);
    EXPECT_GT(j.at("step_seconds").get<double>(), 0.0);
  } else if (command == "optimizer") {
    EXPECT_GT(j.at("elements").get<uint64_t>(), 0u);
    EXPECT_GT(j.at("step_s").get<double>(), 0.0);
    EXPECT_GT(j.at("drive_read_bw_bytes_per_s").get<double>(), 0.0);
  } else {
    EXPECT_GT(j.at("data_bytes").get<uint64_t>(), 0u);
    EXPECT_GT(j.at("save_s").get<double>(), 0.0);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, BenchModel,
    ::testing::Combine(::testing::Values("step", "optimizer", "checkpoint"),
                       ::testing::ValuesIn(ShapeNames())),
    [](const auto& info) {
      std::string n = std::get<0>(info.param) + "_" + std::get<1>(info.param);
      for (char& c : n) {
        if (c == '-') c = '_';
      }
      return n;
    });

TEST(BenchModelsUsage, BadModelOrScaleExitsTwo) {
  ztier::testing::ScratchDir dir;
  for (const char* command : {"step", "optimizer", "checkpoint"}) {
    CliRun r = Ztier(std::string("bench ") + command + " --model no-such-shape",
                     dir.File("stderr.txt"));
    EXPECT_EQ(r.status, 2) << command << ": " << r.err;
    EXPECT_NE(r.err.find("no-such-shape"), std::string::npos) << command << ": " << r.err;
    r = Ztier(std::string("bench ") + command + " --model tiny --scale 0.5",
              dir.File("stderr.txt"));
    EXPECT_EQ(r.status, 2) << command << ": " << r.err;
    EXPECT_NE(r.err.find("--scale"), std::string::npos) << command << ": " << r.err;
  }
  // A value the option parser refuses (not a number) is a usage error too.
  const CliRun r = Ztier("bench optimizer --model tiny --runs none", dir.File("stderr.txt"));
  EXPECT_EQ(r.status, 2) << r.err;
  EXPECT_NE(r.err.find("--runs"), std::string::npos) << r.err;
}

}  // namespace
