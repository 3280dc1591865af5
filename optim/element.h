// One element of a parameter or gradient buffer (float32, float16 or
// bfloat16) as float32 and back: the conversion every loop over such
// buffers makes (the update, gradient accumulation, the initial master
// weights, checkpoint export). 16-bit encodings go through base/float16.
#pragma once

#include <cstdint>

#include "base/float16.h"
#include "optim/adam.h"

namespace ztier::optim {

// Element i of `base`, of type T (a compile-time type: for inner loops).
template <DType T>
inline float LoadElement(const void* base, uint64_t i) {
  if constexpr (T == DType::kF32) {
    return static_cast<const float*>(base)[i];
  } else if constexpr (T == DType::kF16) {
    return HalfToFloat(static_cast<const uint16_t*>(base)[i]);
  } else {
    return Bf16ToFloat(static_cast<const uint16_t*>(base)[i]);
  }
}

template <DType T>
inline void StoreElement(void* base, uint64_t i, float v) {
  if constexpr (T == DType::kF32) {
    static_cast<float*>(base)[i] = v;
  } else if constexpr (T == DType::kF16) {
    static_cast<uint16_t*>(base)[i] = FloatToHalf(v);
  } else {
    static_cast<uint16_t*>(base)[i] = FloatToBf16(v);
  }
}

// The same with the type known at run time (outside inner loops).
inline float ElementToFloat(const void* base, uint64_t i, DType t) {
  switch (t) {
    case DType::kF16: return LoadElement<DType::kF16>(base, i);
    case DType::kBF16: return LoadElement<DType::kBF16>(base, i);
    default: return LoadElement<DType::kF32>(base, i);
  }
}

}  // namespace ztier::optim
