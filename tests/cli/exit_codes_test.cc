// Exit codes and machine-readable output shared by every `ztier` command
// (cli/output.h): 0 success, 1 run-time failure, 2 usage or bad input;
// `--version`; every --json document names the version, time and host.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <string>
#include <thread>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/cli/cli_run.h"
#include "tests/testutil/testutil.h"

namespace {

using ztier::testing::CliRun;

// Runs `ztier <args>` with stderr dropped (progress and errors go there).
CliRun Ztier(const std::string& args) { return ztier::testing::RunZtier(args, "/dev/null"); }

std::string Model(const char* name) {
  return std::string(ZTIER_SOURCE_DIR) + "/configs/models/" + name + ".yaml";
}

TEST(ExitCodes, VersionAndHelpSucceed) {
  CliRun v = Ztier("--version");
  EXPECT_EQ(v.status, 0);
  EXPECT_EQ(v.out, "ztier 0.2.0\n");
  EXPECT_EQ(Ztier("--help").status, 0);
  EXPECT_EQ(Ztier("bench io --help").status, 0);
}

TEST(ExitCodes, UsageErrorsAreTwo) {
  // CLI11's own parse errors (its codes are 104, 106, 109, ...) all become 2.
  EXPECT_EQ(Ztier("").status, 2);                         // no subcommand
  EXPECT_EQ(Ztier("no-such-command").status, 2);          // unknown subcommand
  EXPECT_EQ(Ztier("plan --no-such-option").status, 2);    // unknown option
  EXPECT_EQ(Ztier("bench io --qd notanumber").status, 2); // option type
  EXPECT_EQ(Ztier("plan --model").status, 2);             // missing value
  // Bad values the commands check themselves.
  EXPECT_EQ(Ztier("bench io --bs 1XiB").status, 2);
  EXPECT_EQ(Ztier("plan --model no-such-model").status, 2);
  EXPECT_EQ(Ztier("trace info /nonexistent/trace.json").status, 2);
  EXPECT_EQ(Ztier("config check /nonexistent/config.yaml").status, 2);
  EXPECT_EQ(Ztier("checkpoint info /nonexistent/checkpoint").status, 2);
  EXPECT_EQ(Ztier("replay --trace gpt2_tied --null-io --device cuda").status, 2);
}

TEST(ExitCodes, RunTimeFailureIsOne) {
  // A write to /dev/full fails with ENOSPC: the disk-full case.
  CliRun r = Ztier("bench io --rw write --bs 4k --size 64k --no-direct --file /dev/full");
  EXPECT_EQ(r.status, 1) << r.out;
}

TEST(JsonOutput, CarriesVersionTimeAndHost) {
  CliRun r = Ztier("plan --model " + Model("tiny") + " --json");
  ASSERT_EQ(r.status, 0) << r.out;
  nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j.at("ztier_version"), "0.2.0");
  const std::string time = j.at("time");
  // 2026-12-03T23:40:00Z
  ASSERT_EQ(time.size(), 20u) << time;
  EXPECT_EQ(time[10], 'T');
  EXPECT_EQ(time.back(), 'Z');
  EXPECT_FALSE(j.at("host").get<std::string>().empty());
}

TEST(JsonOutput, BenchIoCarriesRunInfo) {
  ztier::testing::ScratchDir dir;
  CliRun r = Ztier("bench io --rw write --bs 4k --size 64k --no-direct --json --file " +
                   dir.File("io.dat"));
  ASSERT_EQ(r.status, 0) << r.out;
  nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j.at("ztier_version"), "0.2.0");
  EXPECT_TRUE(j.contains("time"));
  EXPECT_TRUE(j.contains("host"));
}

TEST(Outputs, SpecialFileTargetIsWrittenInPlace) {
  // `--timeline /dev/null` must not replace the device node with a regular
  // file (a write-then-rename would). A FIFO stands in for the device.
  ztier::testing::ScratchDir dir;
  const std::string fifo = dir.File("timeline.fifo");
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  size_t drained = 0;
  std::thread reader([&] {
    const int fd = open(fifo.c_str(), O_RDONLY);
    if (fd < 0) return;
    char buf[4096];
    ssize_t n = 0;
    while ((n = read(fd, buf, sizeof(buf))) > 0) drained += static_cast<size_t>(n);
    close(fd);
  });
  std::ofstream(dir.File("c.yaml")) << "tiers:\n  nvme:\n    paths: [\"" << dir.File("nvme")
                                    << "\"]\nio:\n  direct: false\n";
  CliRun r = Ztier("bench step --model " + Model("tiny") +
                   " --steps 1 --device-bw 1e9 --allow-unpinned --buffer-elements 16384 "
                   "--buffer-count 8 --config " + dir.File("c.yaml") + " --timeline " + fifo);
  if (r.status != 0) {
    // Unblock the reader if the command never opened the FIFO.
    const int fd = open(fifo.c_str(), O_WRONLY | O_NONBLOCK);
    if (fd >= 0) close(fd);
  }
  reader.join();
  EXPECT_EQ(r.status, 0) << r.out;
  struct stat st {};
  ASSERT_EQ(stat(fifo.c_str(), &st), 0);
  EXPECT_TRUE(S_ISFIFO(st.st_mode)) << "the FIFO was replaced";
  EXPECT_GT(drained, 0u);  // the timeline went through it
}

}  // namespace
