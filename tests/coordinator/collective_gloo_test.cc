// The "gloo" collective backend with ranks as separate processes (fork),
// connected through a file store in a fresh directory: results bit-identical
// to the local backend's arithmetic for every dtype and for exchanges of
// many chunks; a rank killed with SIGKILL, or stopped, named by every other
// rank within the timeout; ranks that disagree reported on every rank; a
// rank that never comes fails the connect. Skipped with the reason where
// ztier was built without gloo.
#include "coordinator/collective.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "coordinator/collective_internal.h"
#include "tests/testutil/testutil.h"
#include "tiering/device.h"

namespace ztier::coordinator {
namespace {

using tiering::DeviceBackend;
using tiering::StreamHandle;
using Clock = std::chrono::steady_clock;

// One rank's body: returns "" when every check held, else what failed.
using RankFn = std::function<std::string(uint32_t rank, const std::string& store)>;

struct Outcome {
  int status = 0;  // from waitpid
};

// Forks `world` processes running fn(rank, store_dir) and waits for them, at
// most `limit` (then kills them: a hang is a failure, not a stuck test).
// `hung`: a rank expected never to end (stopped); killed once the others have.
std::vector<Outcome> RunProcesses(uint32_t world, const RankFn& fn,
                                  std::chrono::seconds limit = std::chrono::seconds(90),
                                  int hung = -1) {
  testing::ScratchDir dir;
  std::vector<pid_t> pids;
  for (uint32_t r = 0; r < world; ++r) {
    const pid_t pid = fork();
    if (pid == 0) {
      const std::string error = fn(r, dir.path());
      if (!error.empty()) std::fprintf(stderr, "rank %u: %s\n", r, error.c_str());
      std::fflush(stderr);
      _exit(error.empty() ? 0 : 1);
    }
    pids.push_back(pid);
  }
  std::vector<Outcome> out(world);
  std::vector<bool> done(world, false);
  const auto deadline = Clock::now() + limit;
  uint32_t left = world;
  while (left > 0) {
    for (uint32_t r = 0; r < world; ++r) {
      if (done[r]) continue;
      int status = 0;
      if (waitpid(pids[r], &status, WNOHANG) == pids[r]) {
        out[r].status = status;
        done[r] = true;
        --left;
      }
    }
    if (hung >= 0 && left == 1 && !done[hung]) {
      kill(pids[hung], SIGKILL);
      waitpid(pids[hung], &out[hung].status, 0);
      done[hung] = true;
      --left;
    }
    if (left > 0 && Clock::now() > deadline) {
      ADD_FAILURE() << "ranks still running after " << limit.count() << " s: killed";
      for (uint32_t r = 0; r < world; ++r) {
        if (!done[r]) {
          kill(pids[r], SIGKILL);
          waitpid(pids[r], &out[r].status, 0);
          done[r] = true;
        }
      }
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return out;
}

std::string Describe(const Outcome& o) {
  if (WIFEXITED(o.status)) return "exit status " + std::to_string(WEXITSTATUS(o.status));
  if (WIFSIGNALED(o.status)) return "killed by signal " + std::to_string(WTERMSIG(o.status));
  return "status " + std::to_string(o.status);
}

bool ExitedOk(const Outcome& o) { return WIFEXITED(o.status) && WEXITSTATUS(o.status) == 0; }

GlooOptions Options(uint32_t rank, uint32_t world, const std::string& store,
                    std::chrono::milliseconds timeout = std::chrono::seconds(30)) {
  GlooOptions o;
  o.rank = rank;
  o.world_size = world;
  o.store_path = store;
  o.timeout = timeout;
  o.interface = "lo";
  return o;
}

// Rank r's input byte i for test `seed`: every process can compute every
// rank's input, so each checks its results against its own reference.
uint8_t InputByte(uint32_t seed, uint32_t rank, uint64_t i) {
  uint64_t x = (uint64_t{seed} << 40) ^ (uint64_t{rank} << 32) ^ i;
  x ^= x >> 17;
  x *= 0x9E3779B97F4A7C15ULL;
  return static_cast<uint8_t>(x >> 56);
}

// Finite values of `dtype` (a random bit pattern may be NaN, and NaN != NaN
// would make a bit-exact comparison meaningless).
void FillFinite(DType dtype, uint32_t seed, uint32_t rank, uint8_t* p, uint64_t elems) {
  for (uint64_t i = 0; i < elems; ++i) {
    const uint8_t b = InputByte(seed, rank, i);
    if (dtype == DType::kFloat32) {
      const float v = static_cast<float>(b) / 16.0f - 8.0f;
      std::memcpy(p + i * 4, &v, 4);
    } else {
      // A fixed sign and exponent, the byte as mantissa bits: 1 <= v < 2 in
      // float16 and bfloat16 alike.
      const uint16_t bits = b | (dtype == DType::kFloat16 ? 0x3C00 : 0x3F80);
      std::memcpy(p + i * 2, &bits, 2);
    }
  }
}

std::string Error(const Status& s) { return s.ok() ? "" : s.ToString(); }

// Waits for everything enqueued on `stream`.
Status Drain(DeviceBackend& d, StreamHandle stream) { return d.StreamSynchronize(stream); }

std::string CheckExchanges(uint32_t rank, uint32_t world, const std::string& store) {
  auto device = tiering::CreateHostDeviceBackend({});
  if (!device.ok()) return Error(device.status());
  DeviceBackend& d = **device;
  auto coll = CreateGlooCollective(Options(rank, world, store), &d);
  if (!coll.ok()) return Error(coll.status());
  Collective& c = **coll;
  if (c.name() != "gloo" || c.rank() != rank || c.world_size() != world) return "identity";
  auto stream = d.CreateStream();
  if (!stream.ok()) return Error(stream.status());

  // AllGather: 0 bytes, odd bytes, in place, and 3 MiB.
  uint32_t seed = 1;
  for (uint64_t bytes : {uint64_t{0}, uint64_t{1}, uint64_t{4097}, uint64_t{3} << 20}) {
    for (bool in_place : {false, true}) {
      ++seed;
      std::vector<uint8_t> part(bytes), full(world * bytes + 1, 0xEE);
      for (uint64_t i = 0; i < bytes; ++i) part[i] = InputByte(seed, rank, i);
      const uint8_t* src = part.data();
      if (in_place) {
        if (bytes != 0) std::memcpy(full.data() + rank * bytes, part.data(), bytes);
        src = full.data() + rank * bytes;
      }
      Status s = c.AllGather(src, full.data(), bytes, *stream);
      if (s.ok()) s = Drain(d, *stream);
      if (!s.ok()) return Error(s);
      for (uint32_t r = 0; r < world; ++r) {
        for (uint64_t i = 0; i < bytes; ++i) {
          if (full[r * bytes + i] != InputByte(seed, r, i)) {
            return "AllGather of " + std::to_string(bytes) + " bytes: rank " +
                   std::to_string(r) + " byte " + std::to_string(i) + " differs";
          }
        }
      }
      if (full[world * bytes] != 0xEE) return "AllGather wrote past the full buffer";
    }
  }

  // ReduceScatterMean in every dtype; 1.5e6 elements span several chunks.
  for (DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (uint64_t elems : {uint64_t{0}, uint64_t{3}, uint64_t{1'500'001}}) {
      ++seed;
      const uint64_t es = DTypeBytes(dtype);
      std::vector<std::vector<uint8_t>> fulls(world, std::vector<uint8_t>(world * elems * es));
      for (uint32_t r = 0; r < world; ++r) FillFinite(dtype, seed, r, fulls[r].data(), world * elems);
      std::vector<uint8_t> part(elems * es + 1, 0xEE);
      Status s = c.ReduceScatterMean(fulls[rank].data(), part.data(), elems, dtype, *stream);
      if (s.ok()) s = Drain(d, *stream);
      if (!s.ok()) return Error(s);
      // The local backend's arithmetic on the same inputs.
      std::vector<const uint8_t*> srcs(world);
      for (uint32_t r = 0; r < world; ++r) srcs[r] = fulls[r].data() + rank * elems * es;
      std::vector<uint8_t> want(elems * es);
      MeanOfRanks(dtype, srcs, want.data(), elems);
      if (!want.empty() && std::memcmp(want.data(), part.data(), want.size()) != 0) {
        return "ReduceScatterMean " + std::string(DTypeName(dtype)) + " of " +
               std::to_string(elems) + " elements differs from the reference";
      }
      if (part[elems * es] != 0xEE) return "ReduceScatterMean wrote past the part";
    }
  }

  // AllGatherHost after queued stream collectives: it waits its turn.
  std::vector<uint8_t> part(1000, static_cast<uint8_t>(rank)), full(world * 1000);
  for (int k = 0; k < 5; ++k) {
    if (Status s = c.AllGather(part.data(), full.data(), 1000, *stream); !s.ok()) return Error(s);
  }
  auto values = c.AllGatherHost(100 + rank);
  if (!values.ok()) return Error(values.status());
  for (uint32_t r = 0; r < world; ++r) {
    if ((*values)[r] != 100 + r) return "AllGatherHost values out of rank order";
  }
  if (Status s = Drain(d, *stream); !s.ok()) return Error(s);
  (void)d.DestroyStream(*stream);
  return "";
}

#define SKIP_WITHOUT_GLOO()                                   \
  do {                                                        \
    std::string _why;                                         \
    if (!GlooAvailable(&_why)) GTEST_SKIP() << _why;          \
  } while (0)

class GlooCollectiveTest : public ::testing::TestWithParam<uint32_t> {};

TEST_P(GlooCollectiveTest, ExchangesMatchTheReference) {
  SKIP_WITHOUT_GLOO();
  const uint32_t world = GetParam();
  // A generous limit: under a sanitizer the checks run ~50x slower.
  auto out = RunProcesses(
      world,
      [world](uint32_t rank, const std::string& store) {
        return CheckExchanges(rank, world, store);
      },
      std::chrono::seconds(400));
  for (uint32_t r = 0; r < world; ++r) EXPECT_TRUE(ExitedOk(out[r])) << "rank " << r << ": " << Describe(out[r]);
}

INSTANTIATE_TEST_SUITE_P(Worlds, GlooCollectiveTest, ::testing::Values(2u, 3u, 4u));

// Every surviving rank's error after rank `victim` stops answering, and how
// long it took to come.
std::string ExpectLost(uint32_t rank, uint32_t world, uint32_t victim, int signal_no,
                       const std::string& store, std::chrono::seconds timeout) {
  auto device = tiering::CreateHostDeviceBackend({});
  if (!device.ok()) return Error(device.status());
  auto coll = CreateGlooCollective(Options(rank, world, store, timeout), device->get());
  if (!coll.ok()) return Error(coll.status());
  auto stream = (*device)->CreateStream();
  if (!stream.ok()) return Error(stream.status());
  std::vector<uint8_t> part(4096, 1), full(world * 4096);
  // One good exchange first: everyone is connected and working.
  if (auto v = (*coll)->AllGatherHost(rank); !v.ok()) return Error(v.status());
  if (rank == victim) raise(signal_no);  // SIGKILL: gone; SIGSTOP: hung
  const auto start = Clock::now();
  Status s = (*coll)->AllGather(part.data(), full.data(), 4096, *stream);
  if (s.ok()) s = (*device)->StreamSynchronize(*stream);
  // The failure surfaces at the next call on this rank's group.
  auto v = (*coll)->AllGatherHost(0);
  const double took = std::chrono::duration<double>(Clock::now() - start).count();
  if (v.ok()) return "the collective succeeded with rank " + std::to_string(victim) + " gone";
  const std::string msg = v.status().ToString();
  const std::string named = "lost rank " + std::to_string(victim);
  if (msg.find(named) == std::string::npos && msg.find("rank " + std::to_string(victim)) == std::string::npos) {
    return "the error does not name rank " + std::to_string(victim) + ": " + msg;
  }
  if (took > timeout.count() + 5.0) {
    return "the error took " + std::to_string(took) + " s (timeout " +
           std::to_string(timeout.count()) + " s): " + msg;
  }
  std::fprintf(stderr, "rank %u, after %.2f s: %s\n", rank, took, msg.c_str());
  (void)(*device)->DestroyStream(*stream);
  return "";
}

TEST(GlooCollectiveFailure, KilledRankIsNamedByEveryOtherAtOnce) {
  SKIP_WITHOUT_GLOO();
  constexpr uint32_t kWorld = 4, kVictim = 2;
  auto out = RunProcesses(kWorld, [](uint32_t rank, const std::string& store) {
    return ExpectLost(rank, kWorld, kVictim, SIGKILL, store, std::chrono::seconds(30));
  });
  for (uint32_t r = 0; r < kWorld; ++r) {
    if (r == kVictim) {
      EXPECT_TRUE(WIFSIGNALED(out[r].status) && WTERMSIG(out[r].status) == SIGKILL);
    } else {
      EXPECT_TRUE(ExitedOk(out[r])) << "rank " << r << ": " << Describe(out[r]);
    }
  }
}

TEST(GlooCollectiveFailure, StoppedRankIsNamedAfterTheTimeout) {
  SKIP_WITHOUT_GLOO();
  constexpr uint32_t kWorld = 3, kVictim = 1;
  // The stopped rank never exits by itself: the harness kills it at its limit.
  auto out = RunProcesses(
      kWorld,
      [](uint32_t rank, const std::string& store) {
        return ExpectLost(rank, kWorld, kVictim, SIGSTOP, store, std::chrono::seconds(2));
      },
      std::chrono::seconds(30), static_cast<int>(kVictim));
  for (uint32_t r = 0; r < kWorld; ++r) {
    if (r != kVictim) {
      EXPECT_TRUE(ExitedOk(out[r])) << "rank " << r << ": " << Describe(out[r]);
    }
  }
}

TEST(GlooCollectiveFailure, DisagreementIsReportedOnEveryRank) {
  SKIP_WITHOUT_GLOO();
  constexpr uint32_t kWorld = 3;
  auto out = RunProcesses(kWorld, [](uint32_t rank, const std::string& store) -> std::string {
    auto device = tiering::CreateHostDeviceBackend({});
    if (!device.ok()) return Error(device.status());
    auto coll = CreateGlooCollective(Options(rank, kWorld, store), device->get());
    if (!coll.ok()) return Error(coll.status());
    auto stream = (*device)->CreateStream();
    if (!stream.ok()) return Error(stream.status());
    // Rank 1 gathers a different size (as after a different module order).
    const uint64_t bytes = rank == 1 ? 512 : 1024;
    std::vector<uint8_t> part(bytes), full(kWorld * bytes);
    Status s = (*coll)->AllGather(part.data(), full.data(), bytes, *stream);
    if (s.ok()) s = (*device)->StreamSynchronize(*stream);
    auto v = (*coll)->AllGatherHost(0);
    if (v.ok()) return "the mismatch was not reported";
    const std::string msg = v.status().ToString();
    // Rank 1 is the one that differs; the others may also see a rank that
    // closed its connections after finding the mismatch.
    if (msg.find("disagree") == std::string::npos && msg.find("lost rank") == std::string::npos) {
      return "unexpected error: " + msg;
    }
    std::fprintf(stderr, "rank %u: %s\n", rank, msg.c_str());
    (void)(*device)->DestroyStream(*stream);
    return "";
  });
  for (uint32_t r = 0; r < kWorld; ++r) EXPECT_TRUE(ExitedOk(out[r])) << "rank " << r << ": " << Describe(out[r]);
}

TEST(GlooCollectiveFailure, MissingRankFailsTheConnect) {
  SKIP_WITHOUT_GLOO();
  testing::ScratchDir dir;
  auto device = tiering::CreateHostDeviceBackend({});
  ASSERT_TRUE(device.ok());
  const auto start = Clock::now();
  auto coll = CreateGlooCollective(Options(0, 2, dir.path(), std::chrono::seconds(1)),
                                   device->get());
  const double took = std::chrono::duration<double>(Clock::now() - start).count();
  ASSERT_FALSE(coll.ok());
  EXPECT_NE(coll.status().message().find("could not connect"), std::string::npos)
      << coll.status().ToString();
  EXPECT_LT(took, 15.0);
}

TEST(GlooCollectiveOptions, RejectsWhatItCannotUse) {
  SKIP_WITHOUT_GLOO();
  auto device = tiering::CreateHostDeviceBackend({});
  ASSERT_TRUE(device.ok());
  GlooOptions o = Options(0, 2, "");
  auto none = CreateGlooCollective(o, device->get());
  ASSERT_FALSE(none.ok());
  EXPECT_NE(none.status().message().find("exactly one store"), std::string::npos);
  o = Options(2, 2, "/tmp");
  auto range = CreateGlooCollective(o, device->get());
  ASSERT_FALSE(range.ok());
  EXPECT_NE(range.status().message().find("out of range"), std::string::npos);
  o = Options(0, 2, "/tmp");
  auto no_device = CreateGlooCollective(o, nullptr);
  ASSERT_FALSE(no_device.ok());
  EXPECT_NE(no_device.status().message().find("host-emulation"), std::string::npos);
}

}  // namespace
}  // namespace ztier::coordinator
