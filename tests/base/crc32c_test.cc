#include "base/crc32c.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace ztier {
namespace {

using CrcFn = uint32_t (*)(const void*, size_t, uint32_t);

struct Impl {
  const char* name;
  CrcFn fn;
  bool available;
};

std::vector<Impl> Impls() {
  return {{"portable", &Crc32cPortable, true},
          {"hardware", &Crc32cHardware, Crc32cHardwareAvailable()},
          {"dispatch", &Crc32c, true}};
}

std::vector<uint8_t> RandomBytes(size_t n, uint32_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(rng());
  return v;
}

TEST(Crc32cTest, KnownVectors) {
  // Check value of the CRC-32C catalogue and the iSCSI (RFC 3720 B.4) vectors.
  uint8_t zeros[32] = {};
  uint8_t ones[32];
  uint8_t up[32];
  uint8_t down[32];
  std::memset(ones, 0xFF, sizeof(ones));
  for (int i = 0; i < 32; ++i) {
    up[i] = static_cast<uint8_t>(i);
    down[i] = static_cast<uint8_t>(31 - i);
  }
  for (const Impl& impl : Impls()) {
    if (!impl.available) continue;
    SCOPED_TRACE(impl.name);
    EXPECT_EQ(impl.fn("123456789", 9, 0), 0xE3069283u);
    EXPECT_EQ(impl.fn("", 0, 0), 0u);
    EXPECT_EQ(impl.fn("a", 1, 0), 0xC1D04330u);
    EXPECT_EQ(impl.fn(zeros, 32, 0), 0x8A9136AAu);
    EXPECT_EQ(impl.fn(ones, 32, 0), 0x62A8AB43u);
    EXPECT_EQ(impl.fn(up, 32, 0), 0x46DD794Eu);
    EXPECT_EQ(impl.fn(down, 32, 0), 0x113FDB5Cu);
  }
}

TEST(Crc32cTest, NullWithZeroBytesIsIdentity) {
  EXPECT_EQ(Crc32c(nullptr, 0, 0), 0u);
  EXPECT_EQ(Crc32c(nullptr, 0, 0x12345678u), 0x12345678u);
  EXPECT_EQ(Crc32cPortable(nullptr, 0, 0x12345678u), 0x12345678u);
}

TEST(Crc32cTest, ImplementationName) {
  const std::string name(Crc32cImplementation());
  EXPECT_TRUE(name == "sse4.2" || name == "table") << name;
  EXPECT_EQ(name == "sse4.2", Crc32cHardwareAvailable());
}

// Every length around the block boundaries of the interleaved loop (3 x 8 KiB
// and 3 x 256 bytes), at every misalignment, against the table version.
TEST(Crc32cTest, HardwareMatchesPortable) {
  if (!Crc32cHardwareAvailable()) GTEST_SKIP() << "no SSE4.2 on this CPU";
  const std::vector<uint8_t> data = RandomBytes(3 * 8192 * 3 + 4096, 7);
  std::vector<size_t> lengths;
  for (size_t n = 0; n <= 80; ++n) lengths.push_back(n);
  for (size_t base : {768u, 1536u, 24576u, 49152u, 73728u}) {
    for (size_t d = 0; d <= 17; ++d) {
      lengths.push_back(base + d);
      lengths.push_back(base - d);
    }
  }
  lengths.push_back(data.size() - 8);
  for (size_t offset = 0; offset < 8; ++offset) {
    for (size_t n : lengths) {
      if (offset + n > data.size()) continue;
      ASSERT_EQ(Crc32cHardware(data.data() + offset, n, 0),
                Crc32cPortable(data.data() + offset, n, 0))
          << "offset " << offset << " length " << n;
    }
  }
}

TEST(Crc32cTest, RandomBuffersAgree) {
  if (!Crc32cHardwareAvailable()) GTEST_SKIP() << "no SSE4.2 on this CPU";
  std::mt19937 rng(11);
  for (int round = 0; round < 200; ++round) {
    const size_t n = rng() % 200000;
    const std::vector<uint8_t> data = RandomBytes(n, rng());
    const uint32_t seed = rng();
    ASSERT_EQ(Crc32cHardware(data.data(), n, seed),
              Crc32cPortable(data.data(), n, seed))
        << "length " << n;
  }
}

TEST(Crc32cTest, ExtendsAcrossPieces) {
  const std::vector<uint8_t> data = RandomBytes(100000, 3);
  for (const Impl& impl : Impls()) {
    if (!impl.available) continue;
    SCOPED_TRACE(impl.name);
    const uint32_t whole = impl.fn(data.data(), data.size(), 0);
    for (size_t cut : {0u, 1u, 7u, 4096u, 33333u, 99999u, 100000u}) {
      const uint32_t first = impl.fn(data.data(), cut, 0);
      EXPECT_EQ(impl.fn(data.data() + cut, data.size() - cut, first), whole)
          << "cut at " << cut;
    }
  }
}

TEST(Crc32cTest, DetectsSingleBitFlip) {
  std::vector<uint8_t> data = RandomBytes(1 << 20, 5);
  const uint32_t before = Crc32c(data.data(), data.size());
  data[123457] ^= 0x10;
  EXPECT_NE(Crc32c(data.data(), data.size()), before);
}

// Informational: single-core speed on 64 MiB (meaningful in optimized builds).
TEST(Crc32cTest, Throughput64MiB) {
  const size_t n = 64u << 20;
  const std::vector<uint8_t> data = RandomBytes(n, 9);
  for (const Impl& impl : Impls()) {
    if (!impl.available) continue;
    uint32_t sink = impl.fn(data.data(), n, 0);  // warm the pages
    const auto t0 = std::chrono::steady_clock::now();
    const int reps = 3;
    for (int i = 0; i < reps; ++i) sink ^= impl.fn(data.data(), n, sink);
    const double s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0)
            .count();
    std::printf("crc32c %-8s %.2f GB/s (64 MiB x %d, checksum %08x)\n",
                impl.name, static_cast<double>(n) * reps / s / 1e9, reps, sink);
  }
}

}  // namespace
}  // namespace ztier
