// Tests of the YAML config layer: defaults, units, every error kind with its
// position and suggestion, environment expansion, round trip, and every YAML
// file shipped under configs/.
#include "tiering/config.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <optional>
#include <string>

#include "tests/testutil/testutil.h"
#include "tiering/units.h"

namespace ztier::tiering {
namespace {

namespace fs = std::filesystem;

// Sets (or unsets, with nullopt) an environment variable for one scope.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, std::optional<std::string> value) : name_(name) {
    if (const char* old = getenv(name)) old_ = old;
    if (value) {
      setenv(name, value->c_str(), 1);
    } else {
      unsetenv(name);
    }
  }
  ~ScopedEnv() {
    if (old_) {
      setenv(name_, old_->c_str(), 1);
    } else {
      unsetenv(name_);
    }
  }

 private:
  const char* name_;
  std::optional<std::string> old_;
};

LoadOptions NoPaths() {
  LoadOptions o;
  o.check_paths = false;
  return o;
}

// The error message of loading `yaml` as "t.yaml" (empty when it loads).
std::string Errors(const std::string& yaml,
                   const LoadOptions& options = NoPaths()) {
  Result<Config> r = LoadConfigText(yaml, "t.yaml", options);
  if (r.ok()) return "";
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  return std::string(r.status().message());
}

Config MustLoad(const std::string& yaml,
                const LoadOptions& options = NoPaths()) {
  Result<Config> r = LoadConfigText(yaml, "t.yaml", options);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return r.ok() ? r.value() : Config{};
}

// ---------------------------------------------------------------------------
// Defaults

TEST(ConfigDefaults, FollowDeepSpeedWhereTheConceptIsTheSame) {
  Config c;
  EXPECT_EQ(c.tiers.params, ParamTier::kNvme);
  EXPECT_EQ(c.tiers.nvme.buffer_count, 5u);
  EXPECT_EQ(c.tiers.nvme.buffer_size, 100'000'000u);
  EXPECT_EQ(c.tiers.nvme.buffer_element_bytes, 2u);
  EXPECT_EQ(c.tiers.device.max_live_parameters, 1'000'000'000u);
  EXPECT_TRUE(c.tiers.host.pin_memory);
  EXPECT_EQ(c.tiers.host.max_in_cpu, 1'000'000'000u);
  EXPECT_FALSE(c.tiers.host.allow_unpinned);
  EXPECT_EQ(c.io.backend, io::BackendKind::kAuto);
  EXPECT_EQ(c.io.block_size, 1u << 20);
  EXPECT_EQ(c.io.queue_depth, 32u);
  EXPECT_EQ(c.io.threads, 1u);
  EXPECT_TRUE(c.io.register_buffers);
  EXPECT_FALSE(c.io.sqpoll);
  EXPECT_TRUE(c.io.direct);
  EXPECT_EQ(c.coordinator.prefetch_bucket_size, 50'000'000u);
  EXPECT_EQ(c.coordinator.max_reuse_distance, 1'000'000'000u);
  EXPECT_EQ(c.coordinator.param_persistence_threshold, 100'000u);
  EXPECT_EQ(c.coordinator.model_persistence_threshold, kInfinite);
  EXPECT_EQ(c.coordinator.max_ongoing_fetch_events, 2u);
  EXPECT_FALSE(c.coordinator.nvme_lookahead.has_value());
  EXPECT_EQ(c.comm.backend, CommBackend::kAuto);
  EXPECT_EQ(c.integrity.checksum, Checksum::kCrc32c);
  EXPECT_EQ(c.optimizer.tier, OptimizerTier::kNvme);
  EXPECT_TRUE(c.optimizer.paths.empty());
  EXPECT_EQ(c.optimizer.buffer_count, 4u);
  EXPECT_EQ(c.optimizer.sub_group_size, 100'000'000u);  // DeepSpeed: 1e9
  EXPECT_EQ(c.optimizer.threads, 0u);
  EXPECT_EQ(c.optimizer.isa, OptimizerIsa::kAuto);
}

TEST(ConfigDefaults, EmptyDocumentIsAllDefaultsWithTheDefaultPath) {
  ScopedEnv env("ZTIER_NVME_PATH", std::nullopt);
  Config expected;
  expected.tiers.nvme.paths = {"ztier_nvme"};
  EXPECT_EQ(MustLoad(""), expected);
  EXPECT_EQ(MustLoad("# only a comment\n"), expected);
  EXPECT_EQ(MustLoad("tiers:\nio:\n"), expected);  // empty sections: defaults
  EXPECT_EQ(MustLoad("{}"), expected);
}

TEST(ConfigDefaults, DefaultPathFollowsZtierNvmePath) {
  ScopedEnv env("ZTIER_NVME_PATH", "/some/where");
  EXPECT_EQ(MustLoad("").tiers.nvme.paths,
            std::vector<std::string>{"/some/where"});
}

TEST(ConfigDefaults, GradientsOnTheHostUnlessNvmeIsWritten) {
  EXPECT_EQ(Config{}.tiers.gradients, GradTier::kHost);
  Config c = MustLoad("tiers: {gradients: nvme}\n", LoadOptions{});
  EXPECT_EQ(c.tiers.gradients, GradTier::kNvme);
  EXPECT_EQ(MustLoad(ConfigToYaml(c), LoadOptions{}), c);  // written back and read again
  EXPECT_NE(SummarizeConfig(c).find("gradients    on NVMe"), std::string::npos);
}

TEST(ConfigDefaults, HostTierNeedsNoPath) {
  Config c = MustLoad("tiers: {params: host}\n", LoadOptions{});
  EXPECT_EQ(c.tiers.params, ParamTier::kHost);
  EXPECT_TRUE(c.tiers.nvme.paths.empty());
  EXPECT_TRUE(ValidateConfig(c).ok());
}

// ---------------------------------------------------------------------------
// Units

TEST(Units, ByteSizes) {
  const Limits any{0, kInfinite - 1, false};
  struct Case {
    const char* text;
    uint64_t bytes;
  } cases[] = {
      {"4096", 4096},
      {"0", 0},
      {"512B", 512},
      {"4KiB", 4096},
      {"256KiB", 256 << 10},
      {"1MiB", 1 << 20},
      {"1 MiB", 1 << 20},
      {"1.5MiB", 3 << 19},
      {"0.5KiB", 512},
      {"1GiB", 1ULL << 30},
      {"2TiB", 2ULL << 40},
      {"1KB", 1000},
      {"1MB", 1000000},
      {"1GB", 1000000000},
      {"1TB", 1000000000000ULL},
      // Single letters are binary (dd, fio); names match in any case.
      {"4k", 4096},
      {"4K", 4096},
      {"1m", 1 << 20},
      {"2G", 2ULL << 30},
      {"1t", 1ULL << 40},
      {"1mib", 1 << 20},
      {"1kb", 1000},
      {"1Mb", 1000000},
      {"8 b", 8},
      {"1e6", 1000000},
      {"1E6", 1000000},
      {"2.5e3", 2500},
      {"4_096", 4096},
      {"+8", 8},
      {"18446744073709551614", 18446744073709551614ULL},
  };
  for (const Case& c : cases) {
    Result<uint64_t> r = ParseByteSize(c.text, any);
    ASSERT_TRUE(r.ok()) << c.text << ": " << r.status().ToString();
    EXPECT_EQ(*r, c.bytes) << c.text;
  }
}

TEST(Units, ByteSizeErrors) {
  const Limits l{4096, 256ULL << 20, false};
  auto msg = [&](const char* text) {
    Result<uint64_t> r = ParseByteSize(text, l);
    EXPECT_FALSE(r.ok()) << text;
    return r.ok() ? std::string() : std::string(r.status().message());
  };
  EXPECT_EQ(msg("1XiB"), "unknown unit 'XiB' in '1XiB' (valid units: B, K or KiB, M or MiB, G or GiB, T or TiB (1024-based), KB, MB, GB, TB (1000-based), in any letter case)");
  EXPECT_EQ(msg("1Kb2"), "unknown unit 'Kb2' in '1Kb2' (valid units: B, K or KiB, M or MiB, G or GiB, T or TiB (1024-based), KB, MB, GB, TB (1000-based), in any letter case)");
  EXPECT_EQ(msg("0.1KiB"), "'0.1KiB' is not a whole number of bytes");
  EXPECT_EQ(msg("-1MiB"), "'-1MiB' is out of range (allowed: 4KiB to 256MiB)");
  EXPECT_EQ(msg("1GiB"), "'1GiB' is out of range (allowed: 4KiB to 256MiB)");
  EXPECT_EQ(msg("1e30"), "'1e30' is out of range (allowed: 4KiB to 256MiB)");
  EXPECT_EQ(msg("MiB"),
            "expected a byte size such as 4096, 256KiB or 1MiB, got 'MiB'");
  EXPECT_EQ(msg("inf"),
            "expected a byte size such as 4096, 256KiB or 1MiB, got 'inf'");
}

TEST(Units, ElementCounts) {
  const Limits l{0, kMaxElements, true};
  struct Case {
    const char* text;
    uint64_t n;
  } cases[] = {
      {"0", 0},
      {"32", 32},
      {"1e8", 100'000'000},
      {"5e7", 50'000'000},
      {"1.5e6", 1'500'000},
      {"10e-1", 1},
      {"100_000_000", 100'000'000},
      {"1e15", kMaxElements},
      {"inf", kInfinite},
      {".inf", kInfinite},
  };
  for (const Case& c : cases) {
    Result<uint64_t> r = ParseElementCount(c.text, l);
    ASSERT_TRUE(r.ok()) << c.text << ": " << r.status().ToString();
    EXPECT_EQ(*r, c.n) << c.text;
  }
}

TEST(Units, ElementCountErrors) {
  auto msg = [](const char* text, Limits l) {
    Result<uint64_t> r = ParseElementCount(text, l);
    EXPECT_FALSE(r.ok()) << text;
    return r.ok() ? std::string() : std::string(r.status().message());
  };
  const Limits qd{1, 4096, false};
  EXPECT_EQ(msg("0", qd), "'0' is out of range (allowed: 1 to 4096)");
  EXPECT_EQ(msg("-3", qd), "'-3' is out of range (allowed: 1 to 4096)");
  EXPECT_EQ(msg("1.5", qd), "'1.5' is not a whole number");
  EXPECT_EQ(msg("1e-1", qd), "'1e-1' is not a whole number");
  EXPECT_EQ(msg("inf", qd), "'inf' is not allowed here (allowed: 1 to 4096)");
  EXPECT_EQ(msg("1MiB", qd),
            "expected a whole number such as 32, 50000000 or 5e7, got '1MiB' "
            "(element counts "
            "and counts take no unit)");
  EXPECT_EQ(msg("lots", Limits{0, kMaxElements, true}),
            "expected a whole number such as 32, 50000000 or 5e7, or inf, got "
            "'lots'");
  EXPECT_EQ(msg("2e15", Limits{0, kMaxElements, true}),
            "'2e15' is out of range (allowed: 0 to 1e15, or inf)");
  EXPECT_EQ(msg("99999999999999999999999", Limits{}),
            "'99999999999999999999999' is out of range (allowed: 0 to 1e15)");
}

TEST(Units, FormatRoundTrips) {
  const Limits any{0, kInfinite - 1, true};
  for (uint64_t n : std::initializer_list<uint64_t>{
           0ULL, 1ULL, 32ULL, 1000ULL, 10000ULL, 100000ULL, 1500000ULL,
           50000000ULL, 100000000ULL, 123456789ULL, 1200000000ULL,
           1000000000000000ULL, 18446744073709551614ULL, kInfinite}) {
    std::string text = FormatElementCount(n);
    Result<uint64_t> r = ParseElementCount(text, any);
    ASSERT_TRUE(r.ok()) << text;
    EXPECT_EQ(*r, n) << text;
    if (n == kInfinite) continue;
    text = FormatByteSize(n);
    r = ParseByteSize(text, any);
    ASSERT_TRUE(r.ok()) << text;
    EXPECT_EQ(*r, n) << text;
  }
  EXPECT_EQ(FormatElementCount(100000000), "1e8");
  EXPECT_EQ(FormatElementCount(1500000), "1.5e6");
  EXPECT_EQ(FormatElementCount(1000), "1000");
  EXPECT_EQ(FormatElementCount(kInfinite), "inf");
  EXPECT_EQ(FormatByteSize(1 << 20), "1MiB");
  EXPECT_EQ(FormatByteSize(256 << 10), "256KiB");
  EXPECT_EQ(FormatByteSize(5000), "5000");
  EXPECT_EQ(HumanBytes(1000000000), "953.7 MiB");
  EXPECT_EQ(HumanBytes(4096), "4 KiB");
  EXPECT_EQ(HumanBytes(12), "12 B");
}

TEST(ConfigUnits, EveryFormInTheConfig) {
  Config c = MustLoad(
      "tiers:\n"
      "  device: {max_live_parameters: inf}\n"
      "  nvme: {paths: [a], buffer_size: 1.5e6, buffer_count: 8}\n"
      "io: {block_size: 256KiB, queue_depth: 1e3}\n"
      "coordinator: {prefetch_bucket_size: 50_000_000, nvme_lookahead: 2e8,\n"
      "              max_reuse_distance: inf, model_persistence_threshold: "
      "1e12}\n");
  EXPECT_EQ(c.tiers.device.max_live_parameters, kInfinite);
  EXPECT_EQ(c.tiers.nvme.buffer_size, 1'500'000u);
  EXPECT_EQ(c.tiers.nvme.buffer_count, 8u);
  EXPECT_EQ(c.io.block_size, 256u << 10);
  EXPECT_EQ(c.io.queue_depth, 1000u);
  EXPECT_EQ(c.coordinator.prefetch_bucket_size, 50'000'000u);
  EXPECT_EQ(c.coordinator.nvme_lookahead, std::optional<uint64_t>(200'000'000));
  EXPECT_EQ(c.coordinator.max_reuse_distance, kInfinite);
  EXPECT_EQ(c.coordinator.model_persistence_threshold, 1'000'000'000'000u);
  EXPECT_EQ(MustLoad("io: {block_size: 4096}").io.block_size, 4096u);
  EXPECT_EQ(MustLoad("io: {block_size: 4.096MB}").io.block_size, 4'096'000u);
  EXPECT_EQ(MustLoad("io: {block_size: 8.192e3}").io.block_size, 8192u);
  EXPECT_EQ(MustLoad("io: {block_size: \"2 MiB\"}").io.block_size, 2u << 20);
  EXPECT_EQ(MustLoad("io: {sqpoll: True, direct: FALSE}").io.sqpoll, true);
}

// ---------------------------------------------------------------------------
// Errors: each names source, line, column, key path, and what is allowed.

TEST(ConfigErrors, UnknownKeyWithTypoSuggestsTheNearestKey) {
  EXPECT_EQ(Errors("tiers:\n"
                   "  nvme:\n"
                   "    paths: [a]\n"
                   "    buffer_cont: 5\n"),
            "t.yaml:4:5: tiers.nvme.buffer_cont: unknown key (did you mean "
            "'buffer_count'?)");
  EXPECT_EQ(
      Errors("io: {qeue_depth: 8}"),
      "t.yaml:1:6: io.qeue_depth: unknown key (did you mean 'queue_depth'?)");
  EXPECT_EQ(Errors("tier: {}"),
            "t.yaml:1:1: tier: unknown key (did you mean 'tiers'?)");
  EXPECT_EQ(
      Errors("io: {Block_Size: 4096}"),
      "t.yaml:1:6: io.Block_Size: unknown key (did you mean 'block_size'?)");
}

TEST(ConfigErrors, KeyInTheWrongSectionNamesWhereItBelongs) {
  EXPECT_EQ(Errors("tiers:\n  host:\n    queue_depth: 8\n"),
            "t.yaml:3:5: tiers.host.queue_depth: unknown key (did you mean "
            "'io.queue_depth'?)");
  EXPECT_EQ(Errors("prefetch_bucket_size: 1e8\n"),
            "t.yaml:1:1: prefetch_bucket_size: unknown key (did you mean "
            "'coordinator.prefetch_bucket_size'?)");
}

TEST(ConfigErrors, UnknownKeyFarFromAnyListsTheValidKeys) {
  EXPECT_EQ(
      Errors("comm: {world: 8}"),
      "t.yaml:1:8: comm.world: unknown key (valid keys in comm: backend, timeout)");
  EXPECT_EQ(Errors("scheduler: {}"),
            "t.yaml:1:1: scheduler: unknown key (valid keys: tiers, io, "
            "coordinator, comm, integrity, optimizer)");
}

TEST(ConfigErrors, WrongType) {
  EXPECT_EQ(
      Errors("io:\n  queue_depth: {a: 1}\n"),
      "t.yaml:2:16: io.queue_depth: expected a whole number, got a mapping");
  EXPECT_EQ(Errors("io:\n  queue_depth: [8]\n"),
            "t.yaml:2:16: io.queue_depth: expected a whole number, got a list");
  EXPECT_EQ(Errors("io: 5\n"),
            "t.yaml:1:5: io: expected a mapping of keys, got a single value");
  EXPECT_EQ(Errors("io: {direct: yes}"),
            "t.yaml:1:14: io.direct: expected true or false, got 'yes'");
  EXPECT_EQ(Errors("io: {queue_depth: deep}"),
            "t.yaml:1:19: io.queue_depth: expected a whole number such as 32, "
            "50000000 or 5e7, "
            "got 'deep'");
  EXPECT_EQ(Errors("tiers: {nvme: {paths: /mnt/nvme0}}"),
            "t.yaml:1:23: tiers.nvme.paths: expected a list of directories, "
            "got a single value "
            "(write [/mnt/nvme0])");
  EXPECT_EQ(Errors("tiers: {nvme: {paths: [[a]]}}"),
            "t.yaml:1:24: tiers.nvme.paths[0]: expected a directory path, got "
            "a list");
  EXPECT_EQ(Errors("io:\n  sqpoll:\n"),
            "t.yaml:2:3: io.sqpoll: missing value (expected true or false)");
  EXPECT_EQ(Errors("- a\n- b\n"),
            "t.yaml:1:1: a config is a mapping of sections (tiers, io, "
            "coordinator, comm, "
            "integrity, optimizer), got a list");
}

TEST(ConfigErrors, BadEnumValueSuggests) {
  EXPECT_EQ(Errors("io: {backend: io-uring}"),
            "t.yaml:1:15: io.backend: expected one of auto, io_uring, libaio, "
            "psync, got "
            "'io-uring' (did you mean 'io_uring'?)");
  EXPECT_EQ(Errors("comm: {backend: mpi}"),
            "t.yaml:1:17: comm.backend: expected one of auto, nccl, local, gloo, got "
            "'mpi'");
  EXPECT_EQ(Errors("integrity: {checksum: crc32}"),
            "t.yaml:1:23: integrity.checksum: expected one of crc32c, none, "
            "got 'crc32' (did you "
            "mean 'crc32c'?)");
  EXPECT_EQ(Errors("tiers: {params: cpu}"),
            "t.yaml:1:17: tiers.params: expected one of nvme, host, got 'cpu'");
  EXPECT_EQ(Errors("tiers: {gradients: nvm}"),
            "t.yaml:1:20: tiers.gradients: expected one of host, nvme, got 'nvm' (did you "
            "mean 'nvme'?)");
}

TEST(ConfigErrors, OutOfRange) {
  EXPECT_EQ(
      Errors("io:\n  queue_depth: 0\n"),
      "t.yaml:2:16: io.queue_depth: '0' is out of range (allowed: 1 to 4096)");
  EXPECT_EQ(Errors("io: {queue_depth: 5000}"),
            "t.yaml:1:19: io.queue_depth: '5000' is out of range (allowed: 1 "
            "to 4096)");
  EXPECT_EQ(Errors("io: {threads: 65}"),
            "t.yaml:1:15: io.threads: '65' is out of range (allowed: 1 to 64)");
  EXPECT_EQ(Errors("tiers: {nvme: {buffer_count: 0}}"),
            "t.yaml:1:30: tiers.nvme.buffer_count: '0' is out of range "
            "(allowed: 1 to 65536)");
  EXPECT_EQ(Errors("tiers: {nvme: {buffer_size: -1}}"),
            "t.yaml:1:29: tiers.nvme.buffer_size: '-1' is out of range "
            "(allowed: 1 to 1e12)");
  EXPECT_EQ(Errors("tiers: {nvme: {buffer_size: 1.5}}"),
            "t.yaml:1:29: tiers.nvme.buffer_size: '1.5' is not a whole number");
  EXPECT_EQ(Errors("tiers: {nvme: {buffer_element_bytes: 3}}"),
            "t.yaml:1:38: tiers.nvme.buffer_element_bytes: expected 1, 2, 4 or "
            "8, got 3");
  EXPECT_EQ(Errors("tiers: {device: {max_live_parameters: 0}}"),
            "t.yaml:1:39: tiers.device.max_live_parameters: '0' is out of "
            "range (allowed: 1 to "
            "1e15, or inf)");
  EXPECT_EQ(Errors("coordinator: {prefetch_bucket_size: inf}"),
            "t.yaml:1:37: coordinator.prefetch_bucket_size: 'inf' is not "
            "allowed here (allowed: "
            "0 to 1e15)");
  EXPECT_EQ(Errors("coordinator: {max_ongoing_fetch_events: 0}"),
            "t.yaml:1:41: coordinator.max_ongoing_fetch_events: '0' is out of "
            "range (allowed: 1 "
            "to 1024)");
  EXPECT_EQ(Errors("coordinator: {nvme_lookahead: soon}"),
            "t.yaml:1:31: coordinator.nvme_lookahead: expected auto or a whole "
            "number of "
            "elements such as 2e8, got 'soon'");
  EXPECT_EQ(Errors("io: {block_size: 2KiB}"),
            "t.yaml:1:18: io.block_size: '2KiB' is out of range (allowed: 4KiB "
            "to 256MiB)");
  EXPECT_EQ(Errors("io: {block_size: 6KiB}"),
            "t.yaml:1:18: io.block_size: 6KiB is not a multiple of 4KiB "
            "(direct I/O needs 4 "
            "KiB-aligned requests)");
}

TEST(ConfigErrors, BadUnit) {
  EXPECT_EQ(Errors("io:\n  block_size: 1XiB\n"),
            "t.yaml:2:15: io.block_size: unknown unit 'XiB' in '1XiB' (valid "
            "units: B, K or KiB, M or MiB, G or GiB, T or TiB (1024-based), KB, MB, GB, TB (1000-based), in any letter case)");
  EXPECT_EQ(
      Errors("coordinator: {prefetch_bucket_size: 1MiB}"),
      "t.yaml:1:37: coordinator.prefetch_bucket_size: expected a whole number "
      "such as 32, "
      "50000000 or 5e7, got '1MiB' (element counts and counts take no unit)");
}

TEST(ConfigErrors, MissingNvmePathParent) {
  testing::ScratchDir dir;
  std::string missing = dir.File("no_such_drive/ztier");
  EXPECT_EQ(
      Errors("tiers:\n  nvme:\n    paths: [" + missing + "]\n", LoadOptions{}),
      "t.yaml:3:13: tiers.nvme.paths[0]: parent directory '" +
          dir.File("no_such_drive") + "' of NVMe path '" + missing +
          "' does not exist (mount the drive or create the directory)");
  // The same config passes when paths are not checked (another machine's).
  EXPECT_EQ(
      Errors("tiers:\n  nvme:\n    paths: [" + missing + "]\n", NoPaths()), "");
  // The path itself may be missing: the store creates it.
  Config c = MustLoad("tiers: {nvme: {paths: [" + dir.File("new") + "]}}",
                      LoadOptions{});
  EXPECT_EQ(c.tiers.nvme.paths, std::vector<std::string>{dir.File("new")});
}

TEST(ConfigErrors, NvmePathThatIsAFile) {
  testing::ScratchDir dir;
  std::ofstream(dir.File("f")) << "x";
  EXPECT_EQ(
      Errors("tiers: {nvme: {paths: [" + dir.File("f") + "]}}", LoadOptions{}),
      "t.yaml:1:24: tiers.nvme.paths[0]: NVMe path '" + dir.File("f") +
          "' exists and is not a directory");
  EXPECT_EQ(Errors("tiers: {nvme: {paths: [" + dir.File("f/x") + "]}}",
                   LoadOptions{}),
            "t.yaml:1:24: tiers.nvme.paths[0]: parent '" + dir.File("f") +
                "' of NVMe path '" + dir.File("f/x") + "' is not a directory");
}

TEST(ConfigErrors, DefaultPathWithMissingParent) {
  ScopedEnv env("ZTIER_NVME_PATH", "/no/such/parent/ztier");
  EXPECT_EQ(Errors("io: {queue_depth: 8}\n", LoadOptions{}),
            "t.yaml:1:1: tiers.nvme.paths: parent directory '/no/such/parent' "
            "of NVMe path "
            "'/no/such/parent/ztier' does not exist (mount the drive or create "
            "the directory) "
            "(the default path ${ZTIER_NVME_PATH:-ztier_nvme}; set "
            "ZTIER_NVME_PATH or "
            "tiers.nvme.paths)");
}

TEST(ConfigErrors, PathRules) {
  EXPECT_EQ(Errors("tiers:\n  nvme:\n    paths: []\n"),
            "t.yaml:3:12: tiers.nvme.paths: at least one path is needed when "
            "tiers.params is "
            "nvme (for host-only offload write tiers.params: host)");
  EXPECT_EQ(Errors("tiers: {nvme: {paths: [./a, a/, b]}}"),
            "t.yaml:1:29: tiers.nvme.paths[1]: duplicate NVMe path 'a/' (also "
            "paths[0])");
  EXPECT_EQ(
      Errors("tiers: {nvme: {paths: [\"\"]}}"),
      "");  // unchecked: an empty path is only found on the file system check
  EXPECT_EQ(Errors("tiers: {nvme: {paths: [\"\"]}}", LoadOptions{}),
            "t.yaml:1:24: tiers.nvme.paths[0]: empty NVMe path (did an "
            "environment variable "
            "expand to nothing?)");
}

TEST(ConfigErrors, CrossKeyRules) {
  EXPECT_EQ(Errors("io: {backend: psync, sqpoll: true}"),
            "t.yaml:1:30: io.sqpoll: sqpoll needs the io_uring backend "
            "(io.backend is psync)");
  EXPECT_EQ(Errors("io: {backend: io_uring, sqpoll: true}"), "");
  EXPECT_EQ(Errors("io: {sqpoll: true}"), "");  // auto may pick io_uring
}

TEST(ConfigErrors, DuplicateKey) {
  EXPECT_EQ(Errors("io:\n  queue_depth: 8\n  queue_depth: 16\n"),
            "t.yaml:3:3: io.queue_depth: duplicate key (first given at line 2, "
            "column 3)");
}

TEST(ConfigErrors, YamlSyntax) {
  EXPECT_EQ(Errors("io: {queue_depth: 8\ncomm: {}\n"),
            "t.yaml:2:5: YAML syntax error: end of map flow not found");
  EXPECT_EQ(Errors("a: 1\n---\nb: 2\n"),
            "t.yaml:1:1: expected one YAML document, found 2");
}

TEST(ConfigErrors, AllErrorsAreReportedInLineOrder) {
  std::string msg = Errors(
      "io:\n"
      "  queue_depth: 0\n"
      "  block_size: 1XiB\n"
      "tiers:\n"
      "  nvme:\n"
      "    buffer_cont: 5\n"
      "integrity: {checksum: md5}\n");
  EXPECT_EQ(
      msg,
      "t.yaml:2:16: io.queue_depth: '0' is out of range (allowed: 1 to 4096)\n"
      "t.yaml:3:15: io.block_size: unknown unit 'XiB' in '1XiB' (valid units: "
      "B, K or KiB, M or MiB, G or GiB, T or TiB (1024-based), KB, MB, GB, TB (1000-based), in any letter case)\n"
      "t.yaml:6:5: tiers.nvme.buffer_cont: unknown key (did you mean "
      "'buffer_count'?)\n"
      "t.yaml:7:23: integrity.checksum: expected one of crc32c, none, got "
      "'md5'");
}

TEST(ConfigErrors, FileNotFound) {
  Result<Config> r = LoadConfigFile("/no/such/config.yaml");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kNotFound);
  EXPECT_EQ(r.status().message(),
            "cannot open config file '/no/such/config.yaml': No such file or "
            "directory (errno 2)");
}

TEST(ConfigErrors, FileNameIsTheSource) {
  testing::ScratchDir dir;
  std::ofstream(dir.File("c.yaml")) << "io:\n  depth: 1\n";
  Result<Config> r = LoadConfigFile(dir.File("c.yaml"), NoPaths());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().message(),
            dir.File("c.yaml") +
                ":2:3: io.depth: unknown key (valid keys in io: backend, "
                "block_size, queue_depth, threads, register_buffers, "
                "sqpoll, direct)");
}

// ---------------------------------------------------------------------------
// The optimizer section

TEST(ConfigOptimizer, EveryKey) {
  ScopedEnv env("ZTIER_TEST_OPT", "/mnt/opt");
  Config c = MustLoad(
      "optimizer:\n"
      "  tier: host\n"
      "  paths: [\"${ZTIER_TEST_OPT}/a\", /mnt/b]\n"
      "  buffer_count: 64\n"
      "  sub_group_size: 1e10\n"
      "  threads: 1024\n"
      "  isa: avx512\n");
  EXPECT_EQ(c.optimizer.tier, OptimizerTier::kHost);
  EXPECT_EQ(c.optimizer.paths,
            (std::vector<std::string>{"/mnt/opt/a", "/mnt/b"}));
  EXPECT_EQ(c.optimizer.buffer_count, 64u);
  EXPECT_EQ(c.optimizer.sub_group_size, 10'000'000'000u);
  EXPECT_EQ(c.optimizer.threads, 1024u);
  EXPECT_EQ(c.optimizer.isa, OptimizerIsa::kAvx512);
  // The smallest values, and the other names.
  c = MustLoad(
      "optimizer: {tier: nvme, buffer_count: 1, sub_group_size: 1, threads: 0, "
      "isa: scalar}");
  EXPECT_EQ(c.optimizer.tier, OptimizerTier::kNvme);
  EXPECT_EQ(c.optimizer.buffer_count, 1u);
  EXPECT_EQ(c.optimizer.sub_group_size, 1u);
  EXPECT_EQ(c.optimizer.threads, 0u);
  EXPECT_EQ(c.optimizer.isa, OptimizerIsa::kScalar);
  EXPECT_EQ(MustLoad("optimizer: {isa: avx2}").optimizer.isa,
            OptimizerIsa::kAvx2);
  EXPECT_EQ(MustLoad("optimizer: {isa: auto}").optimizer.isa,
            OptimizerIsa::kAuto);
  EXPECT_EQ(MustLoad("optimizer: {sub_group_size: 100_000_000}")
                .optimizer.sub_group_size,
            100'000'000u);
  // An empty section or an empty path list: the defaults.
  EXPECT_EQ(MustLoad("optimizer:\n").optimizer, OptimizerConfig{});
  EXPECT_EQ(MustLoad("optimizer: {paths: []}").optimizer, OptimizerConfig{});
}

TEST(ConfigOptimizer, Errors) {
  EXPECT_EQ(Errors("optimizer:\n  sub_grup_size: 1e8\n"),
            "t.yaml:2:3: optimizer.sub_grup_size: unknown key (did you mean "
            "'sub_group_size'?)");
  EXPECT_EQ(Errors("tiers: {nvme: {sub_group_size: 1e8}}"),
            "t.yaml:1:16: tiers.nvme.sub_group_size: unknown key (did you mean "
            "'optimizer.sub_group_size'?)");
  EXPECT_EQ(Errors("io: {isa: avx2}"),
            "t.yaml:1:6: io.isa: unknown key (did you mean 'optimizer.isa'?)");
  EXPECT_EQ(Errors("optimizer: {lr: 1e-3}"),
            "t.yaml:1:13: optimizer.lr: unknown key (valid keys in "
            "optimizer: tier, paths, buffer_count, sub_group_size, threads, "
            "isa)");
  EXPECT_EQ(Errors("optimizer: {tier: cpu}"),
            "t.yaml:1:19: optimizer.tier: expected one of nvme, host, got "
            "'cpu'");
  EXPECT_EQ(Errors("optimizer: {isa: avx}"),
            "t.yaml:1:18: optimizer.isa: expected one of auto, avx512, avx2, "
            "scalar, got 'avx' (did you mean 'avx2'?)");
  EXPECT_EQ(Errors("optimizer: {buffer_count: 0}"),
            "t.yaml:1:27: optimizer.buffer_count: '0' is out of range "
            "(allowed: 1 to 64)");
  EXPECT_EQ(Errors("optimizer: {buffer_count: 65}"),
            "t.yaml:1:27: optimizer.buffer_count: '65' is out of range "
            "(allowed: 1 to 64)");
  EXPECT_EQ(Errors("optimizer: {sub_group_size: 0}"),
            "t.yaml:1:29: optimizer.sub_group_size: '0' is out of range "
            "(allowed: 1 to 1e10)");
  EXPECT_EQ(Errors("optimizer: {sub_group_size: 2e10}"),
            "t.yaml:1:29: optimizer.sub_group_size: '2e10' is out of range "
            "(allowed: 1 to 1e10)");
  EXPECT_EQ(Errors("optimizer: {sub_group_size: 1GiB}"),
            "t.yaml:1:29: optimizer.sub_group_size: expected a whole number "
            "such as 32, 50000000 or 5e7, got '1GiB' (element counts and "
            "counts take no unit)");
  EXPECT_EQ(Errors("optimizer: {threads: 1025}"),
            "t.yaml:1:22: optimizer.threads: '1025' is out of range (allowed: "
            "0 to 1024)");
  EXPECT_EQ(Errors("optimizer: {threads: -1}"),
            "t.yaml:1:22: optimizer.threads: '-1' is out of range (allowed: "
            "0 to 1024)");
  EXPECT_EQ(Errors("optimizer: 4"),
            "t.yaml:1:12: optimizer: expected a mapping of keys, got a single "
            "value");
  EXPECT_EQ(Errors("optimizer: {paths: /mnt/nvme0}"),
            "t.yaml:1:20: optimizer.paths: expected a list of directories, got "
            "a single value (write [/mnt/nvme0])");
  EXPECT_EQ(Errors("optimizer: {paths: [./a, a/]}"),
            "t.yaml:1:26: optimizer.paths[1]: duplicate NVMe path 'a/' (also "
            "paths[0])");
  ScopedEnv u("ZTIER_TEST_UNSET", std::nullopt);
  EXPECT_EQ(Errors("optimizer: {paths: [\"${ZTIER_TEST_UNSET}/o\"]}"),
            "t.yaml:1:21: optimizer.paths[0]: environment variable "
            "ZTIER_TEST_UNSET is not set (write ${ZTIER_TEST_UNSET:-default} "
            "to give a default)");
  // Errors in the optimizer section are collected with the others.
  EXPECT_EQ(Errors("optimizer:\n  threads: 2000\nio: {queue_depth: 0}\n"),
            "t.yaml:2:12: optimizer.threads: '2000' is out of range (allowed: "
            "0 to 1024)\n"
            "t.yaml:3:19: io.queue_depth: '0' is out of range (allowed: 1 to "
            "4096)");
}

TEST(ConfigOptimizer, PathsAreCheckedLikeTheNvmePaths) {
  testing::ScratchDir dir;
  std::string missing = dir.File("no_such_drive/opt");
  EXPECT_EQ(Errors("optimizer:\n  paths: [" + missing + "]\n", LoadOptions{}),
            "t.yaml:2:11: optimizer.paths[0]: parent directory '" +
                dir.File("no_such_drive") + "' of NVMe path '" + missing +
                "' does not exist (mount the drive or create the directory)");
  EXPECT_EQ(Errors("optimizer:\n  paths: [" + missing + "]\n", NoPaths()), "");
  // Checked even with tier host, as tiers.nvme.paths are with params host.
  EXPECT_NE(Errors("optimizer: {tier: host, paths: [" + missing + "]}",
                   LoadOptions{}),
            "");
  std::ofstream(dir.File("f")) << "x";
  EXPECT_EQ(
      Errors("optimizer: {paths: [" + dir.File("f") + "]}", LoadOptions{}),
      "t.yaml:1:21: optimizer.paths[0]: NVMe path '" + dir.File("f") +
          "' exists and is not a directory");
  // A path that does not exist yet is fine; the same directory as the
  // parameters' is too (the file names differ).
  Config c = MustLoad("tiers: {nvme: {paths: [" + dir.File("p") +
                          "]}}\noptimizer: {paths: [" + dir.File("o") + ", " +
                          dir.File("p") + "]}",
                      LoadOptions{});
  EXPECT_EQ(c.optimizer.paths,
            (std::vector<std::string>{dir.File("o"), dir.File("p")}));
  EXPECT_TRUE(ValidateConfig(c).ok());
}

TEST(ConfigOptimizer, NoPathAtAllIsNotAnErrorAtLoad) {
  // Host params need no NVMe path; an NVMe optimizer without paths is
  // reported only when an optimizer is created.
  Config c = MustLoad("tiers: {params: host}\noptimizer: {tier: nvme}\n",
                      LoadOptions{});
  EXPECT_TRUE(c.tiers.nvme.paths.empty());
  EXPECT_TRUE(c.optimizer.paths.empty());
  EXPECT_TRUE(OptimizerPaths(c).empty());
  EXPECT_TRUE(ValidateConfig(c).ok());
  EXPECT_NE(SummarizeConfig(c).find("optimizer    state on NVMe, no path"),
            std::string::npos)
      << SummarizeConfig(c);
}

TEST(ConfigOptimizer, OptimizerPathsFallBackToTheNvmePaths) {
  Config c;
  EXPECT_TRUE(OptimizerPaths(c).empty());
  c.tiers.nvme.paths = {"/nvme0", "/nvme1"};
  EXPECT_EQ(OptimizerPaths(c), (std::vector<std::string>{"/nvme0", "/nvme1"}));
  c.optimizer.paths = {"/nvme2"};
  EXPECT_EQ(OptimizerPaths(c), std::vector<std::string>{"/nvme2"});
  // The loader does the same with the default NVMe path.
  ScopedEnv env("ZTIER_NVME_PATH", std::nullopt);
  EXPECT_EQ(OptimizerPaths(MustLoad("")),
            std::vector<std::string>{"ztier_nvme"});
}

TEST(ConfigOptimizer, Names) {
  EXPECT_EQ(OptimizerTierName(OptimizerTier::kNvme), "nvme");
  EXPECT_EQ(OptimizerTierName(OptimizerTier::kHost), "host");
  EXPECT_EQ(OptimizerIsaName(OptimizerIsa::kAuto), "auto");
  EXPECT_EQ(OptimizerIsaName(OptimizerIsa::kAvx512), "avx512");
  EXPECT_EQ(OptimizerIsaName(OptimizerIsa::kAvx2), "avx2");
  EXPECT_EQ(OptimizerIsaName(OptimizerIsa::kScalar), "scalar");
}

// ---------------------------------------------------------------------------
// Environment expansion

TEST(ConfigEnv, Expansion) {
  ScopedEnv a("ZTIER_TEST_A", "/mnt/a");
  ScopedEnv e("ZTIER_TEST_EMPTY", "");
  ScopedEnv u("ZTIER_TEST_UNSET", std::nullopt);
  auto x = [](const char* s) {
    Result<std::string> r = ExpandEnv(s);
    return r.ok() ? *r : "ERROR: " + std::string(r.status().message());
  };
  EXPECT_EQ(x("${ZTIER_TEST_A}/z"), "/mnt/a/z");
  EXPECT_EQ(x("${ZTIER_TEST_A:-/d}"), "/mnt/a");
  EXPECT_EQ(x("${ZTIER_TEST_UNSET:-/d}"), "/d");
  EXPECT_EQ(x("${ZTIER_TEST_EMPTY:-/d}"), "/d");
  EXPECT_EQ(x("${ZTIER_TEST_EMPTY}"), "");
  EXPECT_EQ(x("${ZTIER_TEST_UNSET:-}"), "");
  EXPECT_EQ(x("cost$5 $$HOME $"), "cost$5 $HOME $");
  EXPECT_EQ(x("${ZTIER_TEST_UNSET}"),
            "ERROR: environment variable ZTIER_TEST_UNSET is not set (write "
            "${ZTIER_TEST_UNSET:-default} to give a default)");
  EXPECT_EQ(x("${ZTIER_TEST_A"),
            "ERROR: unterminated '${' in '${ZTIER_TEST_A' (write ${VAR} or "
            "${VAR:-default}; $$ "
            "for a literal $)");
  EXPECT_EQ(x("${1X}"), "ERROR: bad environment variable name '1X' in '${1X}'");
}

TEST(ConfigEnv, InValues) {
  ScopedEnv a("ZTIER_TEST_DIR", "/mnt/fast");
  ScopedEnv q("ZTIER_TEST_QD", "64");
  ScopedEnv u("ZTIER_TEST_UNSET", std::nullopt);
  Config c = MustLoad(
      "tiers: {nvme: {paths: [\"${ZTIER_TEST_DIR}/z\", "
      "\"${ZTIER_TEST_UNSET:-/mnt/slow}/z\"]}}\n"
      "io: {queue_depth: \"${ZTIER_TEST_QD:-32}\"}\n");
  EXPECT_EQ(c.tiers.nvme.paths,
            (std::vector<std::string>{"/mnt/fast/z", "/mnt/slow/z"}));
  EXPECT_EQ(c.io.queue_depth, 64u);
  EXPECT_EQ(Errors("tiers: {nvme: {paths: [\"${ZTIER_TEST_UNSET}/z\"]}}"),
            "t.yaml:1:24: tiers.nvme.paths[0]: environment variable "
            "ZTIER_TEST_UNSET is not set "
            "(write ${ZTIER_TEST_UNSET:-default} to give a default)");
}

// ---------------------------------------------------------------------------
// Round trip, validation, summary

// The largest sub-group the loader takes.
constexpr uint64_t kSubGroupMax = 10'000'000'000ULL;

Config NonDefault() {
  Config c;
  c.tiers.params = ParamTier::kNvme;
  c.tiers.device.max_live_parameters = kInfinite;
  c.tiers.host.pin_memory = false;
  c.tiers.host.max_in_cpu = 0;
  c.tiers.host.allow_unpinned = true;
  c.tiers.nvme.paths = {"/mnt/nvme0/z", "rel/dir", "/with space/and$dollar",
                        "/x/${NOT_A_VAR}"};
  c.tiers.nvme.buffer_count = 7;
  c.tiers.nvme.buffer_size = 123'456'789;
  c.tiers.nvme.buffer_element_bytes = 4;
  c.io.backend = io::BackendKind::kIoUring;
  c.io.block_size = 12 * 4096;
  c.io.queue_depth = 100;
  c.io.threads = 3;
  c.io.register_buffers = false;
  c.io.sqpoll = true;
  c.io.direct = false;
  c.coordinator.prefetch_bucket_size = 0;
  c.coordinator.max_reuse_distance = kInfinite;
  c.coordinator.param_persistence_threshold = 1'500'000;
  c.coordinator.model_persistence_threshold = 1'000'000'000'000;
  c.coordinator.max_ongoing_fetch_events = 9;
  c.coordinator.nvme_lookahead = 0;
  c.comm.backend = CommBackend::kLocal;
  c.integrity.checksum = Checksum::kNone;
  c.optimizer.tier = OptimizerTier::kNvme;
  c.optimizer.paths = {"/mnt/nvme1/opt", "/opt/$x"};
  c.optimizer.buffer_count = 2;
  c.optimizer.sub_group_size = 12'345'678;
  c.optimizer.threads = 17;
  c.optimizer.isa = OptimizerIsa::kAvx2;
  return c;
}

TEST(ConfigRoundTrip, ToYamlAndBack) {
  for (const Config& c : {Config{}, NonDefault()}) {
    Config in = c;
    if (in.tiers.nvme.paths.empty()) in.tiers.nvme.paths = {"/d"};
    std::string yaml = ConfigToYaml(in);
    Result<Config> back = LoadConfigText(yaml, "roundtrip.yaml", NoPaths());
    ASSERT_TRUE(back.ok()) << back.status().ToString() << "\n" << yaml;
    EXPECT_EQ(*back, in) << yaml;
  }
  Config host;
  host.tiers.params = ParamTier::kHost;
  host.optimizer.tier = OptimizerTier::kHost;
  host.optimizer.isa = OptimizerIsa::kScalar;
  host.optimizer.sub_group_size = kSubGroupMax;
  Result<Config> back = LoadConfigText(ConfigToYaml(host), "h.yaml", NoPaths());
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(*back, host);
  // Every key of the section is written.
  std::string yaml = ConfigToYaml(NonDefault());
  for (const char* key :
       {"optimizer:", "  tier: nvme", "  paths:", "  buffer_count: 2",
        "  sub_group_size: 12345678", "  threads: 17", "  isa: avx2"}) {
    EXPECT_NE(yaml.find(key), std::string::npos) << key << "\n" << yaml;
  }
  // Empty optimizer paths are left out (they mean tiers.nvme.paths).
  EXPECT_EQ(ConfigToYaml(Config{}).find("optimizer:\n  tier: nvme"),
            ConfigToYaml(Config{}).find("optimizer:"));
  EXPECT_EQ(ConfigToYaml(Config{}).find("  paths:"), std::string::npos);
}

TEST(ConfigValidate, OptimizerSection) {
  Config c;
  c.tiers.nvme.paths = {"/d"};
  c.optimizer.buffer_count = 0;
  c.optimizer.sub_group_size = kSubGroupMax + 1;
  c.optimizer.threads = 1025;
  c.optimizer.paths = {"/o", "/o/"};
  c.optimizer.isa = static_cast<OptimizerIsa>(9);
  c.optimizer.tier = static_cast<OptimizerTier>(7);
  Status s = ValidateConfig(c, NoPaths());
  EXPECT_EQ(s.message(),
            "optimizer.tier: not a valid tier\n"
            "optimizer.paths[1]: duplicate NVMe path '/o/' (also paths[0])\n"
            "optimizer.buffer_count: '0' is out of range (allowed: 1 to 64)\n"
            "optimizer.sub_group_size: '10000000001' is out of range "
            "(allowed: 1 to 1e10)\n"
            "optimizer.threads: '1025' is out of range (allowed: 0 to 1024)\n"
            "optimizer.isa: not a valid instruction set");
  // With paths checked, a missing parent is named like the loader does.
  Config p;
  p.tiers.params = ParamTier::kHost;
  p.optimizer.paths = {"/no/such/parent/opt"};
  EXPECT_EQ(ValidateConfig(p).message(),
            "optimizer.paths[0]: parent directory '/no/such/parent' of NVMe "
            "path '/no/such/parent/opt' does not exist (mount the drive or "
            "create the directory)");
  EXPECT_TRUE(ValidateConfig(p, NoPaths()).ok());
}

TEST(ConfigValidate, CodeBuiltConfigs) {
  EXPECT_TRUE(ValidateConfig(NonDefault(), NoPaths()).ok());
  Config c;
  c.io.queue_depth = 0;
  c.io.block_size = 5000;
  c.tiers.nvme.buffer_element_bytes = 3;
  Status s = ValidateConfig(c, NoPaths());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(),
            "tiers.nvme.buffer_element_bytes: expected 1, 2, 4 or 8, got 3\n"
            "io.block_size: 5000 is not a multiple of 4KiB (direct I/O needs 4 "
            "KiB-aligned "
            "requests)\n"
            "io.queue_depth: '0' is out of range (allowed: 1 to 4096)\n"
            "tiers.nvme.paths: at least one path is needed when tiers.params "
            "is nvme (for "
            "host-only offload write tiers.params: host)");
}

TEST(ConfigSummary, FitsOneScreenAndNamesTheEssentials) {
  Config c = NonDefault();
  std::string s = SummarizeConfig(c);
  EXPECT_LE(std::count(s.begin(), s.end(), '\n'), 24);
  EXPECT_NE(s.find("4 paths (striped)"), std::string::npos) << s;
  EXPECT_NE(s.find("/mnt/nvme0/z"), std::string::npos) << s;
  EXPECT_NE(s.find("7 x 123456789 elements x 4 B = 3.2 GiB"), std::string::npos)
      << s;
  EXPECT_NE(s.find("backend io_uring"), std::string::npos) << s;
  EXPECT_NE(s.find("queue depth 100"), std::string::npos) << s;
  EXPECT_NE(s.find("optimizer    state on NVMe, 2 paths\n"
                   "               /mnt/nvme1/opt\n"),
            std::string::npos)
      << s;
  // 2 x (12345678 x 12 B + 4 KiB) = 282.6 MiB.
  EXPECT_NE(s.find("buffers 2 x 12345678 elements x 12 B = 282.6 MiB "
                   "pageable"),
            std::string::npos)
      << s;
  EXPECT_NE(s.find("threads 17, isa avx2"), std::string::npos) << s;
  Config host;
  host.tiers.params = ParamTier::kHost;
  host.optimizer.tier = OptimizerTier::kHost;
  std::string h = SummarizeConfig(host);
  EXPECT_NE(h.find("on the host (no NVMe)"), std::string::npos);
  EXPECT_NE(h.find("optimizer    state in host memory (no NVMe)"),
            std::string::npos)
      << h;
  // The host tier runs the same buffered pipeline (on a memory file system).
  EXPECT_NE(h.find("buffers 4 x 1e8 elements x 12 B = 4.5 GiB pageable"),
            std::string::npos)
      << h;
  EXPECT_NE(h.find("threads all cores, isa auto"), std::string::npos) << h;
  // Default: the parameters' drives, 4 x (1e8 x 12 B + 4 KiB) = 4.5 GiB.
  Config d;
  d.tiers.nvme.paths = {"/d"};
  std::string ds = SummarizeConfig(d);
  EXPECT_NE(ds.find("optimizer    state on NVMe, on the tiers.nvme paths"),
            std::string::npos)
      << ds;
  EXPECT_NE(ds.find("buffers 4 x 1e8 elements x 12 B = 4.5 GiB pageable"),
            std::string::npos)
      << ds;
}

TEST(ConfigSuggest, EditDistance) {
  EXPECT_EQ(EditDistance("", ""), 0u);
  EXPECT_EQ(EditDistance("abc", ""), 3u);
  EXPECT_EQ(EditDistance("buffer_cont", "buffer_count"), 1u);
  EXPECT_EQ(EditDistance("kitten", "sitting"), 3u);
}

// ---------------------------------------------------------------------------
// The shipped configs

// Engine configs under configs/ (configs/models/ holds model shapes, another
// schema).
std::vector<fs::path> ShippedConfigs() {
  std::vector<fs::path> files;
  for (const auto& e : fs::recursive_directory_iterator(
           fs::path(ZTIER_SOURCE_DIR) / "configs")) {
    if (e.is_regular_file() &&
        (e.path().extension() == ".yaml" || e.path().extension() == ".yml") &&
        e.path().parent_path().filename() != "models") {
      files.push_back(e.path());
    }
  }
  std::sort(files.begin(), files.end());
  return files;
}

TEST(ShippedConfigs, EveryYamlUnderConfigsLoads) {
  std::vector<fs::path> files = ShippedConfigs();
  ASSERT_GE(files.size(), 4u);
  for (const fs::path& f : files) {
    Result<Config> r = LoadConfigFile(f.string(), NoPaths());
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    if (r.ok()) {
      EXPECT_TRUE(ValidateConfig(*r, NoPaths()).ok()) << f;
    }
  }
}

TEST(ShippedConfigs, DefaultYamlIsTheBuiltInDefaultsAndRunsAnywhere) {
  testing::ScratchDir dir;
  ScopedEnv env("ZTIER_NVME_PATH", dir.File("nvme"));
  Result<Config> r = LoadConfigFile(
      std::string(ZTIER_SOURCE_DIR) + "/configs/default.yaml", LoadOptions{});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  Config expected;
  expected.tiers.nvme.paths = {dir.File("nvme")};
  EXPECT_EQ(*r, expected);
  // Without the variable: ./ztier_nvme under the working directory.
  ScopedEnv unset("ZTIER_NVME_PATH", std::nullopt);
  r = LoadConfigFile(std::string(ZTIER_SOURCE_DIR) + "/configs/default.yaml",
                     LoadOptions{});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->tiers.nvme.paths, std::vector<std::string>{"ztier_nvme"});
}

TEST(ShippedConfigs, Examples) {
  const std::string ex = std::string(ZTIER_SOURCE_DIR) + "/configs/examples/";
  Result<Config> host = LoadConfigFile(ex + "host_only.yaml", LoadOptions{});
  ASSERT_TRUE(host.ok()) << host.status().ToString();
  EXPECT_EQ(host->tiers.params, ParamTier::kHost);
  EXPECT_TRUE(host->tiers.nvme.paths.empty());

  Result<Config> four =
      LoadConfigFile(ex + "four_nvme_striped.yaml", NoPaths());
  ASSERT_TRUE(four.ok()) << four.status().ToString();
  EXPECT_EQ(four->tiers.nvme.paths.size(), 4u);

  ScopedEnv unset("ZTIER_NVME_PATH", std::nullopt);
  Result<Config> one = LoadConfigFile(ex + "one_nvme.yaml", NoPaths());
  ASSERT_TRUE(one.ok()) << one.status().ToString();
  EXPECT_EQ(one->tiers.nvme.paths,
            std::vector<std::string>{"/mnt/nvme0/ztier"});
}
}  // namespace
}  // namespace ztier::tiering
