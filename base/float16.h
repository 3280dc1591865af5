// float32 <-> float16 (IEEE half) and bfloat16 conversions, one element at a
// time: the scalar Adam kernel and the host collective's reductions both use
// these, and the vector kernels give the same bits.
//
// Rounding is to nearest, ties to even; overflow gives inf; half subnormals
// are produced and read exactly, as F16C does. A NaN stays a NaN and becomes
// quiet (FloatToHalf/HalfToFloat keep the payload's top bits; FloatToBf16
// gives sign | 0x7fc0). Bf16ToFloat is the exact 16-bit shift (a signalling
// NaN stays signalling). Widening is exact.
#pragma once

#include <cstdint>

namespace ztier {

uint16_t FloatToHalf(float f);
float HalfToFloat(uint16_t h);
uint16_t FloatToBf16(float f);
float Bf16ToFloat(uint16_t h);

}  // namespace ztier
