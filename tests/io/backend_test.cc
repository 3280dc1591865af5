// The backend suite: every case runs on io_uring, libaio and psync, skipping
// with the reason where this build or machine lacks one. psync is the
// reference: the others must return the same bytes and the same results.
// Files live under ScratchDir (a real disk: O_DIRECT), opened with open(2)
// so that this suite depends on nothing above the backends.
//
// The factory tests at the end run in forked children that install a seccomp
// filter (and, for the sysctl case, a private mount namespace) to make a
// backend unavailable without touching the machine.
#include "io/backend.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "base/log.h"
#include "tests/testutil/testutil.h"

namespace ztier::io {
namespace {

using ztier::testing::AlignedBuffer;
using ztier::testing::FillPattern;
using ztier::testing::FirstMismatch;
using ztier::testing::MakeAligned;
using ztier::testing::ScratchDir;

constexpr uint32_t kKiB = 1024;
constexpr uint32_t kBlock = 4 * kKiB;  // direct-I/O unit used throughout

// An fd closed on scope exit.
class Fd {
 public:
  explicit Fd(int fd = -1) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

int OpenFile(const std::string& path, bool direct, int access = O_RDWR) {
  return ::open(path.c_str(),
                access | O_CREAT | O_CLOEXEC | (direct ? O_DIRECT : 0), 0600);
}

Request Read(int fd, uint64_t offset, uint32_t length, void* buf,
             uint64_t user_data) {
  return Request{Op::kRead, fd, offset, length, buf, user_data, -1};
}
Request Write(int fd, uint64_t offset, uint32_t length, void* buf,
              uint64_t user_data) {
  return Request{Op::kWrite, fd, offset, length, buf, user_data, -1};
}

// Submits every request, reaping whenever the queue is full, and returns all
// completions keyed by user_data. A submit error fails the test.
std::map<uint64_t, int64_t> RunAll(Backend& b, std::span<const Request> reqs) {
  std::map<uint64_t, int64_t> results;
  std::vector<Completion> out(64);
  size_t next = 0;
  while (next < reqs.size() || b.in_flight() > 0) {
    bool stalled = true;
    if (next < reqs.size()) {
      const int r = b.Submit(reqs.subspan(next));
      if (r < 0) {
        ADD_FAILURE() << b.name() << ": Submit failed: errno " << -r;
        break;
      }
      EXPECT_LE(b.in_flight(), 64u);
      next += static_cast<size_t>(r);
      stalled = next < reqs.size();  // queue full: must reap to go on
    }
    if (b.in_flight() == 0) continue;
    const uint32_t min = stalled ? 1 : 0;
    const int n = b.Reap(out, min);
    if (n < 0) {
      ADD_FAILURE() << b.name() << ": Reap failed: errno " << -n;
      break;
    }
    for (int i = 0; i < n; ++i) {
      EXPECT_TRUE(results.emplace(out[i].user_data, out[i].result).second)
          << "user_data " << out[i].user_data << " completed twice";
    }
  }
  return results;
}

// Runs one request; its result, or the submit error.
int64_t RunOne(Backend& b, const Request& req) {
  const int r = b.Submit(std::span<const Request>(&req, 1));
  if (r < 0) return r;
  EXPECT_EQ(r, 1);
  Completion c;
  const int n = b.Reap(std::span<Completion>(&c, 1), 1);
  EXPECT_EQ(n, 1);
  EXPECT_EQ(c.user_data, req.user_data);
  return c.result;
}

std::unique_ptr<Backend> MustCreate(BackendKind kind, BackendOptions o = {}) {
  Result<std::unique_ptr<Backend>> b = CreateBackend(kind, o);
  EXPECT_TRUE(b.ok()) << b.status().ToString();
  return b.ok() ? std::move(b).value() : nullptr;
}

class BackendTest : public ::testing::TestWithParam<BackendKind> {
 protected:
  void SetUp() override {
    kind_ = GetParam();
    if (!BackendCompiled(kind_)) {
      GTEST_SKIP() << BackendKindName(kind_) << " not compiled in";
    }
    Result<std::unique_ptr<Backend>> probe = CreateBackend(kind_, {});
    if (!probe.ok()) GTEST_SKIP() << probe.status().ToString();
  }

  std::unique_ptr<Backend> Make(uint32_t queue_depth,
                                uint32_t psync_threads = 0) {
    BackendOptions o;
    o.queue_depth = queue_depth;
    o.psync_threads = psync_threads;
    return MustCreate(kind_, o);
  }

  // A file of `bytes` holding FillPattern(seed), written with pwrite.
  void Prepare(int fd, size_t bytes, uint64_t seed) {
    AlignedBuffer data = MakeAligned(bytes);
    FillPattern(data.get(), bytes, seed);
    ASSERT_EQ(::pwrite(fd, data.get(), bytes, 0), static_cast<ssize_t>(bytes));
  }

  BackendKind kind_ = BackendKind::kAuto;
  ScratchDir dir_;
};

TEST_P(BackendTest, WriteThenReadBackAlignedDirect) {
  constexpr uint32_t kLen = 64 * kKiB;
  constexpr uint32_t kCount = 16;
  Fd fd(OpenFile(dir_.File("data"), /*direct=*/true));
  ASSERT_GE(fd.get(), 0) << strerror(errno);
  auto b = Make(32);
  ASSERT_NE(b, nullptr);

  AlignedBuffer src = MakeAligned(kLen * kCount);
  FillPattern(src.get(), kLen * kCount, /*seed=*/7);
  std::vector<Request> writes;
  for (uint32_t i = 0; i < kCount; ++i) {
    writes.push_back(Write(fd.get(), uint64_t{i} * kLen, kLen,
                           src.get() + size_t{i} * kLen, i));
  }
  // One batch: the whole set fits the queue.
  ASSERT_EQ(b->Submit(writes), static_cast<int>(kCount));
  EXPECT_EQ(b->in_flight(), kCount);
  std::vector<Completion> out(kCount);
  std::set<uint64_t> seen;
  while (seen.size() < kCount) {
    const int n = b->Reap(out, 1);
    ASSERT_GT(n, 0);
    for (int i = 0; i < n; ++i) {
      EXPECT_EQ(out[i].result, kLen) << "write " << out[i].user_data;
      EXPECT_TRUE(seen.insert(out[i].user_data).second);
    }
  }
  EXPECT_EQ(b->in_flight(), 0u);

  // Read back in reverse order into a fresh buffer.
  AlignedBuffer dst = MakeAligned(kLen * kCount);
  std::vector<Request> reads;
  for (uint32_t i = kCount; i > 0; --i) {
    const uint32_t k = i - 1;
    reads.push_back(Read(fd.get(), uint64_t{k} * kLen, kLen,
                         dst.get() + size_t{k} * kLen, 100 + k));
  }
  const auto results = RunAll(*b, reads);
  ASSERT_EQ(results.size(), kCount);
  for (const auto& [ud, res] : results) EXPECT_EQ(res, kLen) << ud;
  EXPECT_EQ(FirstMismatch(dst.get(), kLen * kCount, 7), -1);
}

TEST_P(BackendTest, FullQueueDepthAndManyRequests) {
  constexpr uint32_t kDepth = 64;
  constexpr uint32_t kLen = 16 * kKiB;
  constexpr size_t kFile = size_t{kDepth} * kLen;  // 1 MiB
  Fd fd(OpenFile(dir_.File("data"), /*direct=*/true));
  ASSERT_GE(fd.get(), 0) << strerror(errno);
  auto b = Make(kDepth);
  ASSERT_NE(b, nullptr);

  AlignedBuffer src = MakeAligned(kFile);
  FillPattern(src.get(), kFile, /*seed=*/11);
  std::vector<Request> writes;
  for (uint32_t i = 0; i <= kDepth; ++i) {
    // One more than the queue holds: the last must be refused for now.
    const uint32_t k = i % kDepth;
    writes.push_back(Write(fd.get(), uint64_t{k} * kLen, kLen,
                           src.get() + size_t{k} * kLen, i));
  }
  ASSERT_EQ(b->Submit(writes), static_cast<int>(kDepth));
  EXPECT_EQ(b->in_flight(), kDepth);
  EXPECT_EQ(b->Submit(std::span<const Request>(writes).subspan(kDepth)), 0);
  std::vector<Completion> out(kDepth);
  int n = b->Reap(out, 1);
  ASSERT_GE(n, 1);
  uint32_t reaped = static_cast<uint32_t>(n);
  EXPECT_EQ(b->in_flight(), kDepth - reaped);
  // Room again: the 65th goes in (rewriting block 0 with the same bytes).
  EXPECT_EQ(b->Submit(std::span<const Request>(writes).subspan(kDepth)), 1);
  for (int i = 0; i < n; ++i) EXPECT_EQ(out[i].result, kLen);
  while (b->in_flight() > 0) {
    n = b->Reap(out, b->in_flight());
    ASSERT_GT(n, 0);
    for (int i = 0; i < n; ++i) EXPECT_EQ(out[i].result, kLen);
    reaped += static_cast<uint32_t>(n);
  }
  EXPECT_EQ(reaped, kDepth + 1);

  // Many rounds of random reads keep the queue full and land correctly.
  std::mt19937_64 rng(42);
  constexpr uint32_t kReads = 1000;
  AlignedBuffer dst = MakeAligned(size_t{kReads} * kBlock);
  std::vector<Request> reads;
  std::vector<uint64_t> offsets;
  for (uint32_t i = 0; i < kReads; ++i) {
    const uint64_t off = (rng() % (kFile / kBlock)) * kBlock;
    offsets.push_back(off);
    reads.push_back(
        Read(fd.get(), off, kBlock, dst.get() + size_t{i} * kBlock, i));
  }
  const auto results = RunAll(*b, reads);
  ASSERT_EQ(results.size(), kReads);
  for (uint32_t i = 0; i < kReads; ++i) {
    ASSERT_EQ(results.at(i), kBlock) << "read " << i;
    ASSERT_EQ(
        FirstMismatch(dst.get() + size_t{i} * kBlock, kBlock, 11, offsets[i]),
        -1)
        << "read " << i << " at offset " << offsets[i];
  }
}

TEST_P(BackendTest, MatchesPsyncByteForByte) {
  constexpr size_t kFile = 4u << 20;  // bytes
  Fd fd(OpenFile(dir_.File("data"), /*direct=*/true));
  ASSERT_GE(fd.get(), 0) << strerror(errno);
  auto b = Make(32);
  auto ref = MustCreate(BackendKind::kPsync, BackendOptions{});
  ASSERT_NE(b, nullptr);
  ASSERT_NE(ref, nullptr);

  // The file image, kept in memory as the model of what is on disk.
  AlignedBuffer image = MakeAligned(kFile);
  FillPattern(image.get(), kFile, /*seed=*/3);
  {
    std::vector<Request> w;
    for (size_t off = 0; off < kFile; off += 256 * kKiB) {
      w.push_back(Write(fd.get(), off, 256 * kKiB, image.get() + off, off));
    }
    for (const auto& [ud, res] : RunAll(*ref, w)) EXPECT_EQ(res, 256 * kKiB);
  }

  // Random ranges, some running past the end of the file (short reads).
  std::mt19937_64 rng(5);
  constexpr uint32_t kReads = 200;
  constexpr uint32_t kMaxLen = 32 * kBlock;
  AlignedBuffer got = MakeAligned(size_t{kReads} * kMaxLen);
  AlignedBuffer want = MakeAligned(size_t{kReads} * kMaxLen);
  std::vector<Request> r_test, r_ref;
  for (uint32_t i = 0; i < kReads; ++i) {
    const uint64_t off = (rng() % (kFile / kBlock)) * kBlock;
    const uint32_t len = static_cast<uint32_t>(1 + rng() % 32) * kBlock;
    r_test.push_back(
        Read(fd.get(), off, len, got.get() + size_t{i} * kMaxLen, i));
    r_ref.push_back(
        Read(fd.get(), off, len, want.get() + size_t{i} * kMaxLen, i));
  }
  const auto res_test = RunAll(*b, r_test);
  const auto res_ref = RunAll(*ref, r_ref);
  ASSERT_EQ(res_test.size(), kReads);
  ASSERT_EQ(res_ref.size(), kReads);
  int short_reads = 0;
  for (uint32_t i = 0; i < kReads; ++i) {
    ASSERT_EQ(res_test.at(i), res_ref.at(i)) << "read " << i;
    const uint64_t expect =
        std::min<uint64_t>(r_ref[i].length, kFile - r_ref[i].offset);
    ASSERT_EQ(static_cast<uint64_t>(res_ref.at(i)), expect) << "read " << i;
    if (expect < r_ref[i].length) ++short_reads;
    ASSERT_EQ(memcmp(got.get() + size_t{i} * kMaxLen,
                     want.get() + size_t{i} * kMaxLen, expect),
              0)
        << "read " << i;
    ASSERT_EQ(memcmp(got.get() + size_t{i} * kMaxLen,
                     image.get() + r_ref[i].offset, expect),
              0)
        << "read " << i;
  }
  RecordProperty("short_reads", short_reads);

  // Writes through the backend under test, read back through psync.
  AlignedBuffer fresh = MakeAligned(kFile);
  FillPattern(fresh.get(), kFile, /*seed=*/9);
  std::vector<Request> w;
  for (uint32_t i = 0; i < 100; ++i) {
    const uint64_t off = (rng() % (kFile / kBlock - 16)) * kBlock;
    const uint32_t len = static_cast<uint32_t>(1 + rng() % 16) * kBlock;
    // Overlapping writes in flight together may land in any order; each
    // carries `fresh`'s bytes for its own offsets, so every order agrees.
    memcpy(image.get() + off, fresh.get() + off, len);
    w.push_back(Write(fd.get(), off, len, fresh.get() + off, i));
  }
  for (const auto& [ud, res] : RunAll(*b, w)) {
    EXPECT_EQ(res, w[ud].length) << "write " << ud;
  }
  AlignedBuffer back = MakeAligned(kFile);
  std::vector<Request> r;
  for (size_t off = 0; off < kFile; off += 512 * kKiB) {
    r.push_back(Read(fd.get(), off, 512 * kKiB, back.get() + off, off));
  }
  for (const auto& [ud, res] : RunAll(*ref, r)) EXPECT_EQ(res, 512 * kKiB);
  EXPECT_EQ(memcmp(back.get(), image.get(), kFile), 0);
}

TEST_P(BackendTest, ResultsAreBytesOrNegativeErrno) {
  Fd fd(OpenFile(dir_.File("data"), /*direct=*/true));
  ASSERT_GE(fd.get(), 0) << strerror(errno);
  ASSERT_NO_FATAL_FAILURE(Prepare(fd.get(), 16 * kBlock, 1));
  Fd ro(OpenFile(dir_.File("data"), /*direct=*/true, O_RDONLY));
  ASSERT_GE(ro.get(), 0) << strerror(errno);
  auto b = Make(8);
  auto ref = MustCreate(BackendKind::kPsync, BackendOptions{});
  ASSERT_NE(b, nullptr);
  ASSERT_NE(ref, nullptr);
  AlignedBuffer buf = MakeAligned(4 * kBlock);

  // A bad fd: -EBADF, either as the request's result or as the submit error.
  EXPECT_EQ(RunOne(*b, Read(-1, 0, kBlock, buf.get(), 1)), -EBADF);
  EXPECT_EQ(b->in_flight(), 0u);
  // Writing through a read-only fd.
  EXPECT_EQ(RunOne(*b, Write(ro.get(), 0, kBlock, buf.get(), 2)), -EBADF);
  // O_DIRECT with a misaligned file offset or length.
  EXPECT_EQ(RunOne(*b, Read(fd.get(), 1, kBlock, buf.get(), 3)), -EINVAL);
  EXPECT_EQ(RunOne(*b, Read(fd.get(), 0, kBlock + 1, buf.get(), 4)), -EINVAL);
  // A misaligned buffer: -EINVAL unless the device accepts any address
  // alignment; whatever the kernel says, every backend must say the same.
  const int64_t misaligned_buf =
      RunOne(*b, Read(fd.get(), 0, kBlock, buf.get() + 1, 5));
  EXPECT_EQ(misaligned_buf,
            RunOne(*ref, Read(fd.get(), 0, kBlock, buf.get() + 1, 5)));
  EXPECT_TRUE(misaligned_buf == -EINVAL || misaligned_buf == kBlock)
      << misaligned_buf;
  RecordProperty("misaligned_buffer_result", std::to_string(misaligned_buf));
  // End of file: a read across it is short, one at it returns 0 bytes.
  EXPECT_EQ(RunOne(*b, Read(fd.get(), 14 * kBlock, 4 * kBlock, buf.get(), 6)),
            2 * kBlock);
  EXPECT_EQ(RunOne(*b, Read(fd.get(), 16 * kBlock, kBlock, buf.get(), 7)), 0);
  EXPECT_EQ(FirstMismatch(buf.get(), 2 * kBlock, 1, 14 * kBlock), -1);
  // The backend is still usable after errors.
  EXPECT_EQ(RunOne(*b, Read(fd.get(), 0, kBlock, buf.get(), 8)), kBlock);
  EXPECT_EQ(b->in_flight(), 0u);

  // A batch mixing good and bad requests: each gets its own result.
  std::vector<Request> mixed = {
      Read(fd.get(), 0, kBlock, buf.get(), 10),
      Read(-1, 0, kBlock, buf.get() + kBlock, 11),
      Read(fd.get(), 3, kBlock, buf.get() + 2 * kBlock, 12),
      Read(fd.get(), kBlock, kBlock, buf.get() + 3 * kBlock, 13),
  };
  const auto res = RunAll(*b, mixed);
  ASSERT_EQ(res.size(), 4u);
  EXPECT_EQ(res.at(10), kBlock);
  EXPECT_EQ(res.at(11), -EBADF);
  EXPECT_EQ(res.at(12), -EINVAL);
  EXPECT_EQ(res.at(13), kBlock);
}

TEST_P(BackendTest, ReapArgumentsAndIdleBackend) {
  auto b = Make(4);
  ASSERT_NE(b, nullptr);
  std::vector<Completion> out(4);
  EXPECT_EQ(b->Reap(out, 0), 0);        // nothing in flight: no block
  EXPECT_EQ(b->Reap(out, 1), -EINVAL);  // would wait forever
  EXPECT_EQ(b->Submit({}), 0);
  EXPECT_TRUE(b->Cancel().empty());
  EXPECT_EQ(b->in_flight(), 0u);
}

TEST_P(BackendTest, RegisteredBuffersAndFiles) {
  constexpr uint32_t kHalf = 128 * kKiB;  // two halves: 256 KiB locked
  Fd fd(OpenFile(dir_.File("a"), /*direct=*/true));
  Fd other(OpenFile(dir_.File("b"), /*direct=*/true));
  ASSERT_GE(fd.get(), 0) << strerror(errno);
  ASSERT_GE(other.get(), 0) << strerror(errno);
  auto b = Make(8);
  ASSERT_NE(b, nullptr);

  AlignedBuffer region = MakeAligned(2 * kHalf);
  uint8_t* src = region.get();
  uint8_t* dst = region.get() + kHalf;
  const iovec iov[2] = {{src, kHalf}, {dst, kHalf}};
  ASSERT_EQ(b->RegisterBuffers(iov), 0);
  const int fds[1] = {fd.get()};
  ASSERT_EQ(b->RegisterFiles(fds), 0);

  FillPattern(src, kHalf, /*seed=*/21);
  std::vector<Request> w;
  for (uint32_t i = 0; i < 4; ++i) {
    Request r = Write(fd.get(), uint64_t{i} * 32 * kKiB, 32 * kKiB,
                      src + size_t{i} * 32 * kKiB, i);
    r.buf_index = 0;
    w.push_back(r);
  }
  for (const auto& [ud, res] : RunAll(*b, w)) EXPECT_EQ(res, 32 * kKiB);
  // Mixed: a registered-buffer read and a plain one.
  Request r0 = Read(fd.get(), 0, 64 * kKiB, dst, 10);
  r0.buf_index = 1;
  Request r1 = Read(fd.get(), 64 * kKiB, 64 * kKiB, dst + 64 * kKiB, 11);
  const std::vector<Request> reads = {r0, r1};
  for (const auto& [ud, res] : RunAll(*b, reads)) EXPECT_EQ(res, 64 * kKiB);
  EXPECT_EQ(memcmp(src, dst, kHalf), 0);

  if (kind_ == BackendKind::kIoUring) {
    // A buffer outside the registered one it names: io_uring checks it
    // (EFAULT), which shows the fixed-buffer path is taken.
    AlignedBuffer outside = MakeAligned(kBlock);
    Request bad = Read(fd.get(), 0, kBlock, outside.get(), 20);
    bad.buf_index = 0;
    EXPECT_EQ(RunOne(*b, bad), -EFAULT);

    // Point the fd number at another file: the ring still holds the file
    // that was registered, so reads through it see file a, not file b.
    ASSERT_NO_FATAL_FAILURE(Prepare(other.get(), kBlock, /*seed=*/99));
    const int saved = ::dup(fd.get());
    ASSERT_GE(saved, 0);
    ASSERT_EQ(::dup2(other.get(), fd.get()), fd.get());
    AlignedBuffer seen = MakeAligned(kBlock);
    EXPECT_EQ(RunOne(*b, Read(fd.get(), 0, kBlock, seen.get(), 21)), kBlock);
    EXPECT_EQ(FirstMismatch(seen.get(), kBlock, 21), -1)
        << "read went to the current fd, not the registered file";
    ASSERT_EQ(::dup2(saved, fd.get()), fd.get());
    ::close(saved);
  }

  EXPECT_EQ(b->UnregisterFiles(), 0);
  EXPECT_EQ(b->UnregisterBuffers(), 0);
  // Plain requests work after unregistering.
  memset(dst, 0, kHalf);
  Request again = Read(fd.get(), 0, kHalf, dst, 30);
  EXPECT_EQ(RunOne(*b, again), kHalf);
  EXPECT_EQ(memcmp(src, dst, kHalf), 0);
}

TEST_P(BackendTest, CancelReturnsEveryRequestInFlight) {
  constexpr uint32_t kDepth = 64;
  constexpr uint32_t kLen = 128 * kKiB;
  Fd fd(OpenFile(dir_.File("data"), /*direct=*/true));
  ASSERT_GE(fd.get(), 0) << strerror(errno);
  ASSERT_NO_FATAL_FAILURE(Prepare(fd.get(), size_t{kDepth} * kLen, 4));
  // Few psync workers, so that most requests are still queued.
  auto b = Make(kDepth, /*psync_threads=*/2);
  ASSERT_NE(b, nullptr);
  AlignedBuffer dst = MakeAligned(size_t{kDepth} * kLen);

  for (int round = 0; round < 3; ++round) {
    std::vector<Request> reqs;
    for (uint32_t i = 0; i < kDepth; ++i) {
      reqs.push_back(Read(fd.get(), uint64_t{i} * kLen, kLen,
                          dst.get() + size_t{i} * kLen, 1000 * round + i));
    }
    ASSERT_EQ(b->Submit(reqs), static_cast<int>(kDepth));
    const std::vector<Completion> done = b->Cancel();
    EXPECT_EQ(b->in_flight(), 0u);
    ASSERT_EQ(done.size(), kDepth);
    std::set<uint64_t> ids;
    int cancelled = 0;
    for (const Completion& c : done) {
      EXPECT_TRUE(ids.insert(c.user_data).second) << c.user_data;
      EXPECT_TRUE(c.result == kLen || c.result == -ECANCELED) << c.result;
      if (c.result == -ECANCELED) ++cancelled;
      const uint64_t i = c.user_data - 1000 * round;
      ASSERT_LT(i, kDepth);
      if (c.result == kLen) {
        EXPECT_EQ(FirstMismatch(dst.get() + i * kLen, kLen, 4, i * kLen), -1);
      }
    }
    RecordProperty("cancelled_round_" + std::to_string(round), cancelled);
  }
  // Usable afterwards.
  EXPECT_EQ(RunOne(*b, Read(fd.get(), 0, kLen, dst.get(), 7)), kLen);
}

TEST_P(BackendTest, CancelInterruptsARequestThatWouldNeverEnd) {
  // Only io_uring reads a pipe asynchronously; libaio refuses pipes and
  // psync's pread fails at once (ESPIPE), so neither can block here.
  if (kind_ != BackendKind::kIoUring) {
    GTEST_SKIP() << "only io_uring can hold a read on an empty pipe";
  }
  int p[2];
  ASSERT_EQ(pipe2(p, O_CLOEXEC), 0);
  Fd rd(p[0]), wr(p[1]);
  char buf[64];
  {
    auto b = Make(4);
    ASSERT_NE(b, nullptr);
    ASSERT_EQ(RunOne(*b, Write(wr.get(), 0, 3, const_cast<char*>("abc"), 1)),
              3);
    ASSERT_EQ(RunOne(*b, Read(rd.get(), 0, sizeof(buf), buf, 2)), 3);
    const Request blocked = Read(rd.get(), 0, sizeof(buf), buf, 42);
    ASSERT_EQ(b->Submit(std::span<const Request>(&blocked, 1)), 1);
    std::vector<Completion> none(1);
    EXPECT_EQ(b->Reap(none, 0), 0);  // still waiting for data
    const std::vector<Completion> done = b->Cancel();
    ASSERT_EQ(done.size(), 1u);  // the cancel op's own CQE is not shown
    EXPECT_EQ(done[0].user_data, 42u);
    EXPECT_EQ(done[0].result, -ECANCELED);
    EXPECT_EQ(b->in_flight(), 0u);
    // Once more, left to the destructor, which must not hang.
    ASSERT_EQ(b->Submit(std::span<const Request>(&blocked, 1)), 1);
  }
}

TEST_P(BackendTest, DestroyWithRequestsInFlight) {
  constexpr uint32_t kLen = 64 * kKiB;
  Fd fd(OpenFile(dir_.File("data"), /*direct=*/true));
  ASSERT_GE(fd.get(), 0) << strerror(errno);
  // Declared before the backend: outlives it, as the contract requires.
  AlignedBuffer src = MakeAligned(32 * kLen);
  FillPattern(src.get(), 32 * kLen, 8);
  {
    auto b = Make(32, /*psync_threads=*/2);
    ASSERT_NE(b, nullptr);
    std::vector<Request> w;
    for (uint32_t i = 0; i < 32; ++i) {
      w.push_back(Write(fd.get(), uint64_t{i} * kLen, kLen,
                        src.get() + size_t{i} * kLen, i));
    }
    ASSERT_EQ(b->Submit(w), 32);
  }  // destructor: cancels and waits; sanitizers check nothing runs after
  // Nothing is still writing: the file holds, per block, the data or nothing.
  AlignedBuffer back = MakeAligned(32 * kLen);
  const ssize_t n = ::pread(fd.get(), back.get(), 32 * kLen, 0);
  ASSERT_GE(n, 0);
  EXPECT_EQ(n % kLen, 0);
}

INSTANTIATE_TEST_SUITE_P(AllBackends, BackendTest,
                         ::testing::Values(BackendKind::kIoUring,
                                           BackendKind::kLibaio,
                                           BackendKind::kPsync),
                         [](const ::testing::TestParamInfo<BackendKind>& info) {
                           return std::string(BackendKindName(info.param));
                         });

// ---------------------------------------------------------------- factory

TEST(BackendNames, ParseAndPrint) {
  EXPECT_EQ(OpName(Op::kRead), "read");
  EXPECT_EQ(OpName(Op::kWrite), "write");
  const std::pair<const char*, BackendKind> cases[] = {
      {"auto", BackendKind::kAuto},        {"io_uring", BackendKind::kIoUring},
      {"uring", BackendKind::kIoUring},    {"libaio", BackendKind::kLibaio},
      {"aio", BackendKind::kLibaio},       {"psync", BackendKind::kPsync},
      {"IO_URING", BackendKind::kIoUring},
  };
  for (const auto& [text, kind] : cases) {
    Result<BackendKind> k = ParseBackendKind(text);
    ASSERT_TRUE(k.ok()) << text;
    EXPECT_EQ(*k, kind) << text;
  }
  for (BackendKind k : {BackendKind::kAuto, BackendKind::kIoUring,
                        BackendKind::kLibaio, BackendKind::kPsync}) {
    Result<BackendKind> back = ParseBackendKind(BackendKindName(k));
    ASSERT_TRUE(back.ok());
    EXPECT_EQ(*back, k);
  }
  Result<BackendKind> bad = ParseBackendKind("spdk");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  const std::string msg(bad.status().message());
  for (const char* name : {"spdk", "auto", "io_uring", "libaio", "psync"}) {
    EXPECT_NE(msg.find(name), std::string::npos) << msg;
  }
}

// Captures log messages for the duration of a scope.
class LogCapture {
 public:
  LogCapture() {
    SetLogSink(
        [this](LogLevel, std::string_view m) {
          std::lock_guard<std::mutex> lock(mu_);
          text_ += std::string(m) + "\n";
        },
        LogLevel::kInfo);
  }
  ~LogCapture() { SetLogSink(nullptr); }
  std::string text() {
    std::lock_guard<std::mutex> lock(mu_);
    return text_;
  }

 private:
  std::mutex mu_;
  std::string text_;
};

TEST(BackendFactory, AutoPicksTheFirstAvailableAndSaysSo) {
  LogCapture logs;
  Result<std::unique_ptr<Backend>> uring = CreateIoUringBackend({});
  const bool uring_works = uring.ok();
  uring = Status::Unavailable("released");  // one ring at a time
  Result<std::unique_ptr<Backend>> b = CreateBackend(BackendKind::kAuto, {});
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  if (uring_works) {
    EXPECT_EQ((*b)->kind(), BackendKind::kIoUring);
  } else {
    EXPECT_NE((*b)->kind(), BackendKind::kIoUring);
    EXPECT_NE(logs.text().find("io_uring skipped"), std::string::npos)
        << logs.text();
  }
  EXPECT_NE(logs.text().find(std::string((*b)->name()) + " (auto"),
            std::string::npos)
      << logs.text();
}

TEST(BackendFactory, NotCompiledInIsUnavailable) {
  int checked = 0;
  for (BackendKind k : {BackendKind::kIoUring, BackendKind::kLibaio}) {
    if (BackendCompiled(k)) continue;
    ++checked;
    Result<std::unique_ptr<Backend>> b = CreateBackend(k, {});
    ASSERT_FALSE(b.ok());
    EXPECT_EQ(b.status().code(), StatusCode::kUnavailable);
    EXPECT_NE(b.status().message().find("not compiled in"),
              std::string_view::npos)
        << b.status().ToString();
  }
  EXPECT_TRUE(BackendCompiled(BackendKind::kPsync));
  if (checked == 0) GTEST_SKIP() << "every backend is compiled in";
}

TEST(BackendFactory, ZeroQueueDepthIsInvalid) {
  BackendOptions o;
  o.queue_depth = 0;
  for (BackendKind k : {BackendKind::kAuto, BackendKind::kIoUring,
                        BackendKind::kLibaio, BackendKind::kPsync}) {
    Result<std::unique_ptr<Backend>> b = CreateBackend(k, o);
    ASSERT_FALSE(b.ok());
    EXPECT_EQ(b.status().code(), StatusCode::kInvalidArgument)
        << b.status().ToString();
  }
}

TEST(BackendFactory, SqpollRoundTrip) {
  if (!BackendCompiled(BackendKind::kIoUring)) GTEST_SKIP() << "no io_uring";
  BackendOptions o;
  o.queue_depth = 8;
  o.sqpoll = true;
  o.sqpoll_idle_ms = 50;
  Result<std::unique_ptr<Backend>> b = CreateIoUringBackend(o);
  if (!b.ok()) {
    ASSERT_EQ(b.status().code(), StatusCode::kUnavailable);
    GTEST_SKIP() << b.status().ToString();
  }
  ScratchDir dir;
  Fd fd(OpenFile(dir.File("data"), /*direct=*/true));
  ASSERT_GE(fd.get(), 0);
  AlignedBuffer src = MakeAligned(8 * kBlock);
  AlignedBuffer dst = MakeAligned(8 * kBlock);
  FillPattern(src.get(), 8 * kBlock, 31);
  std::vector<Request> w, r;
  for (uint32_t i = 0; i < 8; ++i) {
    w.push_back(Write(fd.get(), uint64_t{i} * kBlock, kBlock,
                      src.get() + size_t{i} * kBlock, i));
    r.push_back(Read(fd.get(), uint64_t{i} * kBlock, kBlock,
                     dst.get() + size_t{i} * kBlock, i));
  }
  for (const auto& [ud, res] : RunAll(**b, w)) EXPECT_EQ(res, kBlock);
  for (const auto& [ud, res] : RunAll(**b, r)) EXPECT_EQ(res, kBlock);
  EXPECT_EQ(memcmp(src.get(), dst.get(), 8 * kBlock), 0);
}

// --- unavailable backends, simulated in a child process ---

struct Deny {
  long syscall_nr;
  int err;  // errno the filter returns
};

// Makes the listed system calls fail with their errno in this process.
bool InstallSeccomp(const std::vector<Deny>& denies) {
  std::vector<sock_filter> f;
  f.push_back(BPF_STMT(BPF_LD | BPF_W | BPF_ABS,
                       static_cast<uint32_t>(offsetof(seccomp_data, nr))));
  for (const Deny& d : denies) {
    f.push_back(BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K,
                         static_cast<uint32_t>(d.syscall_nr), 0, 1));
    f.push_back(BPF_STMT(
        BPF_RET | BPF_K,
        SECCOMP_RET_ERRNO | (static_cast<uint32_t>(d.err) & SECCOMP_RET_DATA)));
  }
  f.push_back(BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW));
  sock_fprog prog{static_cast<unsigned short>(f.size()), f.data()};
  return prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 &&
         prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) == 0;
}

// Runs `body` in a forked child; returns its verdict: "" when it passed,
// "SKIP: why" when the child could not set the scene, else the failure.
std::string InChild(const std::function<std::string()>& body) {
  int p[2];
  if (pipe(p) != 0) return "pipe failed";
  const pid_t pid = fork();
  if (pid < 0) return "fork failed";
  if (pid == 0) {
    ::close(p[0]);
    const std::string verdict = body();
    size_t off = 0;
    while (off < verdict.size()) {
      const ssize_t w =
          ::write(p[1], verdict.data() + off, verdict.size() - off);
      if (w <= 0) break;
      off += static_cast<size_t>(w);
    }
    _exit(0);
  }
  ::close(p[1]);
  std::string verdict;
  char buf[512];
  ssize_t n;
  while ((n = ::read(p[0], buf, sizeof(buf))) > 0) verdict.append(buf, n);
  ::close(p[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    return "child died (status " + std::to_string(status) + ") " + verdict;
  }
  return verdict;
}

// In the child: `kind` must be kUnavailable with every `needle` in the text.
std::string ExpectUnavailable(BackendKind kind,
                              const std::vector<std::string>& needles) {
  Result<std::unique_ptr<Backend>> b = CreateBackend(kind, {});
  if (b.ok()) return std::string(BackendKindName(kind)) + " was created";
  if (b.status().code() != StatusCode::kUnavailable) {
    return "not Unavailable: " + b.status().ToString();
  }
  for (const std::string& n : needles) {
    if (b.status().message().find(n) == std::string_view::npos) {
      return "missing '" + n + "' in: " + b.status().ToString();
    }
  }
  return "";
}

// Variadic: the lambda's captures contain commas.
#define EXPECT_CHILD_OK(...)                                        \
  do {                                                              \
    const std::string _verdict = InChild(__VA_ARGS__);              \
    if (_verdict.rfind("SKIP: ", 0) == 0) GTEST_SKIP() << _verdict; \
    EXPECT_EQ(_verdict, "");                                        \
  } while (0)

TEST(BackendFactory, IoUringRefusalsNameTheCause) {
  if (!BackendCompiled(BackendKind::kIoUring)) GTEST_SKIP() << "no io_uring";
  const std::pair<int, std::vector<std::string>> cases[] = {
      {ENOSYS, {"ENOSYS", "lacks io_uring"}},
      {ENOMEM, {"ENOMEM", "RLIMIT_MEMLOCK"}},  // the limit may be "unlimited"
      // Which EPERM text applies depends on the host's sysctl and on what
      // /proc shows (seccomp mode): each names the sysctl and its fix.
      {EPERM, {"EPERM", "io_uring_disabled"}},
  };
  for (const auto& [err, needles] : cases) {
    SCOPED_TRACE(err);
    EXPECT_CHILD_OK([&, err = err, needles = needles]() -> std::string {
      if (!InstallSeccomp({{__NR_io_uring_setup, err}})) {
        return "SKIP: cannot install a seccomp filter";
      }
      return ExpectUnavailable(BackendKind::kIoUring, needles);
    });
  }
}

TEST(BackendFactory, IoUringDisabledSysctlIsNamed) {
  if (!BackendCompiled(BackendKind::kIoUring)) GTEST_SKIP() << "no io_uring";
  ScratchDir dir;
  const std::string fake = dir.File("io_uring_disabled");
  EXPECT_CHILD_OK([&]() -> std::string {
    // Show the backend a sysctl of 2 through a private mount namespace;
    // the real sysctl is never touched.
    FILE* f = fopen(fake.c_str(), "w");
    if (f == nullptr) return "cannot write " + fake;
    fputs("2\n", f);
    fclose(f);
    if (unshare(CLONE_NEWNS) != 0 ||
        mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0 ||
        mount(fake.c_str(), "/proc/sys/kernel/io_uring_disabled", nullptr,
              MS_BIND, nullptr) != 0) {
      return std::string("SKIP: cannot bind-mount over the sysctl: ") +
             strerror(errno);
    }
    if (!InstallSeccomp({{__NR_io_uring_setup, EPERM}})) {
      return "SKIP: cannot install a seccomp filter";
    }
    return ExpectUnavailable(
        BackendKind::kIoUring,
        {"kernel.io_uring_disabled=2", "sysctl -w kernel.io_uring_disabled=0"});
  });
}

TEST(BackendFactory, LibaioRefusalsNameTheCause) {
  if (!BackendCompiled(BackendKind::kLibaio)) GTEST_SKIP() << "no libaio";
  const std::pair<int, std::vector<std::string>> cases[] = {
      {ENOSYS, {"ENOSYS", "CONFIG_AIO"}},
      {EAGAIN, {"EAGAIN", "fs.aio-max-nr"}},
      {EPERM, {"EPERM", "seccomp"}},
  };
  for (const auto& [err, needles] : cases) {
    SCOPED_TRACE(err);
    EXPECT_CHILD_OK([&, err = err, needles = needles]() -> std::string {
      if (!InstallSeccomp({{__NR_io_setup, err}})) {
        return "SKIP: cannot install a seccomp filter";
      }
      return ExpectUnavailable(BackendKind::kLibaio, needles);
    });
  }
}

TEST(BackendFactory, AutoFallsBackAndLogsWhy) {
  EXPECT_CHILD_OK([]() -> std::string {
    if (!InstallSeccomp(
            {{__NR_io_uring_setup, EPERM}, {__NR_io_setup, ENOSYS}})) {
      return "SKIP: cannot install a seccomp filter";
    }
    std::string logs;
    SetLogSink([&](LogLevel, std::string_view m) { logs += std::string(m); });
    Result<std::unique_ptr<Backend>> b = CreateBackend(BackendKind::kAuto, {});
    SetLogSink(nullptr);
    if (!b.ok()) return "auto failed: " + b.status().ToString();
    if ((*b)->kind() != BackendKind::kPsync) {
      return "auto chose " + std::string((*b)->name());
    }
    std::vector<std::string> needles = {"psync (auto", "io_uring skipped",
                                        "libaio skipped"};
    if (BackendCompiled(BackendKind::kIoUring)) needles.push_back("EPERM");
    if (BackendCompiled(BackendKind::kLibaio)) needles.push_back("ENOSYS");
    for (const std::string& n : needles) {
      if (logs.find(n) == std::string::npos) {
        return "log lacks '" + n + "': " + logs;
      }
    }
    // An explicit choice never falls back.
    Result<std::unique_ptr<Backend>> u =
        CreateBackend(BackendKind::kIoUring, {});
    if (u.ok() || u.status().code() != StatusCode::kUnavailable) {
      return "explicit io_uring: " + u.status().ToString();
    }
    return "";
  });
}

}  // namespace
}  // namespace ztier::io
