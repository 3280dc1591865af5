#include "optim/adam.h"

#include <cassert>
#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <string>

#include <fmt/format.h>

#include "base/float16.h"
#include "optim/adam_kernel.h"
#include "optim/element.h"

namespace ztier::optim {
namespace {

// The scalar lanes: one float. std::fma is the correctly rounded fused
// multiply-add (hardware where the CPU has it, else glibc's exact software
// version); the library is built with -ffp-contract=off so that no other
// a * b + c is fused behind our back.
struct ScalarOps {
  using V = float;
  static constexpr uint64_t kWidth = 1;
  static constexpr bool kMaskedTail = false;

  static V Set1(float x) { return x; }
  static V Mul(V a, V b) { return a * b; }
  static V Add(V a, V b) { return a + b; }
  static V Div(V a, V b) { return a / b; }
  static V Sqrt(V a) { return std::sqrt(a); }
  static V Fma(V a, V b, V c) { return std::fma(a, b, c); }
  static V Load(const float* p) { return *p; }
  static void Store(float* p, V x) { *p = x; }

  template <DType kType>
  static V LoadGrad(const void* base, uint64_t i) {
    return LoadElement<kType>(base, i);
  }

  template <internal::OutKind kOut>
  static void StoreOut(void* base, uint64_t i, V x) {
    if constexpr (kOut == internal::OutKind::kF32) {
      static_cast<float*>(base)[i] = x;
    } else if constexpr (kOut == internal::OutKind::kF16) {
      static_cast<uint16_t*>(base)[i] = FloatToHalf(x);
    } else if constexpr (kOut == internal::OutKind::kBF16) {
      static_cast<uint16_t*>(base)[i] = FloatToBf16(x);
    }
  }
};

// Which ISAs this build and CPU run, checked once (thread-safe static init).
struct IsaSupport {
  bool avx2 = false;
  bool avx512 = false;
  IsaSupport() {
#if defined(ZTIER_OPTIM_X86)
    __builtin_cpu_init();
    // libgcc sets these only where the OS also saves the ymm/zmm state.
    avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
    avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             avx2;
#endif
  }
};

const IsaSupport& Support() {
  static const IsaSupport support;
  return support;
}

// Checks one hyperparameter: finite and within [lo, hi] (or (lo, hi] /
// [lo, hi) where the bound is open).
Status CheckRange(std::string_view name, double value, double lo, bool lo_open, double hi,
                  bool hi_open) {
  const bool ok = std::isfinite(value) && (lo_open ? value > lo : value >= lo) &&
                  (hi_open ? value < hi : value <= hi);
  if (ok) return Status::Ok();
  std::string range;
  if (std::isinf(hi)) {
    range = fmt::format("{} {}", lo_open ? ">" : ">=", lo);
  } else {
    range = fmt::format("in {}{}, {}{}", lo_open ? "(" : "[", lo, hi, hi_open ? ")" : "]");
  }
  return Status::InvalidArgument(
      fmt::format("adam: {} = {} is invalid: it must be finite and {}", name, value, range));
}

}  // namespace

std::string_view IsaName(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return "scalar";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512";
  }
  return "unknown";
}

Result<Isa> ParseIsa(std::string_view name) {
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    if (name == IsaName(isa)) return isa;
  }
  return Status::InvalidArgument(
      fmt::format("unknown ISA '{}': valid ones are scalar, avx2, avx512", name));
}

bool IsaAvailable(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return true;
    case Isa::kAvx2:
      return Support().avx2;
    case Isa::kAvx512:
      return Support().avx512;
  }
  return false;
}

Isa BestIsa() {
  if (IsaAvailable(Isa::kAvx512)) return Isa::kAvx512;
  if (IsaAvailable(Isa::kAvx2)) return Isa::kAvx2;
  return Isa::kScalar;
}

uint32_t DTypeBytes(DType t) { return t == DType::kF32 ? 4 : 2; }

Status ValidateHyper(const AdamHyper& h) {
  constexpr double kInf = HUGE_VAL;
  ZTIER_RETURN_IF_ERROR(CheckRange("lr", h.lr, 0, false, kInf, false));
  ZTIER_RETURN_IF_ERROR(CheckRange("beta1", h.beta1, 0, false, 1, true));
  ZTIER_RETURN_IF_ERROR(CheckRange("beta2", h.beta2, 0, false, 1, true));
  ZTIER_RETURN_IF_ERROR(CheckRange("eps", h.eps, 0, true, kInf, false));
  ZTIER_RETURN_IF_ERROR(CheckRange("weight_decay", h.weight_decay, 0, false, kInf, false));
  // Applied as a float: beyond float's range it would turn every update
  // into inf / NaN.
  ZTIER_RETURN_IF_ERROR(CheckRange("grad_scale", h.grad_scale, 0, false, FLT_MAX, false));
  return Status::Ok();
}

AdamConstants MakeConstants(const AdamHyper& h, uint64_t step) {
  if (step == 0) step = 1;
  // Exactly torch 1.13's _single_tensor_adam(w): the bias corrections, the
  // step size and sqrt(bias_correction2) in double (Python floats), then each
  // scalar cast to float when it meets a float tensor.
  double bc1 = 1.0, bc2 = 1.0;
  if (h.bias_correction) {
    const double t = static_cast<double>(step);
    bc1 = 1.0 - std::pow(h.beta1, t);
    bc2 = 1.0 - std::pow(h.beta2, t);
  }
  const double step_size = h.lr / bc1;
  const double bc2_sqrt = std::sqrt(bc2);
  AdamConstants c;
  c.beta1 = static_cast<float>(h.beta1);
  c.one_minus_beta1 = static_cast<float>(1.0 - h.beta1);
  c.beta2 = static_cast<float>(h.beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - h.beta2);
  c.neg_step_size = static_cast<float>(-step_size);
  c.bias_correction2_sqrt = static_cast<float>(bc2_sqrt);
  c.eps = static_cast<float>(h.eps);
  c.weight_decay = static_cast<float>(h.weight_decay);
  c.decay = static_cast<float>(1.0 - h.lr * h.weight_decay);
  c.adamw = h.adamw;
  c.apply_weight_decay = h.weight_decay != 0.0;
  c.grad_scale = static_cast<float>(h.grad_scale);
  return c;
}

AdamSpan SubSpan(const AdamSpan& s, uint64_t begin, uint64_t count) {
  assert(begin <= s.n && count <= s.n - begin);
  AdamSpan r = s;
  r.master = s.master + begin;
  r.exp_avg = s.exp_avg + begin;
  r.exp_avg_sq = s.exp_avg_sq + begin;
  r.grad = static_cast<const uint8_t*>(s.grad) + begin * DTypeBytes(s.grad_type);
  if (s.param_out != nullptr) {
    r.param_out = static_cast<uint8_t*>(s.param_out) + begin * DTypeBytes(s.out_type);
  }
  r.n = count;
  return r;
}

void AdamUpdate(const AdamConstants& c, const AdamSpan& s, Isa isa) {
  if (s.n == 0) return;
  assert(s.master && s.exp_avg && s.exp_avg_sq && s.grad);
  if (!IsaAvailable(isa)) std::abort();  // documented: the caller checks first
  switch (isa) {
    case Isa::kScalar:
      return internal::AdamUpdateScalar(c, s);
#if defined(ZTIER_OPTIM_X86)
    case Isa::kAvx2:
      return internal::AdamUpdateAvx2(c, s);
    case Isa::kAvx512:
      return internal::AdamUpdateAvx512(c, s);
#endif
    default:
      std::abort();
  }
}

namespace internal {

void AdamUpdateScalar(const AdamConstants& c, const AdamSpan& s) {
  AdamDispatch<ScalarOps>(c, s);
}

}  // namespace internal
}  // namespace ztier::optim
