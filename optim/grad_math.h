// Element-wise work on gradient partitions, done as they are handed in:
// accumulation across micro-batches (torch's `param.grad += g`) and the one
// summary the step needs (the squared L2 norm, which is not finite exactly
// when some element is not), so that gradient clipping and loss scaling
// never take an extra pass over gradients that have gone to NVMe.
//
// Thread-safety: pure functions over the arrays given.
#pragma once

#include <cstdint>

#include "optim/adam.h"

namespace ztier::optim {

// acc[i] = round_to_type(float(acc[i]) + float(in[i])) for i < n: one
// float32 addition per element, rounded (to nearest even) to the type, the
// same bits as torch's in-place add on CPU for float32, float16 and bfloat16.
void AccumulateGrad(void* acc, const void* in, uint64_t n, DType type);

// Sum of the squares of the n elements, each converted to double (no float
// product can overflow there): finite exactly when every element is.
double SumSquares(const void* data, uint64_t n, DType type);

}  // namespace ztier::optim
