// `ztier config import [--strict]`: the exit status and what reaches stderr,
// run on configs of tests/data/deepspeed/.
#include <string>

#include <gtest/gtest.h>

#include "tests/cli/cli_run.h"
#include "tests/testutil/testutil.h"

namespace {

using ztier::testing::CliRun;

// Runs `ztier config import ARGS` on a corpus file; `out` holds its stdout,
// or its stderr when asked for.
CliRun Import(const std::string& args, const std::string& file, bool want_stderr) {
  const std::string path = ZTIER_SOURCE_DIR "/tests/data/deepspeed/" + file;
  ztier::testing::ScratchDir dir;
  CliRun r = ztier::testing::RunZtier("config import " + args + " " + path,
                                      dir.File("stderr.txt"));
  if (want_stderr) r.out = r.err;
  return r;
}

TEST(ConfigImport, WithoutStrictIssuesAreNotesAndTheExitIsZero) {
  CliRun out = Import("", "no_offload.json", false);
  EXPECT_EQ(out.status, 0);
  EXPECT_NE(out.out.find("params: host"), std::string::npos) << out.out;
  CliRun err = Import("", "no_offload.json", true);
  EXPECT_NE(
      err.out.find("ztier: note: zero_optimization.offload_param: not given"),
      std::string::npos)
      << err.out;
  EXPECT_NE(err.out.find("ztier: 2 DeepSpeed keys not reproduced as DeepSpeed "
                         "reads them (see the notes); --strict makes this an "
                         "error"),
            std::string::npos)
      << err.out;
}

TEST(ConfigImport, StrictFailsWithExitTwoNamingEveryKey) {
  CliRun out = Import("--strict", "no_offload.json", false);
  EXPECT_EQ(out.status, 2);
  EXPECT_EQ(out.out, "");  // no config for a run that would not match
  CliRun err = Import("--strict", "no_offload.json", true);
  EXPECT_EQ(err.status, 2);
  EXPECT_NE(err.out.find("--strict: 2 DeepSpeed keys not mapped"),
            std::string::npos)
      << err.out;
  EXPECT_NE(err.out.find(
                "\nzero_optimization.offload_param: not given: DeepSpeed keeps "
                "parameters on the GPU"),
            std::string::npos)
      << err.out;
  EXPECT_NE(err.out.find("\nzero_optimization.offload_optimizer: not given"),
            std::string::npos)
      << err.out;
}

TEST(ConfigImport, StrictPassesAConfigZtierReproduces) {
  CliRun r = Import("--strict", "zero3_cpu_offload.json", false);
  EXPECT_EQ(r.status, 0);
  EXPECT_NE(r.out.find("params: host"), std::string::npos) << r.out;
}

TEST(ConfigImport, AnUnknownDeviceFailsEvenWithoutStrict) {
  CliRun r = Import("", "unknown_device.json", true);
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(
      r.out.find(
          "zero_optimization.offload_param.device: \"gpu\" is not an offload "
          "device (valid: none, cpu, nvme)"),
      std::string::npos)
      << r.out;
}

}  // namespace
