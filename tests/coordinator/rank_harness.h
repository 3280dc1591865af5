// A test rank: everything one rank of ztier needs, on the host-emulation
// device, with its parameters on NVMe under a scratch directory. World sizes
// above 1 run one Rank per thread over a LocalGroup.
#pragma once

#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "coordinator/coordinator.h"
#include "io/fault_backend.h"
#include "tests/testutil/faulty_engine.h"
#include "tests/testutil/testutil.h"

namespace ztier::coordinator::testing {

struct RankConfig {
  bool cuda = false;  // the CUDA device backend instead of the host emulation
  uint32_t buffer_count = 4;
  uint64_t buffer_bytes = 256 * 1024;
  uint64_t pack_threshold_bytes = 16 * 1024;
  CoordinatorOptions options;
  std::vector<io::Fault> faults;
};

struct Rank {
  std::unique_ptr<tiering::DeviceBackend> device;
  std::unique_ptr<Collective> collective;
  std::unique_ptr<tiering::PinnedPool> pool;
  std::unique_ptr<io::AsyncEngine> engine;
  io::FaultInjectingBackend* fault = nullptr;
  std::unique_ptr<swapper::ParamSwapper> swapper;
  VectorSink events;
  std::unique_ptr<Coordinator> coordinator;

  ~Rank() {
    coordinator.reset();
    swapper.reset();
    engine.reset();
    pool.reset();
    collective.reset();
    device.reset();
  }
};

// Builds rank `rank` of `world` (group may be null for world 1). The swap
// files go to `dir`.
inline std::unique_ptr<Rank> MakeRank(const std::string& dir, uint32_t rank, uint32_t world,
                                      LocalGroup* group, const RankConfig& cfg) {
  auto r = std::make_unique<Rank>();
  if (cfg.cuda) {
    auto d = tiering::CreateCudaDeviceBackend(0);
    EXPECT_TRUE(d.ok()) << d.status().ToString();
    r->device = std::move(d).value();
  } else {
    r->device = tiering::CreateHostDeviceBackend().value();
  }
  if (world == 1) {
    r->collective = CreateSelfCollective(r->device.get());
  } else {
    auto c = group->Join(rank, r->device.get());
    EXPECT_TRUE(c.ok()) << c.status().ToString();
    r->collective = std::move(c).value();
  }
  tiering::PoolOptions po;
  po.buffer_count = cfg.buffer_count;
  po.buffer_bytes = cfg.buffer_bytes;
  // Pinned through cudaHostRegister on a GPU; plain memory for the emulation
  // (no memlock needed on small test machines).
  po.pin = cfg.cuda ? tiering::PinMode::kAuto : tiering::PinMode::kNone;
  r->pool = tiering::PinnedPool::Create(po, r->device.get()).value();
  r->engine = ztier::testing::MakeFaultyAsyncEngine(
      io::BackendKind::kAuto, cfg.faults,
      io::EngineOptions{.block_size = 128 * 1024, .queue_depth = 16}, &r->fault);
  swapper::SwapperOptions so;
  so.store.paths = {dir};
  so.store.rank = rank;
  so.store.world_size = world;
  so.store.stripe_bytes = 128 * 1024;
  so.pack_threshold_bytes = cfg.pack_threshold_bytes;
  r->swapper = swapper::ParamSwapper::Create(so, r->pool.get(), r->engine.get()).value();
  CoordinatorDeps deps;
  deps.device = r->device.get();
  deps.collective = r->collective.get();
  deps.swapper = r->swapper.get();
  deps.pool = r->pool.get();
  deps.events = &r->events;
  auto c = Coordinator::Create(cfg.options, deps);
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  r->coordinator = std::move(c).value();
  return r;
}

// The full data of parameter `id` (numel x 2 bytes, float16-sized elements):
// a pattern seeded by the id.
inline std::vector<uint8_t> ParamBytes(uint64_t id, uint64_t numel) {
  std::vector<uint8_t> v(numel * 2);
  ztier::testing::FillPattern(v.data(), v.size(), 1000 + id);
  return v;
}

// Registers a trace's params (all float16) and modules, finalizes, and sets
// every param's data. Returns the first error (safe on rank threads).
inline Status SetUpTrace(Coordinator& c, const TraceFile& t) {
  for (const auto& p : t.params) {
    ZTIER_RETURN_IF_ERROR(
        c.RegisterParam(p.id, p.numel, DType::kFloat16, p.tier, p.persist, p.name));
  }
  for (const auto& m : t.modules) ZTIER_RETURN_IF_ERROR(c.RegisterModule(m.id, m.name, m.params));
  ZTIER_RETURN_IF_ERROR(c.Finalize());
  for (const auto& p : t.params) {
    auto bytes = ParamBytes(p.id, p.numel);
    ZTIER_RETURN_IF_ERROR(c.SetParamData(p.id, bytes.data()));
  }
  return Status::Ok();
}

inline void RegisterTrace(Coordinator& c, const TraceFile& t) {
  Status s = SetUpTrace(c, t);
  ASSERT_TRUE(s.ok()) << s.ToString();
}

// `world` ranks over one LocalGroup (none for world 1), swap files in `dir`.
struct Ranks {
  std::shared_ptr<LocalGroup> group;
  std::vector<std::unique_ptr<Rank>> ranks;

  Ranks(const std::string& dir, uint32_t world, const RankConfig& cfg)
      : group(world > 1 ? LocalGroup::Create(world) : nullptr), ranks(world) {
    for (uint32_t r = 0; r < world; ++r) ranks[r] = MakeRank(dir, r, world, group.get(), cfg);
  }

  // Runs `body(rank index, rank)` on one thread per rank; returns each
  // rank's failure ("" for none).
  template <typename Body>
  std::vector<std::string> OnEveryRank(Body body) {
    std::vector<std::string> failures(ranks.size());
    std::vector<std::thread> threads;
    for (uint32_t r = 0; r < ranks.size(); ++r) {
      threads.emplace_back([&, r] { failures[r] = body(r, *ranks[r]); });
    }
    for (auto& th : threads) th.join();
    return failures;
  }
};

// The `bytes` bytes at device pointer `p`, read back to the host (a plain
// copy for the host emulation, a device-to-host copy on CUDA).
inline std::vector<uint8_t> DeviceBytes(tiering::DeviceBackend* d, const void* p,
                                        uint64_t bytes) {
  std::vector<uint8_t> out(bytes);
  if (d == nullptr || d->name() != "cuda") {
    memcpy(out.data(), p, bytes);
    return out;
  }
  auto s = d->CreateStream();
  EXPECT_TRUE(s.ok());
  EXPECT_TRUE(d->MemcpyD2HAsync(out.data(), p, bytes, *s).ok());
  EXPECT_TRUE(d->StreamSynchronize(*s).ok());
  EXPECT_TRUE(d->DestroyStream(*s).ok());
  return out;
}

// True if every param of `module` is AVAILABLE with exactly its data.
inline ::testing::AssertionResult ModuleDataIntact(Coordinator& c, const TraceFile& t,
                                                   uint64_t module,
                                                   tiering::DeviceBackend* device = nullptr) {
  for (const auto& m : t.modules) {
    if (m.id != module) continue;
    for (uint64_t pid : m.params) {
      auto data = c.ParamData(pid);
      if (!data.ok()) return ::testing::AssertionFailure() << data.status().ToString();
      uint64_t numel = 0;
      for (const auto& p : t.params) if (p.id == pid) numel = p.numel;
      const std::vector<uint8_t> host = DeviceBytes(device, *data, numel * 2);
      int64_t bad = ztier::testing::FirstMismatch(host.data(), numel * 2, 1000 + pid);
      if (bad >= 0) {
        return ::testing::AssertionFailure()
               << "param " << pid << " differs at byte " << bad << " of " << numel * 2;
      }
    }
  }
  return ::testing::AssertionSuccess();
}

}  // namespace ztier::coordinator::testing
