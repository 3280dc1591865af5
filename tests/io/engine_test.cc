// The engine suite: every case runs on every backend (io_uring, libaio,
// psync), skipping with the reason a backend this build or machine lacks.
// Data is checked byte for byte; psync is the reference the others are
// cross-checked against.
#include "io/engine.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "io/fault_backend.h"
#include "tests/testutil/testutil.h"

namespace ztier::io {
namespace {

using ztier::testing::AlignedBuffer;
using ztier::testing::FillPattern;
using ztier::testing::FirstMismatch;
using ztier::testing::MakeAligned;
using ztier::testing::ScratchDir;

constexpr uint64_t kMiB = 1ull << 20;
constexpr uint64_t kKiB = 1ull << 10;

class EngineTest : public ::testing::TestWithParam<BackendKind> {
 protected:
  void SetUp() override {
    auto probe = CreateBackend(GetParam(), BackendOptions{});
    if (!probe.ok()) GTEST_SKIP() << probe.status().ToString();
  }

  std::unique_ptr<Backend> NewBackend(uint32_t qd = 32) {
    BackendOptions o;
    o.queue_depth = qd;
    auto b = CreateBackend(GetParam(), o);
    EXPECT_TRUE(b.ok()) << b.status().ToString();
    return std::move(b).value();
  }

  std::unique_ptr<Engine> NewEngine(EngineOptions o = {}) {
    auto e = Engine::Create(NewBackend(o.queue_depth), o);
    EXPECT_TRUE(e.ok()) << e.status().ToString();
    return std::move(e).value();
  }

  // An engine whose backend injects `faults`; `*fault` points at the wrapper.
  std::unique_ptr<Engine> NewFaultyEngine(const std::vector<Fault>& faults,
                                          FaultInjectingBackend** fault,
                                          EngineOptions o = {}) {
    auto wrapper = std::make_unique<FaultInjectingBackend>(NewBackend(o.queue_depth));
    for (const Fault& f : faults) wrapper->AddFault(f);
    *fault = wrapper.get();
    auto e = Engine::Create(std::move(wrapper), o);
    EXPECT_TRUE(e.ok()) << e.status().ToString();
    return std::move(e).value();
  }

  std::unique_ptr<StripedFile> Open(const std::vector<std::string>& paths,
                                    uint64_t stripe = kMiB, bool direct = true) {
    OpenOptions o;
    o.direct = direct;
    auto f = StripedFile::Open(paths, stripe, o);
    EXPECT_TRUE(f.ok()) << f.status().ToString();
    return std::move(f).value();
  }

  // Reads [offset, offset+len) of the logical file through a psync engine.
  void ExpectPatternViaPsync(const StripedFile& file, uint64_t offset,
                             uint64_t len, uint64_t seed) {
    auto ref = Engine::Create(CreatePsyncBackend(BackendOptions{}).value(), EngineOptions{});
    ASSERT_TRUE(ref.ok());
    AlignedBuffer buf = MakeAligned(len);
    ASSERT_TRUE((*ref)->Read(file, offset, len, buf.get()).ok());
    EXPECT_EQ(FirstMismatch(buf.get(), len, seed, offset), -1);
  }

  ScratchDir dir_;
};

TEST_P(EngineTest, RoundTripManyBlocks) {
  auto engine = NewEngine();
  auto file = Open({dir_.File("a")});
  const uint64_t len = 64 * kMiB + 4 * kKiB;  // not a multiple of the block
  AlignedBuffer out = MakeAligned(len), in = MakeAligned(len);
  FillPattern(out.get(), len, 1);
  ASSERT_TRUE(engine->Write(*file, 0, len, out.get()).ok());
  ASSERT_TRUE(engine->Read(*file, 0, len, in.get()).ok());
  EXPECT_EQ(FirstMismatch(in.get(), len, 1), -1);
  EXPECT_EQ(engine->stats().bytes, 2 * len);
  EXPECT_EQ(engine->stats().requests, 2 * (64 + 1));
  ExpectPatternViaPsync(*file, 0, len, 1);
}

TEST_P(EngineTest, MultiGiBTransferCrossesTheFourGiBPieceLimit) {
  // One transfer larger than 2^31 bytes: lengths and offsets are 64-bit.
  const uint64_t len = (2ull << 30) + 3 * kMiB;
  auto engine = NewEngine();
  auto file = Open({dir_.File("big")});
  AlignedBuffer buf = MakeAligned(len);
  FillPattern(buf.get(), len, 7);
  ASSERT_TRUE(engine->Write(*file, 4096, len, buf.get()).ok());
  memset(buf.get(), 0, len);
  ASSERT_TRUE(engine->Read(*file, 4096, len, buf.get()).ok());
  EXPECT_EQ(FirstMismatch(buf.get(), len, 7), -1);
}

TEST_P(EngineTest, OddOffsetsAndLengthsBuffered) {
  auto engine = NewEngine();
  auto file = Open({dir_.File("odd")}, kMiB, /*direct=*/false);
  EXPECT_EQ(file->alignment(), 1u);
  const uint64_t off = 12345, len = 3 * kMiB + 777;
  std::vector<uint8_t> out(len), in(len);
  FillPattern(out.data(), len, 3, off);
  ASSERT_TRUE(engine->Write(*file, off, len, out.data()).ok());
  ASSERT_TRUE(engine->Read(*file, off, len, in.data()).ok());
  EXPECT_EQ(FirstMismatch(in.data(), len, 3, off), -1);
}

TEST_P(EngineTest, OddAlignedOffsetsDirect) {
  auto engine = NewEngine(EngineOptions{.block_size = 128 * kKiB, .queue_depth = 8});
  auto file = Open({dir_.File("odd_direct")}, 128 * kKiB);
  const uint64_t a = file->alignment();
  const uint64_t off = 7 * a, len = 129 * a + 33 * 4096;
  AlignedBuffer out = MakeAligned(len), in = MakeAligned(len);
  FillPattern(out.get(), len, 5, off);
  ASSERT_TRUE(engine->Write(*file, off, len, out.get()).ok());
  ASSERT_TRUE(engine->Read(*file, off, len, in.get()).ok());
  EXPECT_EQ(FirstMismatch(in.get(), len, 5, off), -1);
}

TEST_P(EngineTest, ManyConcurrentTransfersInAnyOrder) {
  auto engine = NewEngine(EngineOptions{.block_size = 64 * kKiB, .queue_depth = 32});
  auto file = Open({dir_.File("many")}, 64 * kKiB);
  std::mt19937_64 rng(42);
  constexpr int kTransfers = 300;
  struct Slot { uint64_t off, len; };
  std::vector<Slot> slots;
  uint64_t pos = 0;
  for (int i = 0; i < kTransfers; ++i) {
    uint64_t len = 4096 * (1 + rng() % 64);  // 4 KiB .. 256 KiB
    slots.push_back({pos, len});
    pos += len + 4096 * (rng() % 3);
  }
  std::shuffle(slots.begin(), slots.end(), rng);  // submit out of file order
  AlignedBuffer out = MakeAligned(pos), in = MakeAligned(pos);
  FillPattern(out.get(), pos, 9);
  int done = 0, failed = 0;
  for (const Slot& s : slots) {
    ASSERT_TRUE(engine->Submit({Op::kWrite, file.get(), s.off, s.len, out.get() + s.off,
                                [&](const Status& st) { ++done; failed += !st.ok(); }})
                    .ok());
  }
  EXPECT_EQ(engine->pending(), static_cast<size_t>(kTransfers));
  ASSERT_TRUE(engine->Drain().ok());
  EXPECT_EQ(done, kTransfers);
  EXPECT_EQ(failed, 0);
  for (const Slot& s : slots) {
    ASSERT_TRUE(engine->Submit({Op::kRead, file.get(), s.off, s.len, in.get() + s.off,
                                [&](const Status& st) { ++done; failed += !st.ok(); }})
                    .ok());
  }
  ASSERT_TRUE(engine->Drain().ok());
  EXPECT_EQ(failed, 0);
  for (const Slot& s : slots) {
    ASSERT_EQ(FirstMismatch(in.get() + s.off, s.len, 9, s.off), -1) << "at " << s.off;
  }
}

TEST_P(EngineTest, StripesOverThreeFiles) {
  const uint64_t stripe = 64 * kKiB;
  auto engine = NewEngine(EngineOptions{.block_size = kMiB, .queue_depth = 16});
  std::vector<std::string> paths = {dir_.File("s0"), dir_.File("s1"), dir_.File("s2")};
  auto file = Open(paths, stripe);
  const uint64_t len = 10 * kMiB + 3 * stripe;
  AlignedBuffer out = MakeAligned(len);
  FillPattern(out.get(), len, 11);
  ASSERT_TRUE(engine->Write(*file, 0, len, out.get()).ok());
  // Each physical file holds every third stripe unit, in order.
  for (uint64_t u = 0; u * stripe < len; ++u) {
    int fd = file->file(u % 3).fd();
    AlignedBuffer b = MakeAligned(stripe);
    ASSERT_EQ(pread(fd, b.get(), stripe, static_cast<off_t>((u / 3) * stripe)),
              static_cast<ssize_t>(stripe));
    ASSERT_EQ(FirstMismatch(b.get(), stripe, 11, u * stripe), -1) << "unit " << u;
  }
  ExpectPatternViaPsync(*file, 0, len, 11);
}

TEST_P(EngineTest, RegisteredBuffersAndFiles) {
  auto engine = NewEngine(EngineOptions{.block_size = 256 * kKiB, .queue_depth = 8});
  auto file = Open({dir_.File("reg")}, 256 * kKiB);
  const uint64_t len = 2 * kMiB;  // stays below an 8 MiB memlock limit
  AlignedBuffer buf = MakeAligned(len);
  iovec region{buf.get(), len};
  ASSERT_TRUE(engine->RegisterBuffers({&region, 1}).ok());
  ASSERT_TRUE(engine->RegisterFiles({file.get()}).ok());
  FillPattern(buf.get(), len, 13);
  ASSERT_TRUE(engine->Write(*file, 0, len, buf.get()).ok());
  memset(buf.get(), 0, len);
  ASSERT_TRUE(engine->Read(*file, 0, len, buf.get()).ok());
  EXPECT_EQ(FirstMismatch(buf.get(), len, 13), -1);
  EXPECT_FALSE(engine->RegisterBuffers({&region, 1}).ok());  // only once
}

TEST_P(EngineTest, MisalignedRequestsAreRejectedUpFront) {
  auto engine = NewEngine();
  auto file = Open({dir_.File("align")});
  const uint64_t a = file->alignment();
  ASSERT_GE(a, 512u);
  AlignedBuffer buf = MakeAligned(4 * kMiB);
  struct Case { uint64_t buf_off, off, len; const char* what; };
  for (const Case& c : {Case{1, 0, a, "buffer address"}, Case{0, 100, a, "file offset"},
                        Case{0, 0, a + 1, "length"}}) {
    Status s = engine->Submit({Op::kRead, file.get(), c.off, c.len, buf.get() + c.buf_off});
    ASSERT_FALSE(s.ok());
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
    EXPECT_NE(s.message().find(c.what), std::string_view::npos) << s.ToString();
    EXPECT_NE(s.message().find(std::to_string(a) + " bytes"), std::string_view::npos)
        << s.ToString();
  }
  EXPECT_EQ(engine->pending(), 0u);
}

TEST_P(EngineTest, ReadPastEndOfFileIsAnErrorAndEngineStaysUsable) {
  auto engine = NewEngine();
  auto file = Open({dir_.File("short")});
  AlignedBuffer buf = MakeAligned(4 * kMiB);
  FillPattern(buf.get(), kMiB, 2);
  ASSERT_TRUE(engine->Write(*file, 0, kMiB, buf.get()).ok());
  Status s = engine->Read(*file, 0, 4 * kMiB, buf.get());
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("end of file"), std::string_view::npos) << s.ToString();
  EXPECT_NE(s.message().find(dir_.File("short")), std::string_view::npos) << s.ToString();
  ASSERT_TRUE(engine->Read(*file, 0, kMiB, buf.get()).ok());
  EXPECT_EQ(FirstMismatch(buf.get(), kMiB, 2), -1);
}

TEST_P(EngineTest, InjectedEioFailsOneTransferNamingFileOffsetAndErrno) {
  FaultInjectingBackend* fault = nullptr;
  auto engine = NewFaultyEngine({Fault{FaultKind::kEio, 2, 1, Op::kRead}}, &fault);
  auto file = Open({dir_.File("eio")});
  const uint64_t len = 8 * kMiB;
  AlignedBuffer buf = MakeAligned(len);
  FillPattern(buf.get(), len, 4);
  ASSERT_TRUE(engine->Write(*file, 0, len, buf.get()).ok());
  Status s = engine->Read(*file, 0, len, buf.get());
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kIoError);
  EXPECT_EQ(s.err(), EIO);
  EXPECT_NE(s.message().find("read of " + dir_.File("eio") + " at offset 2097152"),
            std::string_view::npos) << s.ToString();
  EXPECT_NE(s.message().find("Input/output error"), std::string_view::npos);
  EXPECT_EQ(fault->faults_injected(), 1u);
  EXPECT_EQ(engine->stats().failed_transfers, 1u);
  // Usable afterwards, data intact.
  memset(buf.get(), 0, len);
  ASSERT_TRUE(engine->Read(*file, 0, len, buf.get()).ok());
  EXPECT_EQ(FirstMismatch(buf.get(), len, 4), -1);
}

TEST_P(EngineTest, ShortTransfersContinueWithTheRemainder) {
  FaultInjectingBackend* fault = nullptr;
  auto engine = NewFaultyEngine({Fault{FaultKind::kShort, 1, 3, Op::kWrite},
                                 Fault{FaultKind::kShort, 0, 5, Op::kRead}},
                                &fault);
  auto file = Open({dir_.File("short_io")});
  const uint64_t len = 6 * kMiB;
  AlignedBuffer out = MakeAligned(len), in = MakeAligned(len);
  FillPattern(out.get(), len, 6);
  ASSERT_TRUE(engine->Write(*file, 0, len, out.get()).ok());
  ASSERT_TRUE(engine->Read(*file, 0, len, in.get()).ok());
  EXPECT_EQ(FirstMismatch(in.get(), len, 6), -1);
  EXPECT_EQ(engine->stats().short_transfers, 8u);
  EXPECT_EQ(fault->faults_injected(), 8u);
  ExpectPatternViaPsync(*file, 0, len, 6);
}

TEST_P(EngineTest, EagainIsRetriedAndZeroByteWriteIsRetried) {
  FaultInjectingBackend* fault = nullptr;
  auto engine = NewFaultyEngine({Fault{FaultKind::kEagain, 0, 2, Op::kWrite},
                                 Fault{FaultKind::kZero, 3, 1, Op::kWrite},
                                 Fault{FaultKind::kEagain, 1, 1, Op::kRead}},
                                &fault);
  auto file = Open({dir_.File("retry")});
  const uint64_t len = 4 * kMiB;
  AlignedBuffer out = MakeAligned(len), in = MakeAligned(len);
  FillPattern(out.get(), len, 8);
  ASSERT_TRUE(engine->Write(*file, 0, len, out.get()).ok());
  ASSERT_TRUE(engine->Read(*file, 0, len, in.get()).ok());
  EXPECT_EQ(FirstMismatch(in.get(), len, 8), -1);
  EXPECT_EQ(engine->stats().retries, 3u);  // two EAGAIN writes, one EAGAIN read
  EXPECT_EQ(engine->stats().short_transfers, 1u);  // the zero-byte write
}

TEST_P(EngineTest, EndlessEagainGivesUpWithAnError) {
  FaultInjectingBackend* fault = nullptr;
  auto engine = NewFaultyEngine({Fault{FaultKind::kEagain, 0, 1000}}, &fault,
                                EngineOptions{.max_retries = 4});
  auto file = Open({dir_.File("eagain")});
  AlignedBuffer buf = MakeAligned(kMiB);
  Status s = engine->Write(*file, 0, kMiB, buf.get());
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.err(), EAGAIN);
}

TEST_P(EngineTest, ZeroByteReadIsEndOfFile) {
  FaultInjectingBackend* fault = nullptr;
  auto engine = NewFaultyEngine({Fault{FaultKind::kZero, 0, 1, Op::kRead}}, &fault);
  auto file = Open({dir_.File("zero")});
  AlignedBuffer buf = MakeAligned(kMiB);
  ASSERT_TRUE(engine->Write(*file, 0, kMiB, buf.get()).ok());
  Status s = engine->Read(*file, 0, kMiB, buf.get());
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("end of file"), std::string_view::npos) << s.ToString();
}

TEST_P(EngineTest, EnospcOnWriteIsResourceExhausted) {
  FaultInjectingBackend* fault = nullptr;
  auto engine = NewFaultyEngine({Fault{FaultKind::kEnospc, 1, 1, Op::kWrite}}, &fault);
  auto file = Open({dir_.File("nospace")});
  AlignedBuffer buf = MakeAligned(4 * kMiB);
  Status s = engine->Write(*file, 0, 4 * kMiB, buf.get());
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted);
  EXPECT_NE(s.message().find("No space left on device"), std::string_view::npos);
  EXPECT_TRUE(engine->Write(*file, 0, 4 * kMiB, buf.get()).ok());
}

TEST_P(EngineTest, SubmitErrorFailsOnlyThatTransfer) {
  FaultInjectingBackend* fault = nullptr;
  auto engine = NewFaultyEngine({Fault{FaultKind::kSubmitError, 0, 1}}, &fault,
                                EngineOptions{.block_size = kMiB, .queue_depth = 4});
  auto file = Open({dir_.File("submit")});
  AlignedBuffer buf = MakeAligned(2 * kMiB);
  std::vector<Status> results;
  for (int i = 0; i < 2; ++i) {
    ASSERT_TRUE(engine->Submit({Op::kWrite, file.get(), i * kMiB, kMiB, buf.get() + i * kMiB,
                                [&](const Status& s) { results.push_back(s); }})
                    .ok());
  }
  ASSERT_TRUE(engine->Drain().ok());
  ASSERT_EQ(results.size(), 2u);
  EXPECT_EQ(std::count_if(results.begin(), results.end(),
                          [](const Status& s) { return !s.ok(); }),
            1);
}

TEST_P(EngineTest, ShutdownWithTransfersInFlightCancelsAndReapsAll) {
  auto file = Open({dir_.File("cancel")});
  const uint64_t len = 32 * kMiB;
  AlignedBuffer buf = MakeAligned(len);
  int callbacks = 0;
  {
    auto engine = NewEngine();
    for (uint64_t off = 0; off < len; off += 4 * kMiB) {
      ASSERT_TRUE(engine->Submit({Op::kWrite, file.get(), off, 4 * kMiB, buf.get() + off,
                                  [&](const Status&) { ++callbacks; }})
                      .ok());
    }
    ASSERT_TRUE(engine->Poll(false).ok());  // some are in flight now
  }
  EXPECT_EQ(callbacks, 8);  // every transfer told, none left pending
}

TEST_P(EngineTest, UnwritablePathAndMissingDirectoryGiveOneClearError) {
  OpenOptions o;
  auto f = File::Open(dir_.File("no/such/dir/file"), o);
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), StatusCode::kNotFound);
  EXPECT_NE(f.status().message().find("no/such/dir/file"), std::string_view::npos);
  // A symbolic link is refused (O_NOFOLLOW).
  ASSERT_EQ(symlink("/etc/hostname", dir_.File("link").c_str()), 0);
  auto l = File::Open(dir_.File("link"), o);
  ASSERT_FALSE(l.ok());
  EXPECT_NE(l.status().message().find("symbolic link"), std::string_view::npos)
      << l.status().ToString();
}

TEST_P(EngineTest, TmpfsWithDirectIoEitherWorksOrSaysWhy) {
  // /dev/shm is tmpfs; kernels before 6.6 refuse O_DIRECT there.
  if (access("/dev/shm", W_OK) != 0) GTEST_SKIP() << "no writable /dev/shm";
  std::string path = "/dev/shm/ztier_engine_test_" + std::to_string(getpid());
  OpenOptions o;
  auto f = File::Open(path, o);
  if (!f.ok()) {
    EXPECT_NE(f.status().message().find("O_DIRECT"), std::string_view::npos)
        << f.status().ToString();
    return;
  }
  auto sf = StripedFile::FromFiles([&] {
    std::vector<std::unique_ptr<File>> v;
    v.push_back(std::move(f).value());
    return v;
  }(), kMiB);
  ASSERT_TRUE(sf.ok());
  auto engine = NewEngine();
  AlignedBuffer buf = MakeAligned(kMiB);
  FillPattern(buf.get(), kMiB, 21);
  Status w = engine->Write(**sf, 0, kMiB, buf.get());
  Status r = w.ok() ? engine->Read(**sf, 0, kMiB, buf.get()) : w;
  unlink(path.c_str());
  if (r.ok()) {
    EXPECT_EQ(FirstMismatch(buf.get(), kMiB, 21), -1);
  } else {
    EXPECT_FALSE(r.message().empty());
  }
}

INSTANTIATE_TEST_SUITE_P(AllBackends, EngineTest,
                         ::testing::Values(BackendKind::kIoUring, BackendKind::kLibaio,
                                           BackendKind::kPsync),
                         [](const auto& info) {
                           return std::string(BackendKindName(info.param));
                         });

}  // namespace
}  // namespace ztier::io
