// `ztier config import [--strict]`: the exit status and what reaches stderr,
// run on configs of tests/data/deepspeed/.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <string>

namespace {

struct CliRun {
  int status = -1;  // exit status
  std::string out;  // stdout, or stderr when asked for
};

// Runs `ztier config import ARGS` on a corpus file, keeping stdout or stderr.
CliRun Import(const std::string& args, const std::string& file,
              bool want_stderr) {
  const std::string path = ZTIER_SOURCE_DIR "/tests/data/deepspeed/" + file;
  const std::string redirect =
      want_stderr ? " 2>&1 >/dev/null" : " 2>/dev/null";
  CliRun r;
  FILE* p = popen((std::string(ZTIER_CLI) + " config import " + args + " " +
                   path + redirect)
                      .c_str(),
                  "r");
  if (p == nullptr) return r;
  char buf[4096];
  size_t n = 0;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) r.out.append(buf, n);
  const int st = pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
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
