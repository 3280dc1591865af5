// Tests of the Adam/AdamW kernels: the vector kernels against the scalar
// reference bit for bit, the scalar reference against independently written
// formulas, the f16/bf16 conversions against F16C, the worker pool.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <sstream>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define ZTIER_TEST_X86 1
#endif

#include "base/float16.h"
#include "optim/adam.h"
#include "optim/worker_pool.h"
#include "tests/optim/optim_testing.h"

namespace ztier::optim {
namespace {

using testing::Bits;
using testing::DTypeName;
using testing::FromBits;

// ---------------------------------------------------------------------------
// Random state with a wide spread of magnitudes: zeros of both signs, tiny
// values (float subnormals included), large ones and ordinary ones, so that
// products underflow to subnormals and half outputs overflow to inf. All
// finite and small enough that g * g stays finite (|x| <= 1e16).

float RandomValue(std::mt19937_64& rng, bool non_negative) {
  std::uniform_real_distribution<float> unit(1.0f, 2.0f);
  const float sign = (!non_negative && (rng() & 1)) ? -1.0f : 1.0f;
  switch (rng() % 10) {
    case 0:
      return sign * 0.0f;
    case 1:  // float subnormal
      return sign * FromBits(static_cast<uint32_t>(rng() % 0x7fffff) + 1);
    case 2:  // tiny normal, 2^-126 .. 2^-90
      return sign * std::ldexp(unit(rng), -126 + static_cast<int>(rng() % 36));
    case 3:  // large, 2^20 .. 2^52
      return sign * std::ldexp(unit(rng), 20 + static_cast<int>(rng() % 33));
    case 4:  // near the half limits, 2^-26 .. 2^17
      return sign * std::ldexp(unit(rng), -26 + static_cast<int>(rng() % 44));
    default:  // ordinary, 2^-20 .. 2^4
      return sign * std::ldexp(unit(rng), -20 + static_cast<int>(rng() % 25));
  }
}

// `n` gradient elements of type `t`, as raw bytes.
std::vector<uint8_t> RandomGrad(std::mt19937_64& rng, DType t, uint64_t n) {
  std::vector<uint8_t> out(n * DTypeBytes(t));
  for (uint64_t i = 0; i < n; ++i) {
    if (t == DType::kF32) {
      const float f = RandomValue(rng, false);
      std::memcpy(out.data() + 4 * i, &f, 4);
      continue;
    }
    uint16_t h;
    if (t == DType::kF16) {
      // Any finite half, subnormals included, half the time; else a
      // converted random value (which may round to a subnormal or zero).
      do {
        h = (rng() & 1) ? static_cast<uint16_t>(rng())
                        : FloatToHalf(RandomValue(rng, false) * 1e-3f);
      } while ((h & 0x7c00) == 0x7c00);  // no inf / NaN
    } else {
      h = FloatToBf16(RandomValue(rng, false));
    }
    std::memcpy(out.data() + 2 * i, &h, 2);
  }
  return out;
}

// Extra elements after each array, filled with a pattern that no kernel may
// change (masked tails must stop at n).
constexpr uint64_t kGuard = 32;
constexpr uint8_t kGuardByte = 0xa5;

struct State {
  std::vector<float> master, exp_avg, exp_avg_sq;
  std::vector<uint8_t> out;

  State(uint64_t n, DType out_type) {
    master.assign(n + kGuard, 0);
    exp_avg.assign(n + kGuard, 0);
    exp_avg_sq.assign(n + kGuard, 0);
    out.assign((n + kGuard) * DTypeBytes(out_type), kGuardByte);
    for (auto* a : {&master, &exp_avg, &exp_avg_sq}) {
      std::memset(a->data() + n, kGuardByte, kGuard * sizeof(float));
    }
  }

  AdamSpan Span(const void* grad, DType grad_type, bool with_out, DType out_type,
                uint64_t n) {
    AdamSpan s;
    s.master = master.data();
    s.exp_avg = exp_avg.data();
    s.exp_avg_sq = exp_avg_sq.data();
    s.grad = grad;
    s.grad_type = grad_type;
    s.param_out = with_out ? out.data() : nullptr;
    s.out_type = out_type;
    s.n = n;
    return s;
  }
};

State RandomState(std::mt19937_64& rng, uint64_t n, DType out_type) {
  State st(n, out_type);
  for (uint64_t i = 0; i < n; ++i) {
    st.master[i] = RandomValue(rng, false);
    st.exp_avg[i] = RandomValue(rng, false);
    st.exp_avg_sq[i] = RandomValue(rng, true);
  }
  return st;
}

// Index of the first differing element of two arrays of `elem` bytes each,
// or -1.
int64_t FirstDiff(const void* a, const void* b, uint64_t count, uint32_t elem) {
  const auto* pa = static_cast<const uint8_t*>(a);
  const auto* pb = static_cast<const uint8_t*>(b);
  if (std::memcmp(pa, pb, count * elem) == 0) return -1;
  for (uint64_t i = 0; i < count; ++i) {
    if (std::memcmp(pa + i * elem, pb + i * elem, elem) != 0) return static_cast<int64_t>(i);
  }
  return -1;
}

// Expects `got` == `want` bit for bit over the whole arrays, guards included.
void ExpectSameState(const State& want, const State& got, uint64_t n, DType out_type,
                     const std::string& what) {
  const std::pair<const char*, std::pair<const std::vector<float>*, const std::vector<float>*>>
      arrays[] = {{"master", {&want.master, &got.master}},
                  {"exp_avg", {&want.exp_avg, &got.exp_avg}},
                  {"exp_avg_sq", {&want.exp_avg_sq, &got.exp_avg_sq}}};
  for (const auto& [name, ab] : arrays) {
    const int64_t d = FirstDiff(ab.first->data(), ab.second->data(), n + kGuard, 4);
    EXPECT_EQ(d, -1) << what << ": " << name << "[" << d << "] want "
                     << (d >= 0 ? (*ab.first)[d] : 0) << " (0x" << std::hex
                     << (d >= 0 ? Bits((*ab.first)[d]) : 0) << ") got " << std::dec
                     << (d >= 0 ? (*ab.second)[d] : 0) << " (0x" << std::hex
                     << (d >= 0 ? Bits((*ab.second)[d]) : 0) << ")" << std::dec;
  }
  const uint32_t ob = DTypeBytes(out_type);
  const int64_t d = FirstDiff(want.out.data(), got.out.data(), n + kGuard, ob);
  EXPECT_EQ(d, -1) << what << ": param_out[" << d << "] differs";
}

void ExpectGuardsIntact(const State& st, uint64_t n, DType out_type, const std::string& what) {
  for (const auto* a : {&st.master, &st.exp_avg, &st.exp_avg_sq}) {
    const auto* p = reinterpret_cast<const uint8_t*>(a->data() + n);
    for (uint64_t i = 0; i < kGuard * sizeof(float); ++i) {
      ASSERT_EQ(p[i], kGuardByte) << what << ": wrote past n in the state";
    }
  }
  const uint32_t ob = DTypeBytes(out_type);
  for (uint64_t i = n * ob; i < st.out.size(); ++i) {
    ASSERT_EQ(st.out[i], kGuardByte) << what << ": wrote past n in param_out";
  }
}

// ---------------------------------------------------------------------------
// Vector kernels == scalar reference, bit for bit.

class VectorVsScalar : public ::testing::TestWithParam<Isa> {};

TEST_P(VectorVsScalar, BitExactOverAllConfigurations) {
  const Isa isa = GetParam();
  if (!IsaAvailable(isa)) {
    GTEST_SKIP() << IsaName(isa) << " is not available on this CPU or in this build";
  }
  const uint64_t sizes[] = {1, 7, 15, 16, 17, 63, 64, 1000, 100003};
  const DType types[] = {DType::kF32, DType::kF16, DType::kBF16};
  constexpr int kSteps = 3;
  std::mt19937_64 rng(42);
  for (uint64_t n : sizes) {
    for (DType grad_type : types) {
      // One set of inputs per (n, grad type), shared by every configuration.
      std::vector<std::vector<uint8_t>> grads;
      for (int t = 0; t < kSteps; ++t) grads.push_back(RandomGrad(rng, grad_type, n));
      const State initial = RandomState(rng, n, DType::kF32);
      for (int out_kind = 0; out_kind < 4; ++out_kind) {
        const bool with_out = out_kind < 3;
        const DType out_type = with_out ? types[out_kind] : DType::kF32;
        for (int variant = 0; variant < 8; ++variant) {
          AdamHyper h;
          h.lr = 1e-2;
          h.adamw = (variant & 1) != 0;
          h.weight_decay = (variant & 2) ? 0.1 : 0.0;
          h.bias_correction = (variant & 4) != 0;
          ASSERT_TRUE(ValidateHyper(h).ok());
          const std::string what =
              std::string(IsaName(isa)) + " n=" + std::to_string(n) + " grad=" +
              DTypeName(grad_type) + " out=" + (with_out ? DTypeName(out_type) : "none") +
              " adamw=" + std::to_string(h.adamw) + " wd=" + std::to_string(h.weight_decay) +
              " bias_correction=" + std::to_string(h.bias_correction);
          State want(n, out_type), got(n, out_type);
          for (State* st : {&want, &got}) {
            std::copy_n(initial.master.begin(), n, st->master.begin());
            std::copy_n(initial.exp_avg.begin(), n, st->exp_avg.begin());
            std::copy_n(initial.exp_avg_sq.begin(), n, st->exp_avg_sq.begin());
          }
          for (int t = 0; t < kSteps; ++t) {
            const AdamConstants c = MakeConstants(h, t + 1);
            AdamUpdate(c, want.Span(grads[t].data(), grad_type, with_out, out_type, n),
                       Isa::kScalar);
            AdamUpdate(c, got.Span(grads[t].data(), grad_type, with_out, out_type, n), isa);
            ExpectSameState(want, got, n, out_type, what + " step " + std::to_string(t + 1));
            ExpectGuardsIntact(got, n, out_type, what);
            if (HasFailure()) return;
          }
        }
      }
    }
  }
}

// Unaligned arrays (odd float offsets) give the same bits as the scalar code.
TEST_P(VectorVsScalar, UnalignedArrays) {
  const Isa isa = GetParam();
  if (!IsaAvailable(isa)) {
    GTEST_SKIP() << IsaName(isa) << " is not available on this CPU or in this build";
  }
  std::mt19937_64 rng(7);
  constexpr uint64_t kN = 517;
  for (uint64_t offset : {1, 3, 5}) {
    const uint64_t n = kN - offset;
    const std::vector<uint8_t> grad = RandomGrad(rng, DType::kBF16, kN);
    State want = RandomState(rng, kN, DType::kF16);
    State got = want;
    AdamHyper h;
    h.weight_decay = 0.01;
    const AdamConstants c = MakeConstants(h, 5);
    AdamUpdate(c, SubSpan(want.Span(grad.data(), DType::kBF16, true, DType::kF16, kN), offset, n),
               Isa::kScalar);
    AdamUpdate(c, SubSpan(got.Span(grad.data(), DType::kBF16, true, DType::kF16, kN), offset, n),
               isa);
    ExpectSameState(want, got, kN, DType::kF16, "offset " + std::to_string(offset));
  }
}

// Every float pattern class (NaNs, infinities, subnormals, half ties) through
// the kernels' output conversions: with lr = 0 and zero moments the step
// leaves p as it is (p + -0 / eps), so param_out is p converted by the
// vector code, which must equal the scalar FloatToHalf / FloatToBf16.
TEST_P(VectorVsScalar, OutputConversionOfEveryKindOfFloat) {
  const Isa isa = GetParam();
  if (!IsaAvailable(isa)) {
    GTEST_SKIP() << IsaName(isa) << " is not available on this CPU or in this build";
  }
  std::vector<float> values;
  for (uint64_t b = 0; b < (uint64_t{1} << 32); b += 7919) {
    values.push_back(FromBits(static_cast<uint32_t>(b)));
  }
  for (uint32_t b : {0x00000000u, 0x80000000u, 0x7f800000u, 0xff800000u, 0x7fc00000u,
                     0xffc00000u, 0x7f800001u, 0xff800001u, 0x7fbfffffu, 0x477fe000u,
                     0x477ff000u, 0x477fefffu, 0x38800000u, 0x387fffffu, 0x33800000u,
                     0x33000000u, 0x33000001u, 0x3f808000u, 0x3f818000u, 0x7f7fffffu}) {
    values.push_back(FromBits(b));
  }
  const uint64_t n = values.size();
  for (DType out_type : {DType::kF16, DType::kBF16, DType::kF32}) {
    State want(n, out_type), got(n, out_type);
    std::copy(values.begin(), values.end(), want.master.begin());
    std::copy(values.begin(), values.end(), got.master.begin());
    const std::vector<float> grad(n, 0.0f);
    AdamHyper h;
    h.lr = 0;
    const AdamConstants c = MakeConstants(h, 1);
    AdamUpdate(c, want.Span(grad.data(), DType::kF32, true, out_type, n), Isa::kScalar);
    AdamUpdate(c, got.Span(grad.data(), DType::kF32, true, out_type, n), isa);
    ExpectSameState(want, got, n, out_type, std::string("out ") + DTypeName(out_type));
    if (out_type == DType::kF16) {
      // And the scalar side really is FloatToHalf of the (quieted) input.
      for (uint64_t i = 0; i < n; i += 101) {
        uint16_t h16;
        std::memcpy(&h16, want.out.data() + 2 * i, 2);
        ASSERT_EQ(h16, FloatToHalf(want.master[i])) << "element " << i;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Isas, VectorVsScalar, ::testing::Values(Isa::kAvx2, Isa::kAvx512),
                         [](const ::testing::TestParamInfo<Isa>& info) {
                           return std::string(IsaName(info.param));
                         });

// ---------------------------------------------------------------------------
// The scalar reference against the formulas written out by hand.

TEST(AdamScalar, HandComputedTwoElementsOneStep) {
  for (bool adamw : {true, false}) {
    SCOPED_TRACE(adamw ? "adamw" : "adam (L2)");
    const double lr = 0.01, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, wd = 0.1;
    float p[2] = {0.5f, -1.25f};
    float m[2] = {0.0625f, -0.01f};
    float v[2] = {0.004f, 0.25f};
    const float g[2] = {-0.25f, 3.0f};

    // Written independently of the library: torch's float ops in order.
    const double bc1 = 1.0 - std::pow(beta1, 1.0);
    const double bc2 = 1.0 - std::pow(beta2, 1.0);
    const float neg_step = static_cast<float>(-(lr / bc1));
    const float bc2_sqrt = static_cast<float>(std::sqrt(bc2));
    float want_p[2], want_m[2], want_v[2];
    for (int i = 0; i < 2; ++i) {
      float pi = p[i], gi = g[i];
      if (adamw) {
        pi = pi * static_cast<float>(1.0 - lr * wd);
      } else {
        gi = std::fma(pi, static_cast<float>(wd), gi);
      }
      const float mb = m[i] * static_cast<float>(beta1);
      want_m[i] = std::fma(gi, static_cast<float>(1.0 - beta1), mb);
      const float og = static_cast<float>(1.0 - beta2) * gi;
      const float vb = v[i] * static_cast<float>(beta2);
      want_v[i] = std::fma(og, gi, vb);
      const float root = std::sqrt(want_v[i]);
      const float denom = root / bc2_sqrt + static_cast<float>(eps);
      const float num = neg_step * want_m[i];
      want_p[i] = pi + num / denom;

      // Cross-check in double against the textbook Adam formula: same value
      // to float precision.
      const double gd = adamw ? g[i] : g[i] + wd * p[i];
      const double md = beta1 * m[i] + (1 - beta1) * gd;
      const double vd = beta2 * v[i] + (1 - beta2) * gd * gd;
      const double pd = (adamw ? p[i] * (1 - lr * wd) : p[i]) -
                        lr / bc1 * md / (std::sqrt(vd) / std::sqrt(bc2) + eps);
      EXPECT_NEAR(want_p[i], pd, 1e-6 * std::fabs(pd));
    }

    AdamHyper h;
    h.lr = lr;
    h.beta1 = beta1;
    h.beta2 = beta2;
    h.eps = eps;
    h.weight_decay = wd;
    h.adamw = adamw;
    uint16_t out[2];
    AdamSpan s;
    s.master = p;
    s.exp_avg = m;
    s.exp_avg_sq = v;
    s.grad = g;
    s.param_out = out;
    s.out_type = DType::kBF16;
    s.n = 2;
    AdamUpdate(MakeConstants(h, 1), s, Isa::kScalar);
    for (int i = 0; i < 2; ++i) {
      EXPECT_EQ(Bits(p[i]), Bits(want_p[i])) << i << ": " << p[i] << " vs " << want_p[i];
      EXPECT_EQ(Bits(m[i]), Bits(want_m[i])) << i;
      EXPECT_EQ(Bits(v[i]), Bits(want_v[i])) << i;
      EXPECT_EQ(out[i], FloatToBf16(want_p[i])) << i;
    }
  }
}

// After one step from m = v = 0 with bias correction, m_hat = g and
// v_hat = g^2, so p moves by -lr * g / (|g| + eps) ~ -lr * sign(g).
TEST(AdamScalar, FirstStepMovesByLearningRate) {
  const float g[] = {1e-3f, -1e-3f, 1.0f, -2.5f, 100.0f, -1e4f};
  constexpr int kN = 6;
  float p[kN], m[kN] = {}, v[kN] = {};
  std::fill_n(p, kN, 1.0f);
  AdamHyper h;
  h.lr = 1e-3;
  AdamSpan s;
  s.master = p;
  s.exp_avg = m;
  s.exp_avg_sq = v;
  s.grad = g;
  s.n = kN;
  AdamUpdate(MakeConstants(h, 1), s, Isa::kScalar);
  for (int i = 0; i < kN; ++i) {
    EXPECT_NEAR(p[i] - 1.0f, g[i] > 0 ? -1e-3 : 1e-3, 2e-7) << "g = " << g[i];
  }
}

TEST(AdamScalar, ZeroElementsIsANoOp) {
  AdamSpan s;  // all null, n = 0
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    if (IsaAvailable(isa)) AdamUpdate(MakeConstants(AdamHyper{}, 1), s, isa);
  }
}

TEST(AdamConstants, FromHyperparameters) {
  AdamHyper h;
  h.lr = 3e-4;
  h.beta1 = 0.8;
  h.beta2 = 0.95;
  h.eps = 1e-6;
  h.weight_decay = 0.05;
  const AdamConstants c = MakeConstants(h, 3);
  const double bc1 = 1 - 0.8 * 0.8 * 0.8;
  const double bc2 = 1 - 0.95 * 0.95 * 0.95;
  EXPECT_EQ(c.beta1, 0.8f);
  EXPECT_EQ(c.one_minus_beta1, static_cast<float>(1 - 0.8));
  EXPECT_EQ(c.beta2, 0.95f);
  EXPECT_EQ(c.one_minus_beta2, static_cast<float>(1 - 0.95));
  EXPECT_FLOAT_EQ(c.neg_step_size, static_cast<float>(-3e-4 / bc1));
  EXPECT_FLOAT_EQ(c.bias_correction2_sqrt, static_cast<float>(std::sqrt(bc2)));
  EXPECT_EQ(c.eps, 1e-6f);
  EXPECT_EQ(c.weight_decay, 0.05f);
  EXPECT_EQ(c.decay, static_cast<float>(1 - 3e-4 * 0.05));
  EXPECT_TRUE(c.adamw);
  EXPECT_TRUE(c.apply_weight_decay);

  h.bias_correction = false;
  h.weight_decay = 0;
  const AdamConstants d = MakeConstants(h, 1000);
  EXPECT_EQ(d.neg_step_size, static_cast<float>(-3e-4));
  EXPECT_EQ(d.bias_correction2_sqrt, 1.0f);
  EXPECT_FALSE(d.apply_weight_decay);

  // Step 0 is taken as step 1 (no division by zero).
  h.bias_correction = true;
  EXPECT_EQ(MakeConstants(h, 0).neg_step_size, MakeConstants(h, 1).neg_step_size);
}

TEST(AdamSpan, SubSpanOffsetsEveryArray) {
  float master[10], m[10], v[10];
  uint16_t grad[10], out[10];
  AdamSpan s;
  s.master = master;
  s.exp_avg = m;
  s.exp_avg_sq = v;
  s.grad = grad;
  s.grad_type = DType::kF16;
  s.param_out = out;
  s.out_type = DType::kBF16;
  s.n = 10;
  const AdamSpan sub = SubSpan(s, 3, 4);
  EXPECT_EQ(sub.master, master + 3);
  EXPECT_EQ(sub.exp_avg, m + 3);
  EXPECT_EQ(sub.exp_avg_sq, v + 3);
  EXPECT_EQ(sub.grad, grad + 3);
  EXPECT_EQ(sub.param_out, out + 3);
  EXPECT_EQ(sub.n, 4u);
  EXPECT_EQ(sub.grad_type, DType::kF16);
  EXPECT_EQ(sub.out_type, DType::kBF16);
  s.param_out = nullptr;
  EXPECT_EQ(SubSpan(s, 3, 4).param_out, nullptr);
}

// ---------------------------------------------------------------------------
// Hyperparameters, ISA names, dtypes.

TEST(AdamHyper, ValidateNamesFieldAndValue) {
  EXPECT_TRUE(ValidateHyper(AdamHyper{}).ok());
  struct Case {
    AdamHyper h;
    const char* field;
    const char* value;
  };
  std::vector<Case> cases;
  auto add = [&](const char* field, const char* value, auto set) {
    Case c{AdamHyper{}, field, value};
    set(c.h);
    cases.push_back(c);
  };
  add("lr", "-1", [](AdamHyper& h) { h.lr = -1; });
  add("lr", "nan", [](AdamHyper& h) { h.lr = NAN; });
  add("lr", "inf", [](AdamHyper& h) { h.lr = INFINITY; });
  add("beta1", "1", [](AdamHyper& h) { h.beta1 = 1.0; });
  add("beta1", "-0.1", [](AdamHyper& h) { h.beta1 = -0.1; });
  add("beta2", "1.5", [](AdamHyper& h) { h.beta2 = 1.5; });
  add("eps", "0", [](AdamHyper& h) { h.eps = 0; });
  add("eps", "-1e-08", [](AdamHyper& h) { h.eps = -1e-8; });
  add("weight_decay", "-0.5", [](AdamHyper& h) { h.weight_decay = -0.5; });
  for (const Case& c : cases) {
    const Status s = ValidateHyper(c.h);
    ASSERT_FALSE(s.ok()) << c.field << " = " << c.value;
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
    const std::string msg(s.message());
    EXPECT_NE(msg.find(std::string(c.field) + " = " + c.value), std::string::npos) << msg;
  }
  AdamHyper edge;
  edge.lr = 0;
  edge.beta1 = 0;
  edge.beta2 = 0;
  edge.weight_decay = 0;
  EXPECT_TRUE(ValidateHyper(edge).ok());
}

TEST(AdamIsa, NamesParseAndAvailability) {
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    const Result<Isa> r = ParseIsa(IsaName(isa));
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(*r, isa);
  }
  for (const char* bad : {"", "AVX2", "sse", "avx512f"}) {
    const Result<Isa> r = ParseIsa(bad);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
    const std::string msg(r.status().message());
    EXPECT_NE(msg.find("scalar, avx2, avx512"), std::string::npos) << msg;
    EXPECT_NE(msg.find(std::string("'") + bad + "'"), std::string::npos) << msg;
  }
  EXPECT_TRUE(IsaAvailable(Isa::kScalar));
  EXPECT_TRUE(IsaAvailable(BestIsa()));
#if defined(ZTIER_TEST_X86) && defined(__linux__)
  // Against the kernel's own list, so that a wrong "not available" cannot
  // turn the vector-vs-scalar tests into skips.
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  std::set<std::string> flags;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("flags", 0) != 0) continue;
    std::istringstream words(line.substr(line.find(':') + 1));
    for (std::string w; words >> w;) flags.insert(w);
    break;
  }
  if (!flags.empty()) {
    const bool avx2 = flags.count("avx2") && flags.count("fma") && flags.count("f16c");
    EXPECT_EQ(IsaAvailable(Isa::kAvx2), avx2);
    EXPECT_EQ(IsaAvailable(Isa::kAvx512),
              avx2 && flags.count("avx512f") && flags.count("avx512bw"));
  }
#endif
  if (IsaAvailable(Isa::kAvx512)) {
    EXPECT_EQ(BestIsa(), Isa::kAvx512);
    EXPECT_TRUE(IsaAvailable(Isa::kAvx2));
  }
  EXPECT_EQ(DTypeBytes(DType::kF32), 4u);
  EXPECT_EQ(DTypeBytes(DType::kF16), 2u);
  EXPECT_EQ(DTypeBytes(DType::kBF16), 2u);
}

// ---------------------------------------------------------------------------
// Conversions.

TEST(Conversion, HalfKnownValues) {
  EXPECT_EQ(FloatToHalf(0.0f), 0x0000);
  EXPECT_EQ(FloatToHalf(-0.0f), 0x8000);
  EXPECT_EQ(FloatToHalf(1.0f), 0x3c00);
  EXPECT_EQ(FloatToHalf(-2.0f), 0xc000);
  EXPECT_EQ(FloatToHalf(65504.0f), 0x7bff);     // largest half
  EXPECT_EQ(FloatToHalf(65519.996f), 0x7bff);   // just below the tie
  EXPECT_EQ(FloatToHalf(65520.0f), 0x7c00);     // tie with odd mantissa: up, to inf
  EXPECT_EQ(FloatToHalf(1e10f), 0x7c00);
  EXPECT_EQ(FloatToHalf(-INFINITY), 0xfc00);
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -14)), 0x0400);  // smallest normal
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -24)), 0x0001);  // smallest subnormal
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -25)), 0x0000);  // tie: to even (0)
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -25) * 1.0000001f), 0x0001);
  EXPECT_EQ(FloatToHalf(std::ldexp(3.0f, -25)), 0x0002);  // tie 1|2: to 2
  EXPECT_EQ(FloatToHalf(std::ldexp(1023.5f, -24)), 0x0400);  // rounds up to normal
  EXPECT_EQ(FloatToHalf(1.0f + std::ldexp(1.0f, -11)), 0x3c00);      // tie: even
  EXPECT_EQ(FloatToHalf(1.0f + std::ldexp(3.0f, -11)), 0x3c02);      // tie: even
  EXPECT_EQ(FloatToHalf(FromBits(0x7f800001)), 0x7e00);  // sNaN -> qNaN
  EXPECT_EQ(FloatToHalf(FromBits(0xffc00000)), 0xfe00);
  EXPECT_EQ(HalfToFloat(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(HalfToFloat(0x83ff), -std::ldexp(1023.0f, -24));
  EXPECT_EQ(HalfToFloat(0x7bff), 65504.0f);
  EXPECT_EQ(Bits(HalfToFloat(0x8000)), 0x80000000u);
  EXPECT_TRUE(std::isnan(HalfToFloat(0x7c01)));
}

TEST(Conversion, HalfRoundTripsEveryHalf) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const uint16_t h16 = static_cast<uint16_t>(h);
    const float f = HalfToFloat(h16);
    if ((h & 0x7c00) == 0x7c00 && (h & 0x3ff) != 0) {
      ASSERT_TRUE(std::isnan(f)) << h;
      ASSERT_EQ(FloatToHalf(f), h16 | 0x200) << h;  // quieted
    } else {
      ASSERT_EQ(FloatToHalf(f), h16) << h;
    }
  }
}

TEST(Conversion, Bf16KnownValues) {
  EXPECT_EQ(FloatToBf16(1.0f), 0x3f80);
  EXPECT_EQ(FloatToBf16(FromBits(0x3f808000)), 0x3f80);  // tie: even
  EXPECT_EQ(FloatToBf16(FromBits(0x3f818000)), 0x3f82);  // tie: even
  EXPECT_EQ(FloatToBf16(FromBits(0x3f808001)), 0x3f81);
  EXPECT_EQ(FloatToBf16(FromBits(0xbf807fff)), 0xbf80);
  EXPECT_EQ(FloatToBf16(FromBits(0x7f7fffff)), 0x7f80);  // overflow: inf
  EXPECT_EQ(FloatToBf16(FromBits(0x7f7f7fff)), 0x7f7f);
  EXPECT_EQ(FloatToBf16(INFINITY), 0x7f80);
  EXPECT_EQ(FloatToBf16(-INFINITY), 0xff80);
  EXPECT_EQ(FloatToBf16(FromBits(0x7f800001)), 0x7fc0);
  EXPECT_EQ(FloatToBf16(FromBits(0xffffffff)), 0xffc0);
  EXPECT_EQ(FloatToBf16(FromBits(0x00008000)), 0x0000);  // subnormal tie: even
  EXPECT_EQ(FloatToBf16(FromBits(0x00018000)), 0x0002);
  EXPECT_EQ(FloatToBf16(-0.0f), 0x8000);
  for (uint32_t h = 0; h < 0x10000; ++h) {
    ASSERT_EQ(Bits(Bf16ToFloat(static_cast<uint16_t>(h))), h << 16);
    if ((h & 0x7fff) <= 0x7f80) {
      ASSERT_EQ(FloatToBf16(Bf16ToFloat(static_cast<uint16_t>(h))), h);
    }
  }
}

#if defined(ZTIER_TEST_X86)
__attribute__((target("f16c"))) uint16_t F16cFloatToHalf(float f) {
  return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
__attribute__((target("f16c"))) float F16cHalfToFloat(uint16_t h) { return _cvtsh_ss(h); }

bool HaveF16c() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("f16c");
}

TEST(Conversion, FloatToHalfMatchesF16c) {
  if (!HaveF16c()) GTEST_SKIP() << "the CPU has no F16C";
  std::vector<uint32_t> specials = {
      0x00000000, 0x80000000, 0x7f800000, 0xff800000,  // zeros, infinities
      0x7f800001, 0x7fbfffff, 0x7fc00000, 0x7fffffff,  // NaNs, both kinds
      0xff800001, 0xffc00001, 0x7fc02000, 0x7f802000,
      0x00000001, 0x007fffff, 0x00800000, 0x80000001,  // float subnormal edges
      0x477fe000, 0x477fefff, 0x477ff000, 0x477ff001, 0x477fffff, 0x47800000,  // max half
      0x38800000, 0x387fffff, 0x38801000, 0x38800fff,  // smallest normal half
      0x387fc000, 0x387fe000, 0x387ff000,              // largest subnormal half, ties
      0x33800000, 0x33000000, 0x33000001, 0x32ffffff,  // smallest subnormal, half of it
      0x33c00000, 0x34200000, 0x34400000,              // subnormal ties
      0x3f801000, 0x3f803000, 0x3f801001, 0x3f800fff,  // ties near 1
  };
  for (uint32_t b : std::vector<uint32_t>(specials)) {
    specials.push_back(b ^ 0x80000000u);  // and the negatives
  }
  for (uint32_t b : specials) {
    const float f = FromBits(b);
    ASSERT_EQ(FloatToHalf(f), F16cFloatToHalf(f)) << "float bits 0x" << std::hex << b;
  }
  // Every float whose bit pattern is a multiple of a prime stride (~542k).
  uint64_t checked = 0;
  for (uint64_t b = 0; b < (uint64_t{1} << 32); b += 7919) {
    const float f = FromBits(static_cast<uint32_t>(b));
    ASSERT_EQ(FloatToHalf(f), F16cFloatToHalf(f)) << "float bits 0x" << std::hex << b;
    ++checked;
  }
  // And every float in the half subnormal / smallest normal range, where the
  // rounding is most intricate, at a finer stride.
  for (uint32_t b = 0x32f00000; b < 0x38900000; b += 13) {
    const float f = FromBits(b);
    ASSERT_EQ(FloatToHalf(f), F16cFloatToHalf(f)) << "float bits 0x" << std::hex << b;
    ASSERT_EQ(FloatToHalf(-f), F16cFloatToHalf(-f)) << "float bits 0x" << std::hex << b;
  }
  EXPECT_GT(checked, 500000u);
}

TEST(Conversion, HalfToFloatMatchesF16cForEveryHalf) {
  if (!HaveF16c()) GTEST_SKIP() << "the CPU has no F16C";
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const uint16_t h16 = static_cast<uint16_t>(h);
    ASSERT_EQ(Bits(HalfToFloat(h16)), Bits(F16cHalfToFloat(h16))) << "half 0x" << std::hex << h;
  }
}
#endif

// ---------------------------------------------------------------------------
// Worker pool and the parallel update.

TEST(WorkerPool, CoversEveryIndexOnceInGrainMultiples) {
  for (uint32_t threads : {1u, 2u, 3u, 5u}) {
    WorkerPool pool(threads);
    EXPECT_EQ(pool.threads(), threads);
    for (uint64_t n : {0ull, 1ull, 2ull, 5ull, 63ull, 64ull, 65ull, 1001ull, 99991ull}) {
      for (uint64_t grain : {0ull, 1ull, 3ull, 64ull, 1000ull}) {
        std::vector<std::atomic<int>> hits(n);
        std::mutex mu;
        std::vector<std::pair<uint64_t, uint64_t>> chunks;
        pool.ParallelFor(n, grain, [&](uint64_t begin, uint64_t end) {
          for (uint64_t i = begin; i < end; ++i) hits[i].fetch_add(1, std::memory_order_relaxed);
          std::lock_guard<std::mutex> lock(mu);
          chunks.emplace_back(begin, end);
        });
        const std::string what = "threads " + std::to_string(threads) + " n " +
                                  std::to_string(n) + " grain " + std::to_string(grain);
        for (uint64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << what << " index " << i;
        EXPECT_LE(chunks.size(), threads) << what;
        const uint64_t g = std::max<uint64_t>(grain, 1);
        for (const auto& [begin, end] : chunks) {
          EXPECT_LT(begin, end) << what;
          EXPECT_EQ(begin % g, 0u) << what;
          if (end != n) {
            EXPECT_EQ((end - begin) % g, 0u) << what;
          }
        }
        if (n == 0) {
          EXPECT_TRUE(chunks.empty());
        }
      }
    }
  }
}

TEST(WorkerPool, SplitsWorkAcrossThreads) {
  WorkerPool pool(3);
  std::mutex mu;
  std::set<std::thread::id> ids;
  std::vector<std::pair<uint64_t, uint64_t>> chunks;
  pool.ParallelFor(3000, 10, [&](uint64_t begin, uint64_t end) {
    std::lock_guard<std::mutex> lock(mu);
    ids.insert(std::this_thread::get_id());
    chunks.emplace_back(begin, end);
  });
  EXPECT_EQ(ids.size(), 3u);
  EXPECT_TRUE(ids.count(std::this_thread::get_id()));
  std::sort(chunks.begin(), chunks.end());
  ASSERT_EQ(chunks.size(), 3u);
  EXPECT_EQ(chunks[0], std::make_pair(uint64_t{0}, uint64_t{1000}));
  EXPECT_EQ(chunks[2], std::make_pair(uint64_t{2000}, uint64_t{3000}));
}

TEST(WorkerPool, ManyLoopsBackToBack) {
  // Stresses the hand-off (a worker that wakes late, spurious wake-ups).
  WorkerPool pool(3);
  std::atomic<uint64_t> sum{0};
  for (int iter = 0; iter < 2000; ++iter) {
    const uint64_t n = 1 + static_cast<uint64_t>(iter % 7);
    pool.ParallelFor(n, 1, [&](uint64_t begin, uint64_t end) {
      sum.fetch_add(end - begin, std::memory_order_relaxed);
    });
  }
  uint64_t want = 0;
  for (int iter = 0; iter < 2000; ++iter) want += 1 + iter % 7;
  EXPECT_EQ(sum.load(), want);
}

TEST(WorkerPool, ZeroMeansHardwareConcurrency) {
  WorkerPool pool(0);
  EXPECT_EQ(pool.threads(), std::max(1u, std::thread::hardware_concurrency()));
}

TEST(AdamParallel, SameBitsAsSingleThread) {
  std::mt19937_64 rng(3);
  constexpr uint64_t kN = 100003;
  const std::vector<uint8_t> grad = RandomGrad(rng, DType::kF16, kN);
  const State initial = RandomState(rng, kN, DType::kBF16);
  AdamHyper h;
  h.weight_decay = 0.1;
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    if (!IsaAvailable(isa)) continue;
    State want = initial;
    for (int t = 1; t <= 2; ++t) {
      AdamUpdate(MakeConstants(h, t), want.Span(grad.data(), DType::kF16, true, DType::kBF16, kN),
                 isa);
    }
    for (uint32_t threads : {1u, 2u, 3u}) {
      WorkerPool pool(threads);
      State got = initial;
      for (int t = 1; t <= 2; ++t) {
        AdamUpdateParallel(pool, MakeConstants(h, t),
                           got.Span(grad.data(), DType::kF16, true, DType::kBF16, kN), isa);
      }
      ExpectSameState(want, got, kN, DType::kBF16,
                      std::string(IsaName(isa)) + " threads " + std::to_string(threads));
    }
  }
}


// ---------------------------------------------------------------------------
// grad_scale: the kernels multiply g by (float)grad_scale first, so an update
// with grad_scale s is, bit for bit, the update with grad_scale 1 on
// gradients multiplied by (float)s in float32 beforehand, on every ISA, for
// every gradient type and both weight-decay modes (L2 adds p * wd to the
// scaled gradient, not to the raw one).

TEST(AdamGradScale, EqualsPreScaledGradientsOnEveryIsa) {
  std::mt19937_64 rng(21);
  // n: full vectors of 8 and 16 lanes and a tail.
  constexpr uint64_t kN = 16 * 5 + 7;
  const double scales[] = {1.0 / 65536, 0.37, 1.0 / 3, 2.5, 1e-30, 0.0};
  int ran = 0;
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    if (!IsaAvailable(isa)) continue;
    ++ran;
    for (DType grad_type : {DType::kF32, DType::kF16, DType::kBF16}) {
      for (bool adamw : {true, false}) {
        for (double scale : scales) {
          const std::string what = std::string(IsaName(isa)) + " grad " + DTypeName(grad_type) +
                                   (adamw ? " adamw" : " adam") +
                                   " scale " + std::to_string(scale);
          const std::vector<uint8_t> grad = RandomGrad(rng, grad_type, kN);
          // The same gradients as float32, times (float)scale.
          std::vector<float> scaled(kN);
          for (uint64_t i = 0; i < kN; ++i) {
            float g;
            if (grad_type == DType::kF32) {
              std::memcpy(&g, grad.data() + 4 * i, 4);
            } else {
              uint16_t h;
              std::memcpy(&h, grad.data() + 2 * i, 2);
              g = grad_type == DType::kF16 ? HalfToFloat(h) : Bf16ToFloat(h);
            }
            scaled[i] = g * static_cast<float>(scale);
          }
          const State initial = RandomState(rng, kN, DType::kBF16);
          AdamHyper h;
          h.lr = 1e-2;
          h.weight_decay = 0.1;
          h.adamw = adamw;
          AdamHyper hs = h;
          hs.grad_scale = scale;
          ASSERT_TRUE(ValidateHyper(hs).ok()) << what;
          State want = initial, got = initial;
          for (uint64_t step = 1; step <= 2; ++step) {
            AdamUpdate(MakeConstants(h, step),
                       want.Span(scaled.data(), DType::kF32, true, DType::kBF16, kN), isa);
            AdamUpdate(MakeConstants(hs, step),
                       got.Span(grad.data(), grad_type, true, DType::kBF16, kN), isa);
          }
          ExpectSameState(want, got, kN, DType::kBF16, what);
          ExpectGuardsIntact(got, kN, DType::kBF16, what);
          if (::testing::Test::HasFailure()) return;
        }
      }
    }
  }
  EXPECT_GE(ran, 1);
}

// A scale really changes the update (the test above would pass if the
// kernels ignored grad_scale and the pre-scaling were wrong the same way):
// scaling by 0.5 differs from 1, and equals halving the float32 gradients.
TEST(AdamGradScale, ScaleIsApplied) {
  const float g[] = {0.75f, -3.0f, 1e-3f};
  AdamHyper h;
  h.lr = 0.1;
  h.weight_decay = 0.5;
  h.adamw = false;  // L2: p * wd is added to the scaled g, so the scale shows in m
  AdamHyper half = h;
  half.grad_scale = 0.5;
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    if (!IsaAvailable(isa)) continue;
    float p1[3] = {1, 1, 1}, m1[3] = {}, v1[3] = {};
    float p2[3] = {1, 1, 1}, m2[3] = {}, v2[3] = {};
    AdamSpan a{p1, m1, v1, g, DType::kF32, nullptr, DType::kF32, 3};
    AdamSpan b{p2, m2, v2, g, DType::kF32, nullptr, DType::kF32, 3};
    AdamUpdate(MakeConstants(h, 1), a, isa);
    AdamUpdate(MakeConstants(half, 1), b, isa);
    for (int i = 0; i < 3; ++i) {
      // From m = 0 and p = 1: m = fma(fma(p, wd, s * g), 1 - beta1, 0).
      const float want_m =
          std::fma(std::fma(1.0f, 0.5f, g[i] * 0.5f), static_cast<float>(1.0 - 0.9), 0.0f);
      EXPECT_NE(Bits(m1[i]), Bits(m2[i])) << IsaName(isa) << " " << i;
      EXPECT_EQ(Bits(m2[i]), Bits(want_m)) << IsaName(isa) << " " << i;
    }
  }
}

TEST(AdamGradScale, ConstantIsTheFloatOfTheScale) {
  AdamHyper h;
  EXPECT_EQ(h.grad_scale, 1.0);
  EXPECT_EQ(Bits(MakeConstants(h, 1).grad_scale), Bits(1.0f));
  h.grad_scale = 0.37;
  EXPECT_EQ(Bits(MakeConstants(h, 1).grad_scale), Bits(static_cast<float>(0.37)));
  h.grad_scale = 1.0 / 65536;
  EXPECT_EQ(MakeConstants(h, 7).grad_scale, 0x1p-16f);
}

TEST(AdamGradScale, ValidateRejectsNegativeNanInfAndBeyondFloat) {
  for (double ok : {0.0, 1e-300, 0.5, 1.0, 65536.0, 3.4e38}) {
    AdamHyper h;
    h.grad_scale = ok;
    EXPECT_TRUE(ValidateHyper(h).ok()) << ok;
  }
  const std::pair<double, const char*> bad[] = {{-1.0, "-1"},
                                                {-1e-300, "-1e-300"},
                                                {NAN, "nan"},
                                                {INFINITY, "inf"},
                                                {-INFINITY, "-inf"},
                                                {1e39, "1e+39"}};  // inf as a float
  for (const auto& [value, text] : bad) {
    AdamHyper h;
    h.grad_scale = value;
    const Status s = ValidateHyper(h);
    ASSERT_FALSE(s.ok()) << text;
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
    const std::string msg(s.message());
    EXPECT_NE(msg.find(std::string("grad_scale = ") + text), std::string::npos) << msg;
  }
}

}  // namespace
}  // namespace ztier::optim
