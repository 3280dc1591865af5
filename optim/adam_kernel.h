// Internal to ztier_optim: the one per-element Adam algorithm and the loop
// around it, written once over an "Ops" type that supplies the lane type and
// its operations. adam.cc instantiates it with scalar floats, adam_avx2.cc
// with __m256 and adam_avx512.cc with __m512, each compiled with its own
// target flags, so the three versions cannot drift apart.
//
// An Ops type provides:
//   using V;                                   lanes of float
//   static constexpr uint64_t kWidth;          lanes per V
//   static constexpr bool kMaskedTail;         the last < kWidth elements are
//                                              done with masks (else by the
//                                              scalar kernel)
//   V Set1(float); V Mul(V, V); V Add(V, V); V Div(V, V); V Sqrt(V);
//   V Fma(V a, V b, V c)                       a * b + c, one rounding
//   V Load(const float*); void Store(float*, V);
//   template <DType> V LoadGrad(const void* base, uint64_t i);
//   template <OutKind> void StoreOut(void* base, uint64_t i, V);
// and, with kMaskedTail, Mask TailMask(uint64_t count) and the same loads and
// stores with a trailing Mask argument (LoadMasked, StoreMasked, ...).
//
// Every Ops type must have internal linkage (an anonymous namespace): the
// templates instantiated with it then have internal linkage too, and the
// linker can never pick a copy compiled with AVX flags for the scalar path.
// For the same reason this header defines no non-template inline function.
#pragma once

#include <cstdint>
#include <cstdlib>

#include "optim/adam.h"

namespace ztier::optim::internal {

// How weight decay enters the step (a template argument, so the inner loop
// has no branch on it).
enum class WdMode : uint8_t { kNone, kL2, kDecoupled };

// Where the new parameter goes: nowhere, or a copy of this type.
enum class OutKind : uint8_t { kNone, kF32, kF16, kBF16 };

// The per-step constants broadcast to lanes. (Parameterised by Ops, not by
// the vector type: a vector type as a template argument loses its alignment
// attribute, which GCC warns about.)
template <class Ops>
struct LaneConstants {
  using V = typename Ops::V;
  V beta1, one_minus_beta1, beta2, one_minus_beta2;
  V neg_step_size, bias_correction2_sqrt, eps, weight_decay, decay, grad_scale;
};

template <class Ops>
LaneConstants<Ops> Broadcast(const AdamConstants& c) {
  return {Ops::Set1(c.beta1),         Ops::Set1(c.one_minus_beta1),
          Ops::Set1(c.beta2),         Ops::Set1(c.one_minus_beta2),
          Ops::Set1(c.neg_step_size), Ops::Set1(c.bias_correction2_sqrt),
          Ops::Set1(c.eps),           Ops::Set1(c.weight_decay),
          Ops::Set1(c.decay),         Ops::Set1(c.grad_scale)};
}

// One Adam step on a lane of elements: the formulas of adam.h, in torch's
// order of operations (each Mul/Add/Div/Sqrt rounds once, each Fma once).
template <class Ops, WdMode kMode>
inline void AdamLanes(const LaneConstants<Ops>& k, typename Ops::V& p,
                      typename Ops::V& m, typename Ops::V& v, typename Ops::V g) {
  using V = typename Ops::V;
  // Unscaling / clipping first, as torch does to .grad before the step
  // (exact for the default 1: x * 1 == x).
  g = Ops::Mul(g, k.grad_scale);
  if constexpr (kMode == WdMode::kL2) g = Ops::Fma(p, k.weight_decay, g);
  if constexpr (kMode == WdMode::kDecoupled) p = Ops::Mul(p, k.decay);
  m = Ops::Fma(g, k.one_minus_beta1, Ops::Mul(m, k.beta1));
  v = Ops::Fma(Ops::Mul(k.one_minus_beta2, g), g, Ops::Mul(v, k.beta2));
  V d = Ops::Div(Ops::Sqrt(v), k.bias_correction2_sqrt);
  d = Ops::Add(d, k.eps);
  p = Ops::Add(p, Ops::Div(Ops::Mul(k.neg_step_size, m), d));
}

// The scalar kernel (adam.cc); the AVX2 kernel hands it its tail.
void AdamUpdateScalar(const AdamConstants& c, const AdamSpan& s);

// The loop over a span for one combination of decay mode, gradient type and
// output kind.
template <class Ops, WdMode kMode, DType kGrad, OutKind kOut>
void AdamLoop(const AdamConstants& c, const AdamSpan& s) {
  using V = typename Ops::V;
  const LaneConstants<Ops> k = Broadcast<Ops>(c);
  float* const master = s.master;
  float* const exp_avg = s.exp_avg;
  float* const exp_avg_sq = s.exp_avg_sq;
  const void* const grad = s.grad;
  void* const out = s.param_out;
  const uint64_t n = s.n;
  uint64_t i = 0;
  for (; i + Ops::kWidth <= n; i += Ops::kWidth) {
    V p = Ops::Load(master + i);
    V m = Ops::Load(exp_avg + i);
    V v = Ops::Load(exp_avg_sq + i);
    const V g = Ops::template LoadGrad<kGrad>(grad, i);
    AdamLanes<Ops, kMode>(k, p, m, v, g);
    Ops::Store(master + i, p);
    Ops::Store(exp_avg + i, m);
    Ops::Store(exp_avg_sq + i, v);
    if constexpr (kOut != OutKind::kNone) Ops::template StoreOut<kOut>(out, i, p);
  }
  if constexpr (Ops::kWidth > 1) {
    if (i == n) return;
    if constexpr (Ops::kMaskedTail) {
      // Masked-off lanes load zeros and compute finite garbage that is never
      // stored; masked loads do not fault beyond the arrays.
      const auto mask = Ops::TailMask(n - i);
      V p = Ops::LoadMasked(master + i, mask);
      V m = Ops::LoadMasked(exp_avg + i, mask);
      V v = Ops::LoadMasked(exp_avg_sq + i, mask);
      const V g = Ops::template LoadGradMasked<kGrad>(grad, i, mask);
      AdamLanes<Ops, kMode>(k, p, m, v, g);
      Ops::StoreMasked(master + i, p, mask);
      Ops::StoreMasked(exp_avg + i, m, mask);
      Ops::StoreMasked(exp_avg_sq + i, v, mask);
      if constexpr (kOut != OutKind::kNone) {
        Ops::template StoreOutMasked<kOut>(out, i, p, mask);
      }
    } else {
      AdamUpdateScalar(c, SubSpan(s, i, n - i));
    }
  }
}

template <class Ops, WdMode kMode, DType kGrad>
void AdamDispatchOut(const AdamConstants& c, const AdamSpan& s) {
  if (s.param_out == nullptr) return AdamLoop<Ops, kMode, kGrad, OutKind::kNone>(c, s);
  switch (s.out_type) {
    case DType::kF32:
      return AdamLoop<Ops, kMode, kGrad, OutKind::kF32>(c, s);
    case DType::kF16:
      return AdamLoop<Ops, kMode, kGrad, OutKind::kF16>(c, s);
    case DType::kBF16:
      return AdamLoop<Ops, kMode, kGrad, OutKind::kBF16>(c, s);
  }
  std::abort();  // not a DType: memory corruption or a cast from garbage
}

template <class Ops, WdMode kMode>
void AdamDispatchGrad(const AdamConstants& c, const AdamSpan& s) {
  switch (s.grad_type) {
    case DType::kF32:
      return AdamDispatchOut<Ops, kMode, DType::kF32>(c, s);
    case DType::kF16:
      return AdamDispatchOut<Ops, kMode, DType::kF16>(c, s);
    case DType::kBF16:
      return AdamDispatchOut<Ops, kMode, DType::kBF16>(c, s);
  }
  std::abort();
}

// Entry point of each kernel: picks the instantiation for the span's types
// and the decay mode once, outside the element loop.
template <class Ops>
void AdamDispatch(const AdamConstants& c, const AdamSpan& s) {
  if (!c.apply_weight_decay) return AdamDispatchGrad<Ops, WdMode::kNone>(c, s);
  if (c.adamw) return AdamDispatchGrad<Ops, WdMode::kDecoupled>(c, s);
  return AdamDispatchGrad<Ops, WdMode::kL2>(c, s);
}

// The vector kernels (adam_avx2.cc, adam_avx512.cc), built on x86-64 only.
void AdamUpdateAvx2(const AdamConstants& c, const AdamSpan& s);
void AdamUpdateAvx512(const AdamConstants& c, const AdamSpan& s);

}  // namespace ztier::optim::internal
