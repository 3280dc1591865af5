// The AVX2 kernel: 8 floats per __m256. Compiled with -mavx2 -mfma -mf16c
// (optim/CMakeLists.txt) and only ever called after IsaAvailable(kAvx2).
// The last n % 8 elements go to the scalar kernel, which gives the same
// bits. Nothing outside the anonymous namespace below may be an inline
// function or template instantiated here (see adam_kernel.h).
#include <immintrin.h>

#include <cstdint>

#include "optim/adam_kernel.h"

namespace ztier::optim::internal {
namespace {

struct Avx2Ops {
  using V = __m256;
  static constexpr uint64_t kWidth = 8;
  static constexpr bool kMaskedTail = false;

  static V Set1(float x) { return _mm256_set1_ps(x); }
  static V Mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V Add(V a, V b) { return _mm256_add_ps(a, b); }
  static V Div(V a, V b) { return _mm256_div_ps(a, b); }
  static V Sqrt(V a) { return _mm256_sqrt_ps(a); }
  static V Fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V Load(const float* p) { return _mm256_loadu_ps(p); }
  static void Store(float* p, V x) { _mm256_storeu_ps(p, x); }

  template <DType kType>
  static V LoadGrad(const void* base, uint64_t i) {
    if constexpr (kType == DType::kF32) {
      return _mm256_loadu_ps(static_cast<const float*>(base) + i);
    } else {
      const __m128i h = _mm_loadu_si128(
          reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
      if constexpr (kType == DType::kF16) {
        return _mm256_cvtph_ps(h);
      } else {  // bf16: the top half of a float
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
      }
    }
  }

  template <OutKind kOut>
  static void StoreOut(void* base, uint64_t i, V x) {
    if constexpr (kOut == OutKind::kF32) {
      _mm256_storeu_ps(static_cast<float*>(base) + i, x);
    } else {
      __m128i* const dst =
          reinterpret_cast<__m128i*>(static_cast<uint16_t*>(base) + i);
      if constexpr (kOut == OutKind::kF16) {
        _mm_storeu_si128(dst, _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      } else if constexpr (kOut == OutKind::kBF16) {
        // FloatToBf16 on 8 lanes: (x + 0x7fff + lsb) >> 16, NaN -> sign | 0x7fc0.
        const __m256i bits = _mm256_castps_si256(x);
        const __m256i hi = _mm256_srli_epi32(bits, 16);
        const __m256i lsb = _mm256_and_si256(hi, _mm256_set1_epi32(1));
        const __m256i rounded = _mm256_srli_epi32(
            _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), lsb), 16);
        const __m256i quiet = _mm256_or_si256(_mm256_and_si256(hi, _mm256_set1_epi32(0x8000)),
                                              _mm256_set1_epi32(0x7fc0));
        const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
        const __m256i r = _mm256_blendv_epi8(rounded, quiet, is_nan);
        // Every lane is <= 0xffff, so the unsigned saturating pack is exact.
        _mm_storeu_si128(dst, _mm_packus_epi32(_mm256_castsi256_si128(r),
                                               _mm256_extracti128_si256(r, 1)));
      }
    }
  }
};

}  // namespace

void AdamUpdateAvx2(const AdamConstants& c, const AdamSpan& s) { AdamDispatch<Avx2Ops>(c, s); }

}  // namespace ztier::optim::internal
