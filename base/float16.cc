#include "base/float16.h"

#include <bit>

namespace ztier {

uint16_t FloatToHalf(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
  const uint32_t a = x & 0x7fffffff;
  if (a > 0x7f800000) {  // NaN: quiet, keep the top 9 payload bits
    return static_cast<uint16_t>(sign | 0x7e00 | ((a >> 13) & 0x3ff));
  }
  // 65520 = 0x477ff000 is halfway between 65504 (the largest half, odd
  // mantissa) and 2^16: it and everything above round to inf.
  if (a >= 0x477ff000) return static_cast<uint16_t>(sign | 0x7c00);
  if (a >= 0x38800000) {  // >= 2^-14: a normal half
    // Rebias the exponent (127 -> 15), then round the 13 dropped mantissa
    // bits to nearest even; a carry into the exponent is the right result.
    const uint32_t r = a - 0x38000000;
    return static_cast<uint16_t>(sign | ((r + 0xfff + ((r >> 13) & 1)) >> 13));
  }
  // Half subnormal (or zero): the result is round(a * 2^24) in units of
  // 2^-24. a = mant * 2^(e - 150) with the implicit bit in mant, so the
  // count is mant >> (126 - e), rounded to nearest even. 0x400 (2^-14) is
  // also the right encoding for a value that rounds up to the smallest
  // normal.
  const uint32_t e = a >> 23;
  if (e < 102) return sign;  // < 2^-25 (float subnormals included): rounds to 0
  const uint32_t mant = (a & 0x7fffff) | 0x800000;
  const uint32_t shift = 126 - e;  // 14..24
  const uint32_t half = 1u << (shift - 1);
  const uint32_t rem = mant & ((1u << shift) - 1);
  uint32_t q = mant >> shift;
  if (rem > half || (rem == half && (q & 1))) ++q;
  return static_cast<uint16_t>(sign | q);
}

float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t e = (h >> 10) & 0x1f;
  const uint32_t m = h & 0x3ff;
  if (e == 0x1f) {  // inf, or NaN made quiet
    return std::bit_cast<float>(sign | 0x7f800000 | (m != 0 ? 0x400000 | (m << 13) : 0));
  }
  if (e == 0) {  // zero or subnormal: m * 2^-24, exact in float
    return std::bit_cast<float>(sign | std::bit_cast<uint32_t>(static_cast<float>(m) * 0x1p-24f));
  }
  return std::bit_cast<float>(sign | ((e + 112) << 23) | (m << 13));
}

uint16_t FloatToBf16(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  if ((x & 0x7fffffff) > 0x7f800000) {
    return static_cast<uint16_t>(((x >> 16) & 0x8000) | 0x7fc0);
  }
  // Round to nearest even on the bit pattern; a finite value past the largest
  // bf16 carries into the exponent and becomes inf.
  return static_cast<uint16_t>((x + 0x7fff + ((x >> 16) & 1)) >> 16);
}

float Bf16ToFloat(uint16_t h) { return std::bit_cast<float>(static_cast<uint32_t>(h) << 16); }

}  // namespace ztier
