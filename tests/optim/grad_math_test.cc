// Tests of optim/grad_math: AccumulateGrad adds in float32 and rounds once
// to the element type (hand-picked ties and overflows, bit for bit, against
// base/float16's conversions); SumSquares sums in double (no float overflow),
// is not finite exactly when an element is not, and covers the tail after
// the last full block of 8.
#include "optim/grad_math.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "base/float16.h"
#include "tests/optim/optim_testing.h"

namespace ztier::optim {
namespace {

using testing::Bits;
using testing::FromBits;
const char* Name(DType t) { return testing::DTypeName(t); }

// One 16-bit accumulation: acc + in, both as encodings of type `t`.
uint16_t Add16(uint16_t acc, uint16_t in, DType t) {
  AccumulateGrad(&acc, &in, 1, t);
  return acc;
}

// ---------------------------------------------------------------------------
// AccumulateGrad: hand values.

TEST(AccumulateGrad, Float32HandValuesRoundToNearestEven) {
  struct Case {
    uint32_t acc, in, want;
  };
  const Case cases[] = {
      {Bits(1.0f), Bits(2.0f), Bits(3.0f)},
      // 1 + 2^-24: a tie between 1 and 1 + 2^-23, to the even 1.
      {Bits(1.0f), Bits(0x1p-24f), Bits(1.0f)},
      // 1 + 3 * 2^-24 = 1 + 1.5 ulp: a tie, to the even 1 + 2^-22.
      {Bits(1.0f), Bits(0x3p-24f), Bits(1.0f + 0x1p-22f)},
      // x + -x is +0; -0 + -0 stays -0.
      {Bits(1.5f), Bits(-1.5f), 0x00000000u},
      {0x80000000u, 0x80000000u, 0x80000000u},
      // The largest float plus one ulp overflows to inf.
      {0x7f7fffffu, 0x73800000u /* 2^104 = ulp(FLT_MAX) */, 0x7f800000u},
      // Subnormals add exactly.
      {0x00000001u, 0x00000002u, 0x00000003u},
      // inf + -inf is a NaN.
      {0x7f800000u, 0xff800000u, 0u /* checked as NaN below */},
  };
  for (const Case& c : cases) {
    float acc = FromBits(c.acc);
    const float in = FromBits(c.in);
    AccumulateGrad(&acc, &in, 1, DType::kF32);
    if (std::isinf(FromBits(c.acc)) && std::isinf(in)) {
      EXPECT_TRUE(std::isnan(acc));
    } else {
      EXPECT_EQ(Bits(acc), c.want) << std::hex << c.acc << " + " << c.in;
    }
  }
}

TEST(AccumulateGrad, Float16HandValuesRoundOnceToHalf) {
  struct Case {
    uint16_t acc, in, want;
  };
  const Case cases[] = {
      {0x3c00, 0x4000, 0x4200},  // 1 + 2 = 3
      // 1 + 2^-11: a tie between 1 and 1 + 2^-10, to the even 1.
      {0x3c00, 0x1000, 0x3c00},
      // (1 + 2^-10) + 2^-11: a tie, to the even 1 + 2^-9.
      {0x3c01, 0x1000, 0x3c02},
      // 1 + (2^-11 + 2^-21): just above the tie, up.
      {0x3c00, 0x1001, 0x3c01},
      // 65504 + 65504 overflows; 65504 + 16 = 65520 is the tie with 2^16: inf.
      {0x7bff, 0x7bff, 0x7c00},
      {0x7bff, 0x4c00, 0x7c00},
      // 65504 + 8 (below the tie) stays 65504.
      {0x7bff, 0x4800, 0x7bff},
      // Subnormals: 2^-24 + 2^-24 = 2^-23.
      {0x0001, 0x0001, 0x0002},
      // x + -x = +0; -0 + -0 = -0.
      {0x3e00, 0xbe00, 0x0000},
      {0x8000, 0x8000, 0x8000},
  };
  for (const Case& c : cases) {
    EXPECT_EQ(Add16(c.acc, c.in, DType::kF16), c.want) << std::hex << c.acc << " + " << c.in;
    // The same bits as the float32 add then base/float16's rounding.
    EXPECT_EQ(Add16(c.acc, c.in, DType::kF16),
              FloatToHalf(HalfToFloat(c.acc) + HalfToFloat(c.in)));
  }
  // inf + -inf is a NaN; NaN + x is a NaN.
  const uint16_t nan1 = Add16(0x7c00, 0xfc00, DType::kF16);
  EXPECT_EQ(nan1 & 0x7c00, 0x7c00);
  EXPECT_NE(nan1 & 0x03ff, 0);
  const uint16_t nan2 = Add16(0x7e00, 0x3c00, DType::kF16);
  EXPECT_EQ(nan2 & 0x7c00, 0x7c00);
  EXPECT_NE(nan2 & 0x03ff, 0);
}

TEST(AccumulateGrad, BFloat16HandValuesRoundOnceToBf16) {
  struct Case {
    uint16_t acc, in, want;
  };
  const Case cases[] = {
      {0x3f80, 0x4000, 0x4040},  // 1 + 2 = 3
      // 1 + 2^-8: a tie between 1 and 1 + 2^-7, to the even 1.
      {0x3f80, 0x3b80, 0x3f80},
      // (1 + 2^-7) + 2^-8: a tie, to the even 1 + 2^-6.
      {0x3f81, 0x3b80, 0x3f82},
      // 1 + (2^-8 + 2^-15): above the tie, up.
      {0x3f80, 0x3b81, 0x3f81},
      // The largest bf16 twice overflows to inf.
      {0x7f7f, 0x7f7f, 0x7f80},
      // bf16 subnormals (float subnormals) add exactly.
      {0x0001, 0x0001, 0x0002},
      {0x3fc0, 0xbfc0, 0x0000},
      {0x8000, 0x8000, 0x8000},
  };
  for (const Case& c : cases) {
    EXPECT_EQ(Add16(c.acc, c.in, DType::kBF16), c.want) << std::hex << c.acc << " + " << c.in;
    EXPECT_EQ(Add16(c.acc, c.in, DType::kBF16),
              FloatToBf16(Bf16ToFloat(c.acc) + Bf16ToFloat(c.in)));
  }
  const uint16_t nan = Add16(0x7f80, 0xff80, DType::kBF16);
  EXPECT_EQ(nan & 0x7f80, 0x7f80);
  EXPECT_NE(nan & 0x007f, 0);
}

// ---------------------------------------------------------------------------
// AccumulateGrad: every element of arrays of any length, nothing past n.

// n random encodings of type t (finite, a wide spread of magnitudes).
std::vector<uint8_t> RandomArray(std::mt19937_64& rng, DType t, uint64_t n) {
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<uint8_t> out(n * DTypeBytes(t));
  for (uint64_t i = 0; i < n; ++i) {
    const float f = std::ldexp(nd(rng), static_cast<int>(rng() % 20) - 10);
    if (t == DType::kF32) {
      std::memcpy(out.data() + 4 * i, &f, 4);
    } else {
      const uint16_t h = t == DType::kF16 ? FloatToHalf(f) : FloatToBf16(f);
      std::memcpy(out.data() + 2 * i, &h, 2);
    }
  }
  return out;
}

TEST(AccumulateGrad, EveryLengthMatchesElementwiseAndStopsAtN) {
  std::mt19937_64 rng(11);
  constexpr uint64_t kGuard = 16;
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16}) {
    const uint32_t eb = DTypeBytes(t);
    for (uint64_t n : {0ull, 1ull, 7ull, 8ull, 9ull, 15ull, 16ull, 17ull, 63ull, 1001ull}) {
      SCOPED_TRACE(std::string(Name(t)) + " n=" + std::to_string(n));
      std::vector<uint8_t> acc = RandomArray(rng, t, n + kGuard);
      const std::vector<uint8_t> in = RandomArray(rng, t, n + kGuard);
      const std::vector<uint8_t> before = acc;
      AccumulateGrad(acc.data(), in.data(), n, t);
      for (uint64_t i = 0; i < n; ++i) {
        if (t == DType::kF32) {
          float a, b, got;
          std::memcpy(&a, before.data() + 4 * i, 4);
          std::memcpy(&b, in.data() + 4 * i, 4);
          std::memcpy(&got, acc.data() + 4 * i, 4);
          ASSERT_EQ(Bits(got), Bits(a + b)) << "element " << i;
        } else {
          uint16_t a, b, got;
          std::memcpy(&a, before.data() + 2 * i, 2);
          std::memcpy(&b, in.data() + 2 * i, 2);
          std::memcpy(&got, acc.data() + 2 * i, 2);
          const uint16_t want = t == DType::kF16 ? FloatToHalf(HalfToFloat(a) + HalfToFloat(b))
                                                 : FloatToBf16(Bf16ToFloat(a) + Bf16ToFloat(b));
          ASSERT_EQ(got, want) << "element " << i;
        }
      }
      // The elements after n are untouched (and n = 0 changes nothing).
      EXPECT_EQ(std::memcmp(acc.data() + n * eb, before.data() + n * eb, kGuard * eb), 0);
    }
  }
}

// ---------------------------------------------------------------------------
// SumSquares.

TEST(SumSquares, HandValues) {
  const float f32[] = {1.0f, -2.0f, 3.0f};
  EXPECT_EQ(SumSquares(f32, 3, DType::kF32), 14.0);
  // 0.1f squared in double, not in float.
  const float tenth = 0.1f;
  EXPECT_EQ(SumSquares(&tenth, 1, DType::kF32),
            static_cast<double>(tenth) * static_cast<double>(tenth));
  // 1.5 and -0.5 in half (0x3e00, 0xb800) and bf16 (0x3fc0, 0xbf00): 2.5.
  const uint16_t f16[] = {0x3e00, 0xb800};
  EXPECT_EQ(SumSquares(f16, 2, DType::kF16), 2.5);
  const uint16_t bf16[] = {0x3fc0, 0xbf00};
  EXPECT_EQ(SumSquares(bf16, 2, DType::kBF16), 2.5);
  // The smallest half subnormal: 2^-48, exact in double.
  const uint16_t tiny = 0x0001;
  EXPECT_EQ(SumSquares(&tiny, 1, DType::kF16), std::ldexp(1.0, -48));
}

TEST(SumSquares, LargeFloatsDoNotOverflow) {
  // (3e38)^2 overflows float but not double; the same for the largest bf16.
  const float big[] = {3e38f, -3e38f};
  const double want = 2.0 * static_cast<double>(3e38f) * static_cast<double>(3e38f);
  EXPECT_TRUE(std::isfinite(SumSquares(big, 2, DType::kF32)));
  EXPECT_EQ(SumSquares(big, 2, DType::kF32), want);
  const uint16_t bf_max = 0x7f7f;
  const double m = Bf16ToFloat(bf_max);
  EXPECT_EQ(SumSquares(&bf_max, 1, DType::kBF16), m * m);
  const uint16_t half_max = 0x7bff;  // 65504
  EXPECT_EQ(SumSquares(&half_max, 1, DType::kF16), 65504.0 * 65504.0);
}

TEST(SumSquares, ZeroElementsIsZero) {
  const float x = 5.0f;
  EXPECT_EQ(SumSquares(&x, 0, DType::kF32), 0.0);
  EXPECT_EQ(SumSquares(nullptr, 0, DType::kF16), 0.0);
  EXPECT_EQ(SumSquares(nullptr, 0, DType::kBF16), 0.0);
}

// 1, 2, ..., n: the sum of squares n(n+1)(2n+1)/6 is exact in double, so
// every element, the tail after the last block of 8 included, must count.
TEST(SumSquares, EveryLengthCountsEveryElement) {
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16}) {
    // bf16 holds integers exactly up to 256, half up to 2048.
    for (uint64_t n = 0; n <= 40; ++n) {
      std::vector<uint8_t> data(n * DTypeBytes(t));
      for (uint64_t i = 0; i < n; ++i) {
        const float v = static_cast<float>(i + 1);
        if (t == DType::kF32) {
          std::memcpy(data.data() + 4 * i, &v, 4);
        } else {
          const uint16_t h = t == DType::kF16 ? FloatToHalf(v) : FloatToBf16(v);
          std::memcpy(data.data() + 2 * i, &h, 2);
        }
      }
      const double want = static_cast<double>(n * (n + 1) * (2 * n + 1)) / 6.0;
      EXPECT_EQ(SumSquares(data.data(), n, t), want) << Name(t) << " n=" << n;
    }
  }
}

// An inf or a NaN at any position (in a full block or in the tail) makes the
// sum non-finite; a NaN makes it NaN.
TEST(SumSquares, InfOrNanAnywhereIsNotFinite) {
  struct Special {
    DType t;
    uint32_t inf, ninf, nan;  // encodings
  };
  const Special specials[] = {{DType::kF32, 0x7f800000u, 0xff800000u, 0x7fc00000u},
                              {DType::kF16, 0x7c00, 0xfc00, 0x7e00},
                              {DType::kBF16, 0x7f80, 0xff80, 0x7fc0}};
  for (const Special& sp : specials) {
    const uint32_t eb = DTypeBytes(sp.t);
    for (uint64_t n : {1ull, 8ull, 19ull}) {
      for (uint64_t pos = 0; pos < n; ++pos) {
        for (uint32_t bad : {sp.inf, sp.ninf, sp.nan}) {
          std::vector<uint8_t> data(n * eb);
          for (uint64_t i = 0; i < n; ++i) {
            const uint32_t one = sp.t == DType::kF32 ? Bits(1.0f)
                                 : sp.t == DType::kF16 ? 0x3c00u
                                                       : 0x3f80u;
            std::memcpy(data.data() + i * eb, i == pos ? &bad : &one, eb);  // little-endian
          }
          const double s = SumSquares(data.data(), n, sp.t);
          SCOPED_TRACE(std::string(Name(sp.t)) + " n=" + std::to_string(n) +
                       " pos=" + std::to_string(pos));
          EXPECT_FALSE(std::isfinite(s)) << s;
          if (bad == sp.nan) {
            EXPECT_TRUE(std::isnan(s));
          } else {
            EXPECT_EQ(s, std::numeric_limits<double>::infinity());
          }
        }
      }
    }
  }
}

}  // namespace
}  // namespace ztier::optim
