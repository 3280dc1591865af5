// The AVX-512 kernel: 16 floats per __m512, the last n % 16 elements with
// masked loads and stores (which never fault on the masked-off lanes).
// Compiled with -mavx512f -mavx512bw -mavx2 -mfma -mf16c
// (optim/CMakeLists.txt) and only ever called after IsaAvailable(kAvx512).
// avx512bw is used for the 16-bit masked loads and stores. Nothing outside the
// anonymous namespace below may be an inline function or template
// instantiated here (see adam_kernel.h).

// GCC 12's own AVX-512 intrinsics start from _mm512_undefined_*() and so
// trip -Wmaybe-uninitialized once inlined (GCC bug 105593, fixed in 13). The
// state of a diagnostic pragma follows source locations, so it must come
// before the header whose code is reported.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <cstdint>

#include "optim/adam_kernel.h"

namespace ztier::optim::internal {
namespace {

constexpr int kHalfRounding = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

struct Avx512Ops {
  using V = __m512;
  // Tail masks: 16 float lanes; the 16-bit arrays use the low 16 of 32 lanes.
  using Mask = __mmask16;
  static constexpr uint64_t kWidth = 16;
  static constexpr bool kMaskedTail = true;

  static V Set1(float x) { return _mm512_set1_ps(x); }
  static V Mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V Add(V a, V b) { return _mm512_add_ps(a, b); }
  static V Div(V a, V b) { return _mm512_div_ps(a, b); }
  static V Sqrt(V a) { return _mm512_sqrt_ps(a); }
  static V Fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V Load(const float* p) { return _mm512_loadu_ps(p); }
  static void Store(float* p, V x) { _mm512_storeu_ps(p, x); }

  static Mask TailMask(uint64_t count) {  // count in [1, 15]
    return static_cast<Mask>((1u << count) - 1);
  }
  static V LoadMasked(const float* p, Mask k) { return _mm512_maskz_loadu_ps(k, p); }
  static void StoreMasked(float* p, V x, Mask k) { _mm512_mask_storeu_ps(p, k, x); }

  // 16-bit values to floats: f16 through F16C's 512-bit form, bf16 as the
  // top half of a float.
  template <DType kType>
  static V Widen(__m256i h) {
    if constexpr (kType == DType::kF16) {
      return _mm512_cvtph_ps(h);
    } else {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
  }

  template <DType kType>
  static V LoadGrad(const void* base, uint64_t i) {
    if constexpr (kType == DType::kF32) {
      return _mm512_loadu_ps(static_cast<const float*>(base) + i);
    } else {
      return Widen<kType>(_mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + i)));
    }
  }

  template <DType kType>
  static V LoadGradMasked(const void* base, uint64_t i, Mask k) {
    if constexpr (kType == DType::kF32) {
      return _mm512_maskz_loadu_ps(k, static_cast<const float*>(base) + i);
    } else {
      const __m512i h = _mm512_maskz_loadu_epi16(k, static_cast<const uint16_t*>(base) + i);
      return Widen<kType>(_mm512_castsi512_si256(h));
    }
  }

  // FloatToBf16 on 16 lanes, each result in the low 16 bits of its lane:
  // (x + 0x7fff + lsb) >> 16, NaN -> sign | 0x7fc0.
  static __m512i Bf16Lanes(V x) {
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i hi = _mm512_srli_epi32(bits, 16);
    const __m512i lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_srli_epi32(
        _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), lsb), 16);
    const __m512i quiet = _mm512_or_si512(_mm512_and_si512(hi, _mm512_set1_epi32(0x8000)),
                                          _mm512_set1_epi32(0x7fc0));
    const __mmask16 is_nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    return _mm512_mask_blend_epi32(is_nan, rounded, quiet);
  }

  template <OutKind kOut>
  static void StoreOut(void* base, uint64_t i, V x) {
    if constexpr (kOut == OutKind::kF32) {
      _mm512_storeu_ps(static_cast<float*>(base) + i, x);
    } else {
      __m256i* const dst = reinterpret_cast<__m256i*>(static_cast<uint16_t*>(base) + i);
      if constexpr (kOut == OutKind::kF16) {
        _mm256_storeu_si256(dst, _mm512_cvtps_ph(x, kHalfRounding));
      } else if constexpr (kOut == OutKind::kBF16) {
        _mm256_storeu_si256(dst, _mm512_cvtepi32_epi16(Bf16Lanes(x)));
      }
    }
  }

  template <OutKind kOut>
  static void StoreOutMasked(void* base, uint64_t i, V x, Mask k) {
    if constexpr (kOut == OutKind::kF32) {
      _mm512_mask_storeu_ps(static_cast<float*>(base) + i, k, x);
    } else {
      uint16_t* const dst = static_cast<uint16_t*>(base) + i;
      if constexpr (kOut == OutKind::kF16) {
        const __m256i h = _mm512_cvtps_ph(x, kHalfRounding);
        _mm512_mask_storeu_epi16(dst, k, _mm512_castsi256_si512(h));
      } else if constexpr (kOut == OutKind::kBF16) {
        _mm512_mask_cvtepi32_storeu_epi16(dst, k, Bf16Lanes(x));
      }
    }
  }
};

}  // namespace

void AdamUpdateAvx512(const AdamConstants& c, const AdamSpan& s) {
  AdamDispatch<Avx512Ops>(c, s);
}

}  // namespace ztier::optim::internal
