// The CPU Adam / AdamW update of the fp32 optimizer state, bit-exact with
// torch 1.13's AdamW (and Adam) on CPU, in three versions: portable scalar
// code, AVX2 (+FMA, F16C) and AVX-512 (F, BW). All three run one per-element
// algorithm (optim/adam_kernel.h), so for the same input they give the same
// bits, tails included.
//
// The arithmetic, every value float32 and every operation rounded on its own
// except where fma (one rounding) is named; the constants are computed once
// per step in double and then cast to float (MakeConstants):
//
//   g = g * grad_scale                 (1 / loss scale, a clip coefficient)
//   Adam (L2), if weight_decay != 0:   g = fma(p, weight_decay, g)
//   AdamW,     if weight_decay != 0:   p = p * (1 - lr * weight_decay)
//   m = fma(g, 1 - beta1, m * beta1)
//   v = fma((1 - beta2) * g, g, v * beta2)
//   d = sqrt(v) / sqrt(bias_correction2) + eps
//   p = p + (-lr / bias_correction1) * m / d
//   param_out = p rounded (to nearest even) to the output type
//
// NaN inputs give NaN outputs, but which NaN payload an operation with two
// NaN operands keeps is not specified, so only finite inputs are guaranteed
// to give the same bits across ISAs.
//
// Thread-safety: every function here is pure or touches only the arrays it
// is given; calls on disjoint spans may run concurrently.
#pragma once

#include <cstdint>
#include <string_view>

#include "base/status.h"

namespace ztier::optim {

// The instruction set a kernel is written for.
enum class Isa : uint8_t { kScalar = 0, kAvx2, kAvx512 };

// "scalar", "avx2", "avx512".
std::string_view IsaName(Isa isa);
// The inverse of IsaName; any other text is InvalidArgument naming the valid
// ones.
Result<Isa> ParseIsa(std::string_view name);
// The fastest ISA this build and this CPU run (checked at run time):
// AVX2 needs avx2, fma and f16c; AVX-512 needs avx512f and avx512bw on top
// (its file is also built with the AVX2 flags, so it may use them).
Isa BestIsa();
// Whether `isa` is compiled into this build and supported by this CPU (and
// its OS, which must save the wider registers). kScalar always is.
bool IsaAvailable(Isa isa);

// Element types of gradients and parameter copies.
enum class DType : uint8_t { kF32 = 0, kF16, kBF16 };
// Bytes per element: 4, 2, 2.
uint32_t DTypeBytes(DType t);

// The user's hyperparameters, in double as torch keeps them.
struct AdamHyper {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  bool adamw = true;            // decoupled weight decay (AdamW); false: L2 (Adam)
  bool bias_correction = true;
  // Multiplies every gradient before the update: 1 / the loss scale, a
  // gradient-clipping coefficient, or their product. 1: unchanged.
  double grad_scale = 1.0;
};

// OK if lr >= 0, 0 <= beta1, beta2 < 1, eps > 0, weight_decay >= 0,
// grad_scale >= 0 and all
// are finite; else InvalidArgument naming the field and its value.
Status ValidateHyper(const AdamHyper& h);

// Per-step float constants (see the formulas above), computed once per step
// by MakeConstants; the kernels only read them.
struct AdamConstants {
  float beta1 = 0.9f;              // (float)beta1
  float one_minus_beta1 = 0.1f;    // (float)(1 - beta1), the subtraction in double
  float beta2 = 0.999f;            // (float)beta2
  float one_minus_beta2 = 0.001f;  // (float)(1 - beta2)
  float neg_step_size = -1e-3f;    // (float)(-(lr / bias_correction1))
  float bias_correction2_sqrt = 1.0f;  // (float)sqrt(bias_correction2)
  float eps = 1e-8f;               // (float)eps
  float weight_decay = 0.0f;       // (float)weight_decay: the L2 term (Adam)
  float decay = 1.0f;              // (float)(1 - lr * weight_decay): AdamW's factor
  bool adamw = true;               // decoupled decay (decay) or L2 (weight_decay)
  bool apply_weight_decay = false; // weight_decay != 0
  float grad_scale = 1.0f;         // (float)grad_scale
};

// The constants of step `step` (1-based: the first update is step 1; 0 is
// taken as 1, since bias correction divides by 1 - beta1^step). `h` should
// pass ValidateHyper.
AdamConstants MakeConstants(const AdamHyper& h, uint64_t step);

// One contiguous range of n elements. master, exp_avg, exp_avg_sq: the fp32
// state, updated in place. grad: n elements of grad_type, only read.
// param_out: n elements of out_type that receive the new master rounded to
// out_type, or nullptr for no output. The arrays must not overlap (except
// that nothing else is written through grad). Any alignment works; 64-byte
// alignment is fastest.
struct AdamSpan {
  float* master = nullptr;
  float* exp_avg = nullptr;
  float* exp_avg_sq = nullptr;
  const void* grad = nullptr;
  DType grad_type = DType::kF32;
  void* param_out = nullptr;
  DType out_type = DType::kF32;
  uint64_t n = 0;
};

// Runs one Adam step over `s` on the calling thread with the kernel for
// `isa`. `isa` must be available (IsaAvailable): otherwise the process
// aborts, as it would otherwise die of an illegal instruction anyway. Does
// not allocate.
void AdamUpdate(const AdamConstants& c, const AdamSpan& s, Isa isa);

// Elements [begin, begin + count) of `s` (begin + count <= s.n).
AdamSpan SubSpan(const AdamSpan& s, uint64_t begin, uint64_t count);

}  // namespace ztier::optim
