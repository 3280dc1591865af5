// AsyncEngine: transfers submitted from several threads complete on the I/O
// thread; validation errors come back from Submit; Drain waits for all.
#include "io/async_engine.h"

#include <atomic>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "io/fault_backend.h"
#include "tests/testutil/testutil.h"

namespace ztier::io {
namespace {

using ztier::testing::FillPattern;
using ztier::testing::FirstMismatch;
using ztier::testing::MakeAligned;
using ztier::testing::ScratchDir;

constexpr uint64_t kKiB = 1024;

std::unique_ptr<AsyncEngine> NewAsync(std::unique_ptr<Backend> backend) {
  auto e = Engine::Create(std::move(backend), EngineOptions{.block_size = 64 * kKiB,
                                                            .queue_depth = 8});
  EXPECT_TRUE(e.ok());
  auto a = AsyncEngine::Create(std::move(e).value());
  EXPECT_TRUE(a.ok());
  return std::move(a).value();
}

TEST(AsyncEngineTest, ManyThreadsSubmitAndAllComplete) {
  ScratchDir dir;
  auto file = StripedFile::Open({dir.File("f")}, 64 * kKiB, OpenOptions{});
  ASSERT_TRUE(file.ok());
  auto engine = NewAsync(CreateBackend(BackendKind::kAuto, BackendOptions{}).value());
  constexpr int kThreads = 4, kEach = 50;
  constexpr uint64_t kLen = 16 * kKiB;
  auto buf = MakeAligned(kThreads * kEach * kLen);
  FillPattern(buf.get(), kThreads * kEach * kLen, 3);
  std::atomic<int> ok{0}, bad{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kEach; ++i) {
        uint64_t off = (t * kEach + i) * kLen;
        Status s = engine->Submit({Op::kWrite, file->get(), off, kLen, buf.get() + off,
                                   [&](const Status& st) { (st.ok() ? ok : bad)++; }});
        if (!s.ok()) bad++;
      }
    });
  }
  for (auto& th : threads) th.join();
  engine->Drain();
  EXPECT_EQ(ok.load(), kThreads * kEach);
  EXPECT_EQ(bad.load(), 0);
  auto back = MakeAligned(kThreads * kEach * kLen);
  std::atomic<bool> read_ok{false};
  ASSERT_TRUE(engine->Submit({Op::kRead, file->get(), 0, kThreads * kEach * kLen, back.get(),
                              [&](const Status& s) { read_ok = s.ok(); }})
                  .ok());
  engine->Drain();
  EXPECT_TRUE(read_ok.load());
  EXPECT_EQ(FirstMismatch(back.get(), kThreads * kEach * kLen, 3), -1);
  EXPECT_GE(engine->stats().requests, static_cast<uint64_t>(kThreads * kEach));
}

TEST(AsyncEngineTest, MisalignedTransferIsRejectedBySubmit) {
  ScratchDir dir;
  auto file = StripedFile::Open({dir.File("f")}, 64 * kKiB, OpenOptions{});
  ASSERT_TRUE(file.ok());
  auto engine = NewAsync(CreatePsyncBackend(BackendOptions{}).value());
  auto buf = MakeAligned(8192);
  bool called = false;
  Status s = engine->Submit({Op::kRead, file->get(), 1, 4096, buf.get(),
                             [&](const Status&) { called = true; }});
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("file offset"), std::string_view::npos) << s.ToString();
  engine->Drain();
  EXPECT_FALSE(called);
}

TEST(AsyncEngineTest, FailedTransferReportsAndEngineContinues) {
  ScratchDir dir;
  auto file = StripedFile::Open({dir.File("f")}, 64 * kKiB, OpenOptions{});
  ASSERT_TRUE(file.ok());
  auto fb = std::make_unique<FaultInjectingBackend>(CreatePsyncBackend(BackendOptions{}).value());
  fb->AddFault({FaultKind::kEio, 0, 1});
  auto engine = NewAsync(std::move(fb));
  auto buf = MakeAligned(64 * kKiB);
  std::vector<Status> results(2);
  for (int i = 0; i < 2; ++i) {
    ASSERT_TRUE(engine->Submit({Op::kWrite, file->get(), 0, 64 * kKiB, buf.get(),
                                [&, i](const Status& s) { results[i] = s; }})
                    .ok());
    engine->Drain();
  }
  EXPECT_EQ(results[0].err(), EIO);
  EXPECT_TRUE(results[1].ok());
  EXPECT_TRUE(engine->backend_status().ok());
}

}  // namespace
}  // namespace ztier::io
