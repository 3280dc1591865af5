// The parameter swapper against real files on every backend: bit-exact round
// trips over stripes, sizes and packing; buffer exhaustion and release
// order; faults at every stage; corrupted and truncated swap files; stale and
// shared stores; concurrent swap-in/swap-out (run under TSan in CI's
// sanitizer job too).
#include "swapper/param_swapper.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "io/fault_backend.h"
#include "tests/testutil/faulty_engine.h"
#include "tests/testutil/testutil.h"

namespace ztier::swapper {
namespace {

using ztier::testing::FillPattern;
using ztier::testing::FirstMismatch;
using ztier::testing::ScratchDir;

constexpr uint64_t kKiB = 1024, kMiB = 1024 * 1024;

class SwapperTest : public ::testing::TestWithParam<io::BackendKind> {
 protected:
  void SetUp() override {
    auto probe = io::CreateBackend(GetParam(), io::BackendOptions{});
    if (!probe.ok()) GTEST_SKIP() << probe.status().ToString();
  }

  // Builds pool + engine + swapper. `paths` are subdirectories of the scratch
  // dir. Faults, if any, are injected below the engine.
  void Build(uint32_t buffer_count, uint64_t buffer_bytes, int paths = 1,
             std::vector<io::Fault> faults = {}, SwapperOptions so = {}) {
    tiering::PoolOptions po;
    po.buffer_count = buffer_count;
    po.buffer_bytes = buffer_bytes;
    po.pin = tiering::PinMode::kNone;
    auto pool = tiering::PinnedPool::Create(po);
    ASSERT_TRUE(pool.ok()) << pool.status().ToString();
    pool_ = std::move(pool).value();
    engine_ = ztier::testing::MakeFaultyAsyncEngine(
        GetParam(), faults, io::EngineOptions{.block_size = 256 * kKiB, .queue_depth = 16},
        &fault_);
    ASSERT_TRUE(engine_);
    so.store.paths.clear();
    for (int i = 0; i < paths; ++i) so.store.paths.push_back(dir_.File("nvme" + std::to_string(i)));
    so.store.stripe_bytes = 256 * kKiB;
    auto sw = ParamSwapper::Create(so, pool_.get(), engine_.get());
    ASSERT_TRUE(sw.ok());
    swapper_ = std::move(sw).value();
  }

  void TearDown() override {
    swapper_.reset();  // before the engine and pool it borrows
    engine_.reset();
    if (pool_) {
      // No buffer leaked, whatever the test did.
      EXPECT_EQ(pool_->stats().buffers_in_use, 0u);
    }
  }

  // Adds partitions of the given byte sizes (ids 0..n-1), seals, writes each
  // with its own pattern.
  void AddAndWrite(const std::vector<uint64_t>& sizes) {
    for (size_t i = 0; i < sizes.size(); ++i) ASSERT_TRUE(swapper_->Add(i, sizes[i]).ok());
    ASSERT_TRUE(swapper_->Seal().ok());
    for (size_t i = 0; i < sizes.size(); ++i) {
      std::vector<uint8_t> data(sizes[i]);
      FillPattern(data.data(), data.size(), 100 + i);
      Status s = swapper_->Write(i, data.data());
      ASSERT_TRUE(s.ok()) << s.ToString();
    }
  }

  // Swaps every id in, a window at a time, checking each against `seed(i)`.
  void ExpectAllIntact(size_t n, uint64_t seed_base = 100) {
    size_t next = 0;
    std::vector<uint64_t> ids(n);
    for (size_t i = 0; i < n; ++i) ids[i] = i;
    while (next < n) {
      auto got = swapper_->SwapIn(std::span<const uint64_t>(ids).subspan(next));
      ASSERT_TRUE(got.ok()) << got.status().ToString();
      ASSERT_GT(*got, 0u) << "no progress: buffers leaked?";
      for (size_t k = next; k < next + *got; ++k) {
        Status w = swapper_->Wait(k);
        ASSERT_TRUE(w.ok()) << w.ToString();
        auto data = swapper_->Data(k);
        ASSERT_TRUE(data.ok());
        EXPECT_EQ(FirstMismatch(*data, swapper_->bytes(k), seed_base + k), -1) << "id " << k;
        EXPECT_EQ(swapper_->state(k), PartitionState::kInHost);
      }
      for (size_t k = next; k < next + *got; ++k) ASSERT_TRUE(swapper_->ReleaseBuffer(k).ok());
      next += *got;
    }
  }

  ScratchDir dir_;
  std::unique_ptr<tiering::PinnedPool> pool_;
  std::unique_ptr<io::AsyncEngine> engine_;
  io::FaultInjectingBackend* fault_ = nullptr;
  std::unique_ptr<ParamSwapper> swapper_;
};

// Odd element counts of 2- and 4-byte dtypes, one spanning several buffers,
// several small enough to be packed.
const std::vector<uint64_t> kSizes = {2 * 1,        4 * 1001,      2 * 3 * 1024 * 1024 + 6,
                                      2 * 7919,     4 * 65537,     2 * 99,
                                      4 * 262144,   2 * 50001,     4 * 3,
                                      2 * 1000003};

TEST_P(SwapperTest, RoundTripIsBitExactOnOnePath) {
  Build(8, kMiB);
  AddAndWrite(kSizes);
  ExpectAllIntact(kSizes.size());
  EXPECT_GT(swapper_->stats().packed_partitions, 0u);
}

TEST_P(SwapperTest, RoundTripIsBitExactStripedOverThreePaths) {
  Build(8, kMiB, 3);
  AddAndWrite(kSizes);
  ExpectAllIntact(kSizes.size());
  EXPECT_EQ(swapper_->store().file_paths().size(), 3u);
}

TEST_P(SwapperTest, RoundTripWithoutPackingOrChecksums) {
  SwapperOptions so;
  so.pack_threshold_bytes = 0;
  so.checksum = false;
  Build(8, kMiB, 2, {}, so);
  AddAndWrite(kSizes);
  ExpectAllIntact(kSizes.size());
  EXPECT_EQ(swapper_->stats().packed_partitions, 0u);
  EXPECT_EQ(swapper_->stats().extents, kSizes.size());
}

TEST_P(SwapperTest, SmallPartitionsShareOneBuffer) {
  Build(2, kMiB);
  std::vector<uint64_t> sizes(40, 10 * kKiB);  // 400 KiB in all: one pack
  AddAndWrite(sizes);
  EXPECT_EQ(swapper_->stats().extents, 1u);
  std::vector<uint64_t> ids = {3, 7, 11};
  auto got = swapper_->SwapIn(ids);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(*got, 3u);
  EXPECT_EQ(pool_->stats().buffers_in_use, 1u);
  for (uint64_t id : ids) ASSERT_TRUE(swapper_->Wait(id).ok());
  ASSERT_TRUE(swapper_->ReleaseBuffer(3).ok());
  ASSERT_TRUE(swapper_->ReleaseBuffer(7).ok());
  EXPECT_EQ(pool_->stats().buffers_in_use, 1u);  // 11 still holds the pack
  ASSERT_TRUE(swapper_->ReleaseBuffer(11).ok());
  EXPECT_EQ(pool_->stats().buffers_in_use, 0u);
  ExpectAllIntact(sizes.size());
}

TEST_P(SwapperTest, SealedPacksHoldAtMostThePackThreshold) {
  // Before Repack() knows the order of use, a pack is read whole for any one
  // member: it is kept to pack_threshold bytes, not a whole buffer.
  SwapperOptions so;
  so.pack_threshold_bytes = 64 * kKiB;
  Build(2, kMiB, 1, {}, so);
  std::vector<uint64_t> sizes(40, 10 * kKiB);  // 6 fit in 64 KiB, 7 do not
  AddAndWrite(sizes);
  EXPECT_EQ(swapper_->stats().packed_partitions, 40u);
  EXPECT_EQ(swapper_->stats().extents, 7u);  // ceil(40 / 6)
  const uint64_t before = swapper_->stats().bytes_read;
  const uint64_t one[] = {20};
  auto got = swapper_->SwapIn(one);
  ASSERT_TRUE(got.ok() && *got == 1u);
  ASSERT_TRUE(swapper_->Wait(20).ok());
  EXPECT_LE(swapper_->stats().bytes_read - before, 64 * kKiB);
  ASSERT_TRUE(swapper_->ReleaseBuffer(20).ok());
  ExpectAllIntact(sizes.size());
}

TEST_P(SwapperTest, SwapInStopsAtFreeBuffersAndResumesAfterRelease) {
  Build(2, kMiB);
  AddAndWrite({kMiB, kMiB, kMiB});
  std::vector<uint64_t> ids = {0, 1, 2};
  auto got = swapper_->SwapIn(ids);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(*got, 2u);  // never asks for a buffer that is not free
  EXPECT_EQ(swapper_->available_swap_in_buffers(), 0u);
  EXPECT_EQ(swapper_->state(2), PartitionState::kOnNvme);
  ASSERT_TRUE(swapper_->Wait(0).ok());
  ASSERT_TRUE(swapper_->ReleaseBuffer(0).ok());
  auto rest = swapper_->SwapIn(std::span<const uint64_t>(ids).subspan(2));
  ASSERT_TRUE(rest.ok());
  EXPECT_EQ(*rest, 1u);
  ASSERT_TRUE(swapper_->Wait(1).ok());
  ASSERT_TRUE(swapper_->Wait(2).ok());
  ASSERT_TRUE(swapper_->ReleaseBuffer(1).ok());
  ASSERT_TRUE(swapper_->ReleaseBuffer(2).ok());
  // Pinned bytes never exceed buffer_count x aligned buffer_size.
  auto st = pool_->stats();
  EXPECT_LE(st.high_water_buffers, 2u);
  EXPECT_LE(st.bytes_allocated, 2 * pool_->buffer_bytes());
  EXPECT_LE(st.bytes_pinned, 2 * pool_->buffer_bytes());
}

// A caller that follows reads through the callback (the coordinator) must
// know, per id, whether a callback will come. Here the callback is held back,
// so the read has completed (state() already says IN_HOST) while its
// callback has not run: SwapIn's `observed` said READING, and exactly one
// callback follows. A pack member taken after its pack is in a buffer is
// IN_HOST, and no callback comes for it.
TEST_P(SwapperTest, SwapInSaysWhichIdsTheReadCallbackWillReport) {
  Build(2, kMiB);
  AddAndWrite({10 * kKiB, 10 * kKiB, kMiB});  // 0 and 1 share a pack; 2 alone
  ASSERT_EQ(swapper_->stats().extents, 2u);
  std::mutex mu;
  std::condition_variable cv;
  bool open = false;
  std::vector<uint64_t> reported;
  swapper_->SetReadCallback([&](uint64_t id, const Status& st) {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return open; });
    EXPECT_TRUE(st.ok()) << st.ToString();
    reported.push_back(id);
    cv.notify_all();
  });
  const uint64_t first[] = {0}, mate[] = {1}, alone[] = {2};
  PartitionState seen[1] = {PartitionState::kOnNvme};
  auto got = swapper_->SwapIn(first, seen);
  ASSERT_TRUE(got.ok() && *got == 1u);
  EXPECT_EQ(seen[0], PartitionState::kReading);
  ASSERT_TRUE(swapper_->Wait(0).ok());  // the read is done; its callback waits
  EXPECT_EQ(swapper_->state(0), PartitionState::kInHost);
  got = swapper_->SwapIn(mate, seen);
  ASSERT_TRUE(got.ok() && *got == 1u);
  EXPECT_EQ(seen[0], PartitionState::kInHost);
  {
    std::lock_guard<std::mutex> lock(mu);
    open = true;
  }
  cv.notify_all();
  ASSERT_TRUE(swapper_->WaitAll().ok());  // every callback has run
  EXPECT_EQ(reported, std::vector<uint64_t>({0}));
  got = swapper_->SwapIn(alone, seen);
  ASSERT_TRUE(got.ok() && *got == 1u);
  EXPECT_EQ(seen[0], PartitionState::kReading);
  ASSERT_TRUE(swapper_->WaitAll().ok());
  EXPECT_EQ(reported, std::vector<uint64_t>({0, 2}));
  PartitionState two[2];
  EXPECT_EQ(swapper_->SwapIn(first, two).status().code(), StatusCode::kInvalidArgument);
  for (uint64_t id : {0, 1, 2}) ASSERT_TRUE(swapper_->ReleaseBuffer(id).ok());
}

TEST_P(SwapperTest, APartitionThatCanNeverFitIsRejectedAtSeal) {
  Build(4, kMiB);
  ASSERT_TRUE(swapper_->Add(0, 4 * kMiB + 1).ok());
  Status s = swapper_->Seal();
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("buffer_count 4"), std::string_view::npos) << s.ToString();
  EXPECT_NE(s.message().find("4194305 bytes"), std::string_view::npos) << s.ToString();
}

TEST_P(SwapperTest, MisuseIsAnErrorNotACrash) {
  Build(2, kMiB);
  AddAndWrite({kMiB});
  EXPECT_EQ(swapper_->ReleaseBuffer(0).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(swapper_->Data(0).status().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(swapper_->SwapOut(0).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(swapper_->SwapIn(std::vector<uint64_t>{9}).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(swapper_->Add(5, 10).code(), StatusCode::kFailedPrecondition);  // after Seal
}

TEST_P(SwapperTest, SwapOutWritesBackUpdatedData) {
  Build(4, kMiB);
  AddAndWrite({3 * kMiB / 2, 10 * kKiB, 20 * kKiB});
  std::vector<uint64_t> ids = {0, 1, 2};
  ASSERT_EQ(*swapper_->SwapIn(ids), 3u);
  for (uint64_t id : ids) {
    ASSERT_TRUE(swapper_->Wait(id).ok());
    FillPattern(*swapper_->Data(id), swapper_->bytes(id), 500 + id);
  }
  for (uint64_t id : ids) ASSERT_TRUE(swapper_->SwapOut(id).ok());
  ASSERT_TRUE(swapper_->WaitAll().ok());
  EXPECT_EQ(pool_->stats().buffers_in_use, 0u);
  ExpectAllIntact(3, 500);
}

TEST_P(SwapperTest, ReadErrorLeavesStateAndPoolConsistent) {
  Build(4, kMiB, 1, {io::Fault{io::FaultKind::kEio, 0, 1, io::Op::kRead}});
  AddAndWrite({kMiB, kMiB});
  std::vector<uint64_t> ids = {0, 1};
  ASSERT_EQ(*swapper_->SwapIn(ids), 2u);
  Status s0 = swapper_->Wait(0);
  ASSERT_FALSE(s0.ok());
  EXPECT_NE(s0.message().find("partition 0"), std::string_view::npos) << s0.ToString();
  EXPECT_NE(s0.message().find("Input/output error"), std::string_view::npos);
  EXPECT_EQ(swapper_->state(0), PartitionState::kOnNvme);
  ASSERT_TRUE(swapper_->Wait(1).ok());
  ASSERT_TRUE(swapper_->ReleaseBuffer(1).ok());
  EXPECT_FALSE(swapper_->WaitAll().ok());
  EXPECT_EQ(pool_->stats().buffers_in_use, 0u);
  ExpectAllIntact(2);  // the fault was one-shot: a retry reads good data
}

TEST_P(SwapperTest, WriteBackErrorKeepsTheOnlyGoodCopy) {
  Build(4, kMiB);
  AddAndWrite({kMiB, kMiB});
  std::vector<uint64_t> ids = {0};
  ASSERT_EQ(*swapper_->SwapIn(ids), 1u);
  ASSERT_TRUE(swapper_->Wait(0).ok());
  FillPattern(*swapper_->Data(0), kMiB, 777);
  // Fail the second 256 KiB piece of the write-back: a torn extent on disk.
  fault_->AddFault(io::Fault{io::FaultKind::kEio, fault_->ops_seen(io::Op::kWrite) + 1, 1,
                             io::Op::kWrite});
  ASSERT_TRUE(swapper_->SwapOut(0).ok());
  Status s = swapper_->WaitAll();
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("write back partition 0"), std::string_view::npos) << s.ToString();
  EXPECT_EQ(swapper_->state(0), PartitionState::kInHost);
  EXPECT_EQ(swapper_->ReleaseBuffer(0).code(), StatusCode::kFailedPrecondition);
  ASSERT_TRUE(swapper_->SwapOut(0).ok());  // retry succeeds
  ASSERT_TRUE(swapper_->WaitAll().ok());
  EXPECT_EQ(pool_->stats().buffers_in_use, 0u);
  ASSERT_EQ(*swapper_->SwapIn(ids), 1u);
  ASSERT_TRUE(swapper_->Wait(0).ok());
  EXPECT_EQ(FirstMismatch(*swapper_->Data(0), kMiB, 777), -1);
  ASSERT_TRUE(swapper_->ReleaseBuffer(0).ok());
}

TEST_P(SwapperTest, ShortWritesAndReadsAreCompleted) {
  Build(4, kMiB, 1,
        {io::Fault{io::FaultKind::kShort, 0, 4, io::Op::kWrite},
         io::Fault{io::FaultKind::kShort, 0, 4, io::Op::kRead}});
  AddAndWrite({kMiB, 300 * kKiB});
  ExpectAllIntact(2);
  EXPECT_GE(fault_->faults_injected(), 8u);
}

TEST_P(SwapperTest, EnospcOnWriteLeavesNoDataThatLooksValid) {
  Build(4, kMiB, 1, {io::Fault{io::FaultKind::kEnospc, 1, 1, io::Op::kWrite}});
  ASSERT_TRUE(swapper_->Add(0, kMiB).ok());
  ASSERT_TRUE(swapper_->Seal().ok());
  std::vector<uint8_t> data(kMiB, 1);
  Status s = swapper_->Write(0, data.data());
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted);
  auto in = swapper_->SwapIn(std::vector<uint64_t>{0});
  EXPECT_EQ(in.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(swapper_->Write(0, data.data()).ok());  // recovers once space is back
}

// WriteMany: each extent written once with the batch's members (packs are
// not read-modify-written per member), partial batches keep the members
// outside them, and a failed extent leaves nothing that looks valid.
TEST_P(SwapperTest, WriteManyWritesEachExtentOnce) {
  Build(3, kMiB);  // fewer buffers than extents: writes wait for their own
  const std::vector<uint64_t> sizes = {4 * kKiB, 100 * kKiB, 3 * kKiB,  300 * kKiB,
                                       2 * kMiB, 8 * kKiB,   600 * kKiB, 5};
  for (size_t i = 0; i < sizes.size(); ++i) ASSERT_TRUE(swapper_->Add(i, sizes[i]).ok());
  ASSERT_TRUE(swapper_->Seal().ok());
  const uint64_t extents = swapper_->stats().extents;
  ASSERT_LT(extents, sizes.size());  // some are packed
  std::vector<std::vector<uint8_t>> data(sizes.size());
  std::vector<uint64_t> ids;
  std::vector<const void*> srcs;
  for (size_t i = 0; i < sizes.size(); ++i) {
    data[i].resize(sizes[i]);
    FillPattern(data[i].data(), sizes[i], 100 + i);
    ids.push_back(i);
    srcs.push_back(data[i].data());
  }
  Status s = swapper_->WriteMany(ids, srcs);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(swapper_->stats().writes, extents);
  EXPECT_EQ(fault_->ops_seen(io::Op::kRead), 0u);  // nothing to read-modify-write
  ExpectAllIntact(sizes.size());
  // A batch of some members of packs: the others keep their data.
  std::vector<uint8_t> other(sizes[2]);
  FillPattern(other.data(), other.size(), 500);
  const std::vector<uint64_t> some = {2, 5};
  const std::vector<const void*> some_src = {other.data(), data[5].data()};
  ASSERT_TRUE(swapper_->WriteMany(some, some_src).ok());
  auto got = swapper_->SwapIn(std::vector<uint64_t>{0, 1, 2});
  ASSERT_TRUE(got.ok());
  ASSERT_EQ(*got, 3u);
  for (uint64_t id : {0, 1, 2}) {
    ASSERT_TRUE(swapper_->Wait(id).ok());
    auto d = swapper_->Data(id);
    ASSERT_TRUE(d.ok());
    EXPECT_EQ(FirstMismatch(*d, sizes[id], id == 2 ? 500 : 100 + id), -1) << "id " << id;
  }
  for (uint64_t id : {0, 1, 2}) ASSERT_TRUE(swapper_->ReleaseBuffer(id).ok());
  EXPECT_EQ(swapper_->WriteMany(std::vector<uint64_t>{99}, std::vector<const void*>{srcs[0]})
                .code(),
            StatusCode::kNotFound);
}

TEST_P(SwapperTest, WriteManyFailureLeavesNoDataThatLooksValid) {
  Build(4, kMiB, 1, {io::Fault{io::FaultKind::kEio, 1, 1, io::Op::kWrite}});
  const std::vector<uint64_t> sizes = {2 * kMiB, 2 * kMiB, 2 * kMiB};
  for (size_t i = 0; i < sizes.size(); ++i) ASSERT_TRUE(swapper_->Add(i, sizes[i]).ok());
  ASSERT_TRUE(swapper_->Seal().ok());
  std::vector<uint8_t> data(2 * kMiB, 7);
  const std::vector<uint64_t> ids = {0, 1, 2};
  const std::vector<const void*> srcs = {data.data(), data.data(), data.data()};
  Status s = swapper_->WriteMany(ids, srcs);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kIoError) << s.ToString();
  // Transfers are cut at 256 KiB: the second write request belongs to
  // partition 0, which must not be readable.
  auto in = swapper_->SwapIn(std::vector<uint64_t>{0});
  EXPECT_EQ(in.status().code(), StatusCode::kFailedPrecondition);
  ASSERT_TRUE(swapper_->WriteMany(ids, srcs).ok());  // recovers
}

TEST_P(SwapperTest, CorruptedSwapFileIsDetectedNotReturned) {
  Build(4, kMiB);
  AddAndWrite({kMiB, 512 * kKiB});
  // Flip bytes inside partition 1 on disk, behind the swapper's back.
  const auto& file = swapper_->store().file();
  auto loc = file.Map(kMiB + 4096, 4096);
  int fd = open(file.file(loc.file_index).path().c_str(), O_WRONLY);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(pwrite(fd, "garbage!", 8, static_cast<off_t>(loc.offset + 100)), 8);
  fsync(fd);
  close(fd);
  ASSERT_EQ(*swapper_->SwapIn(std::vector<uint64_t>{1}), 1u);
  Status s = swapper_->Wait(1);
  ASSERT_EQ(s.code(), StatusCode::kCorruption) << s.ToString();
  EXPECT_NE(s.message().find("partition 1"), std::string_view::npos);
  EXPECT_NE(s.message().find(".swp at offset"), std::string_view::npos) << s.ToString();
  EXPECT_FALSE(swapper_->Data(1).ok());
  EXPECT_EQ(swapper_->stats().checksum_failures, 1u);
  EXPECT_FALSE(swapper_->WaitAll().ok());
}

TEST_P(SwapperTest, TruncatedSwapFileIsReportedWithThePartition) {
  Build(4, kMiB);
  AddAndWrite({kMiB, kMiB});
  ASSERT_EQ(truncate(swapper_->store().file_paths()[0].c_str(), 4096 + kMiB), 0);
  ASSERT_EQ(*swapper_->SwapIn(std::vector<uint64_t>{1}), 1u);
  Status s = swapper_->Wait(1);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("partition 1"), std::string_view::npos) << s.ToString();
  EXPECT_NE(s.message().find("end of file"), std::string_view::npos) << s.ToString();
  (void)swapper_->WaitAll();
}

TEST_P(SwapperTest, AStaleStoreIsNeverReadAsDataAndALiveOneIsNotShared) {
  Build(4, kMiB);
  AddAndWrite({kMiB});
  // A second swapper on the same path and rank while the first is alive.
  SwapperOptions so;
  so.store.paths = {dir_.File("nvme0")};
  so.store.stripe_bytes = 256 * kKiB;
  auto other = ParamSwapper::Create(so, pool_.get(), engine_.get());
  ASSERT_TRUE(other.ok());
  ASSERT_TRUE((*other)->Add(0, kMiB).ok());
  Status s = (*other)->Seal();
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("in use by another live process"), std::string_view::npos)
      << s.ToString();
  // After the first is gone, a new store starts empty: nothing is "written".
  swapper_.reset();
  auto fresh = ParamSwapper::Create(so, pool_.get(), engine_.get());
  ASSERT_TRUE((*fresh)->Add(0, kMiB).ok());
  ASSERT_TRUE((*fresh)->Seal().ok());
  EXPECT_EQ((*fresh)->SwapIn(std::vector<uint64_t>{0}).status().code(),
            StatusCode::kFailedPrecondition);
}

TEST_P(SwapperTest, ConcurrentSwapInAndSwapOut) {
  Build(6, 256 * kKiB, 2);
  constexpr int kThreads = 4, kPerThread = 6, kRounds = 5;
  std::vector<uint64_t> sizes;
  for (int i = 0; i < kThreads * kPerThread; ++i) sizes.push_back(64 * kKiB + 4096 * i);
  AddAndWrite(sizes);
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int r = 0; r < kRounds; ++r) {
        for (int k = 0; k < kPerThread; ++k) {
          uint64_t id = t * kPerThread + k;
          std::vector<uint64_t> one = {id};
          for (;;) {
            auto got = swapper_->SwapIn(one);
            if (!got.ok()) { ++failures; return; }
            if (*got == 1) break;
            std::this_thread::yield();
          }
          if (!swapper_->Wait(id).ok()) { ++failures; return; }
          uint8_t* d = *swapper_->Data(id);
          if (FirstMismatch(d, sizes[id], 100 + id + (r ? 1000 : 0)) != -1) ++failures;
          FillPattern(d, sizes[id], 100 + id + 1000);
          if (!swapper_->SwapOut(id).ok()) ++failures;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  ASSERT_TRUE(swapper_->WaitAll().ok());
  ExpectAllIntact(sizes.size(), 1100);
}

// Repack(): 20 small partitions (ids 0..19, 3000..4900 bytes, so 12 or more
// fit in one 64 KiB buffer) added interleaved with two large ones (100, 101),
// which split Seal()'s packs into three runs.
class RepackTest : public SwapperTest {
 protected:
  static constexpr uint64_t kBuffer = 64 * kKiB;
  static uint64_t SizeOf(uint64_t id) {
    return id == 100 ? 100 * kKiB : id == 101 ? 70000 : 3000 + 100 * id;
  }
  static std::vector<uint64_t> AddOrder() {
    return {0, 10, 1, 11, 2, 12, 100, 3, 13, 4, 14, 5, 15, 6, 16, 101, 7, 17, 8, 18, 9, 19};
  }
  // Seal()'s layout as groups: each run between large partitions alone.
  static std::vector<PackGroup> SealLayout() {
    return {PackGroup{{0, 10, 1, 11, 2, 12}, true}, PackGroup{{3, 13, 4, 14, 5, 15, 6, 16}, true},
            PackGroup{{7, 17, 8, 18, 9, 19}, true}};
  }
  // A learned order: 100 (large) is skipped, 3 named twice keeps its first
  // place, the group of 12 is alone; the rest follow the last group.
  static std::vector<PackGroup> TraceGroups() {
    return {PackGroup{{3, 17, 8, 100}}, PackGroup{{12, 0, 5, 19}, true},
            PackGroup{{1, 14, 9, 3}}, PackGroup{{6, 15}}};
  }

  // Builds a 4 x 64 KiB pool, adds AddOrder(), seals and writes every id but
  // those in `skip` with pattern 100 + id.
  void SetUpLayout(std::vector<io::Fault> faults = {}, std::vector<uint64_t> skip = {}) {
    Build(4, kBuffer, 1, std::move(faults));
    for (uint64_t id : AddOrder()) ASSERT_TRUE(swapper_->Add(id, SizeOf(id)).ok());
    ASSERT_TRUE(swapper_->Seal().ok());
    ASSERT_EQ(swapper_->stats().extents, 5u);  // three packs, two large
    for (uint64_t id : AddOrder()) {
      if (std::find(skip.begin(), skip.end(), id) != skip.end()) continue;
      std::vector<uint8_t> data(SizeOf(id));
      FillPattern(data.data(), data.size(), 100 + id);
      Status s = swapper_->Write(id, data.data());
      ASSERT_TRUE(s.ok()) << s.ToString();
    }
  }

  // Every id of AddOrder() but `skip` reads back bit-exact through Read()
  // and through SwapIn/Wait/Data.
  void ExpectIntact(std::vector<uint64_t> skip = {}) {
    for (uint64_t id : AddOrder()) {
      if (std::find(skip.begin(), skip.end(), id) != skip.end()) continue;
      std::vector<uint8_t> out(SizeOf(id));
      Status s = swapper_->Read(id, out.data());
      ASSERT_TRUE(s.ok()) << "id " << id << ": " << s.ToString();
      EXPECT_EQ(FirstMismatch(out.data(), out.size(), 100 + id), -1) << "Read id " << id;
      const uint64_t one[] = {id};
      auto got = swapper_->SwapIn(one);
      ASSERT_TRUE(got.ok() && *got == 1u) << "id " << id;
      ASSERT_TRUE(swapper_->Wait(id).ok()) << "id " << id;
      auto data = swapper_->Data(id);
      ASSERT_TRUE(data.ok());
      EXPECT_EQ(FirstMismatch(*data, SizeOf(id), 100 + id), -1) << "SwapIn id " << id;
      ASSERT_TRUE(swapper_->ReleaseBuffer(id).ok());
    }
    // A read counts as done only after its callback ran: Repack() needs that.
    ASSERT_TRUE(swapper_->WaitAll().ok());
  }

  Status Repack(const std::vector<PackGroup>& groups) { return swapper_->Repack(groups); }
};

TEST_P(RepackTest, FollowsTheGroupsAndKeepsEveryByte) {
  SetUpLayout();
  const SwapperStats before = swapper_->stats();
  Status s = Repack(TraceGroups());
  ASSERT_TRUE(s.ok()) << s.ToString();
  const SwapperStats after = swapper_->stats();
  EXPECT_EQ(after.repacks, 1u);
  EXPECT_GT(after.bytes_repacked, 0u);
  EXPECT_EQ(after.bytes_written - before.bytes_written, after.bytes_repacked);
  EXPECT_EQ(after.packed_partitions, 20u);
  ExpectIntact();
}

// One read brings in a whole group; an alone group shares its pack with no
// other group; consecutive groups share packs.
TEST_P(RepackTest, AGroupComesInWithOneRead) {
  SetUpLayout();
  ASSERT_TRUE(Repack(TraceGroups()).ok());
  // Swaps in the first of `ids` (one read), then the others: IN_HOST already.
  auto expect_one_read = [&](std::vector<uint64_t> ids) {
    const uint64_t reads = swapper_->stats().reads;
    PartitionState seen[1] = {PartitionState::kOnNvme};
    auto got = swapper_->SwapIn(std::span<const uint64_t>(ids).first(1), seen);
    ASSERT_TRUE(got.ok() && *got == 1u);
    EXPECT_EQ(seen[0], PartitionState::kReading);
    ASSERT_TRUE(swapper_->Wait(ids[0]).ok());
    for (size_t k = 1; k < ids.size(); ++k) {
      got = swapper_->SwapIn(std::span<const uint64_t>(ids).subspan(k, 1), seen);
      ASSERT_TRUE(got.ok() && *got == 1u);
      EXPECT_EQ(seen[0], PartitionState::kInHost) << "id " << ids[k];
      auto data = swapper_->Data(ids[k]);
      ASSERT_TRUE(data.ok()) << data.status().ToString();
      EXPECT_EQ(FirstMismatch(*data, SizeOf(ids[k]), 100 + ids[k]), -1) << "id " << ids[k];
    }
    EXPECT_EQ(swapper_->stats().reads, reads + 1);
  };
  auto release = [&](std::vector<uint64_t> ids) {
    for (uint64_t id : ids) ASSERT_TRUE(swapper_->ReleaseBuffer(id).ok()) << id;
    ASSERT_TRUE(swapper_->WaitAll().ok());
  };
  expect_one_read({3, 17, 8});
  EXPECT_EQ(swapper_->BuffersNeeded(12), 1u);  // the alone group: another pack
  release({3, 17, 8});
  expect_one_read({12, 0, 5, 19});
  for (uint64_t other : {3, 1, 6, 10, 18}) EXPECT_EQ(swapper_->BuffersNeeded(other), 1u) << other;
  release({12, 0, 5, 19});
  // The groups after the alone one share a pack, and the rest follow them.
  expect_one_read({1, 14, 9, 6, 15, 10});
  EXPECT_EQ(swapper_->BuffersNeeded(12), 1u);
  release({1, 14, 9, 6, 15, 10});
  EXPECT_EQ(pool_->stats().buffers_in_use, 0u);
}

TEST_P(RepackTest, AlternatesRegionsAndGoesBack) {
  SetUpLayout();
  const uint64_t capacity = swapper_->store().capacity(), used = swapper_->store().used();
  ASSERT_TRUE(Repack(TraceGroups()).ok());
  std::vector<uint64_t> reversed;
  for (uint64_t id = 20; id-- > 0;) reversed.push_back(id);
  ASSERT_TRUE(Repack({PackGroup{reversed}}).ok());
  ExpectIntact();
  Status s = Repack(SealLayout());  // back where Seal() put them
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(swapper_->stats().repacks, 3u);
  EXPECT_EQ(swapper_->stats().extents, 5u);
  ExpectIntact();
  EXPECT_EQ(swapper_->store().capacity(), capacity);
  EXPECT_EQ(swapper_->store().used(), used);
}

TEST_P(RepackTest, TheSameLayoutMovesNothing) {
  SetUpLayout();
  SwapperStats before = swapper_->stats();
  ASSERT_TRUE(Repack(SealLayout()).ok());  // what Seal() laid out
  SwapperStats after = swapper_->stats();
  EXPECT_EQ(after.repacks, 0u);
  EXPECT_EQ(after.bytes_read, before.bytes_read);
  EXPECT_EQ(after.bytes_written, before.bytes_written);
  ASSERT_TRUE(Repack(TraceGroups()).ok());
  before = swapper_->stats();
  ASSERT_TRUE(Repack(TraceGroups()).ok());  // learned again: the same
  after = swapper_->stats();
  EXPECT_EQ(after.repacks, 1u);
  EXPECT_EQ(after.bytes_read, before.bytes_read);
  EXPECT_EQ(after.bytes_written, before.bytes_written);
  EXPECT_EQ(after.bytes_repacked, before.bytes_repacked);
}

TEST_P(RepackTest, NeedsEveryPartitionOnNvmeAndUnheld) {
  SetUpLayout();
  const uint64_t held[] = {5};
  ASSERT_EQ(*swapper_->SwapIn(held), 1u);
  ASSERT_TRUE(swapper_->Wait(5).ok());
  const SwapperStats before = swapper_->stats();
  Status s = Repack(TraceGroups());
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s.ToString();
  // 3 comes first in registration order and shares 5's pack.
  EXPECT_NE(s.message().find("partition 3 is IN_HOST (its pack is swapped in for partition 5)"),
            std::string_view::npos)
      << s.ToString();
  EXPECT_EQ(swapper_->stats().repacks, 0u);
  EXPECT_EQ(swapper_->stats().bytes_written, before.bytes_written);
  ASSERT_TRUE(swapper_->ReleaseBuffer(5).ok());
  // Still Seal()'s layout: 5 shares its pack with 3, not with 12.
  ASSERT_EQ(*swapper_->SwapIn(held), 1u);
  EXPECT_EQ(swapper_->BuffersNeeded(3), 0u);
  EXPECT_EQ(swapper_->BuffersNeeded(12), 1u);
  ASSERT_TRUE(swapper_->Wait(5).ok());
  ASSERT_TRUE(swapper_->ReleaseBuffer(5).ok());
  ExpectIntact();
}

TEST_P(RepackTest, MisuseIsAnErrorAndOneBufferIsEnough) {
  Build(1, kBuffer);
  const std::vector<PackGroup> groups = {PackGroup{{1, 0}}};
  EXPECT_EQ(swapper_->Repack(groups).code(), StatusCode::kFailedPrecondition);  // before Seal
  ASSERT_TRUE(swapper_->Add(0, 1000).ok());
  ASSERT_TRUE(swapper_->Add(1, 3000).ok());
  ASSERT_TRUE(swapper_->Seal().ok());
  EXPECT_EQ(swapper_->Repack(std::vector<PackGroup>{PackGroup{{7}}}).code(),
            StatusCode::kNotFound);
  EXPECT_TRUE(swapper_->Repack({}).ok());  // the same layout
  EXPECT_EQ(swapper_->stats().repacks, 0u);
  for (uint64_t id : {0, 1}) {
    std::vector<uint8_t> data(swapper_->bytes(id));
    FillPattern(data.data(), data.size(), 100 + id);
    ASSERT_TRUE(swapper_->Write(id, data.data()).ok());
  }
  // A pool of one buffer: the new pack is assembled in a host buffer.
  Status s = swapper_->Repack(groups);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(swapper_->stats().repacks, 1u);
  for (uint64_t id : {0, 1}) {
    std::vector<uint8_t> out(swapper_->bytes(id));
    ASSERT_TRUE(swapper_->Read(id, out.data()).ok());
    EXPECT_EQ(FirstMismatch(out.data(), out.size(), 100 + id), -1) << id;
  }
}

TEST_P(RepackTest, UnwrittenPartitionsStayUnwritten) {
  // 12, 0, 5, 19 (the alone group) are never written: their new pack is not
  // written at all; 4 and 13 are unwritten members of written packs.
  const std::vector<uint64_t> skip = {12, 0, 5, 19, 4, 13};
  SetUpLayout({}, skip);
  ASSERT_TRUE(Repack(TraceGroups()).ok());
  std::vector<uint8_t> out(kBuffer);
  for (uint64_t id : skip) {
    EXPECT_EQ(swapper_->Read(id, out.data()).code(), StatusCode::kFailedPrecondition) << id;
    EXPECT_EQ(swapper_->SwapIn(std::vector<uint64_t>{id}).status().code(),
              StatusCode::kFailedPrecondition)
        << id;
  }
  ExpectIntact(skip);
  for (uint64_t id : skip) {  // writable in the new layout
    std::vector<uint8_t> data(SizeOf(id));
    FillPattern(data.data(), data.size(), 100 + id);
    ASSERT_TRUE(swapper_->Write(id, data.data()).ok()) << id;
  }
  ExpectIntact();
}

// An I/O error in a repack leaves the old layout in force, readable; a
// retry succeeds.
TEST_P(RepackTest, AFailedRepackKeepsTheOldLayout) {
  SetUpLayout();
  ASSERT_TRUE(Repack(TraceGroups()).ok());  // the old layout is in a repack region
  std::vector<uint64_t> reversed;
  for (uint64_t id = 20; id-- > 0;) reversed.push_back(id);
  const std::vector<PackGroup> next = {PackGroup{reversed}};
  // The second pack's write fails (after the first one went through).
  fault_->AddFault(io::Fault{io::FaultKind::kEio, fault_->ops_seen(io::Op::kWrite) + 1, 1,
                             io::Op::kWrite});
  Status s = Repack(next);
  ASSERT_EQ(s.code(), StatusCode::kIoError) << s.ToString();
  EXPECT_NE(s.message().find("repack: write"), std::string_view::npos) << s.ToString();
  EXPECT_NE(s.message().find(".swp at offset"), std::string_view::npos) << s.ToString();
  EXPECT_EQ(swapper_->stats().repacks, 1u);
  ExpectIntact();
  // A failed read of an old pack.
  fault_->AddFault(io::Fault{io::FaultKind::kEio, fault_->ops_seen(io::Op::kRead), 1,
                             io::Op::kRead});
  s = Repack(next);
  ASSERT_EQ(s.code(), StatusCode::kIoError) << s.ToString();
  EXPECT_NE(s.message().find("repack: read partition"), std::string_view::npos) << s.ToString();
  EXPECT_NE(s.message().find(".swp at offset"), std::string_view::npos) << s.ToString();
  EXPECT_EQ(swapper_->stats().repacks, 1u);
  ExpectIntact();
  EXPECT_EQ(pool_->stats().buffers_in_use, 0u);
  s = Repack(next);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(swapper_->stats().repacks, 2u);
  ExpectIntact();
}

// A partition altered on disk is not carried into the new layout.
TEST_P(RepackTest, ACorruptedPackFailsTheRepack) {
  SetUpLayout();
  const auto& file = swapper_->store().file();
  auto loc = file.Map(0, 4096);  // the first pack: 0, 10, 1, ...
  int fd = open(file.file(loc.file_index).path().c_str(), O_WRONLY);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(pwrite(fd, "garbage!", 8, static_cast<off_t>(loc.offset + 10)), 8);
  fsync(fd);
  close(fd);
  Status s = Repack(TraceGroups());
  ASSERT_EQ(s.code(), StatusCode::kCorruption) << s.ToString();
  EXPECT_NE(s.message().find("partition 0"), std::string_view::npos) << s.ToString();
  EXPECT_EQ(swapper_->stats().repacks, 0u);
  EXPECT_EQ(pool_->stats().buffers_in_use, 0u);
  std::vector<uint8_t> out(SizeOf(10));
  ASSERT_TRUE(swapper_->Read(10, out.data()).ok());  // its pack mates still read
  EXPECT_EQ(FirstMismatch(out.data(), out.size(), 110), -1);
}

INSTANTIATE_TEST_SUITE_P(AllBackends, RepackTest,
                         ::testing::Values(io::BackendKind::kIoUring, io::BackendKind::kLibaio,
                                           io::BackendKind::kPsync),
                         [](const auto& info) {
                           return std::string(io::BackendKindName(info.param));
                         });

INSTANTIATE_TEST_SUITE_P(AllBackends, SwapperTest,
                         ::testing::Values(io::BackendKind::kIoUring, io::BackendKind::kLibaio,
                                           io::BackendKind::kPsync),
                         [](const auto& info) {
                           return std::string(io::BackendKindName(info.param));
                         });

}  // namespace
}  // namespace ztier::swapper
