#include "optim/grad_math.h"

#include <cstdlib>
#include <cstring>

#include "optim/element.h"

namespace ztier::optim {
namespace {

template <DType T>
void Accumulate(void* acc, const void* in, uint64_t n) {
  for (uint64_t i = 0; i < n; ++i) StoreElement<T>(acc, i, LoadElement<T>(acc, i) + LoadElement<T>(in, i));
}

template <DType T>
double Squares(const void* data, uint64_t n) {
  // Eight partial sums: independent chains the compiler can vectorise.
  double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  uint64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) {
      const double v = LoadElement<T>(data, i + k);
      part[k] += v * v;
    }
  }
  for (; i < n; ++i) {
    const double v = LoadElement<T>(data, i);
    part[0] += v * v;
  }
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

}  // namespace

void AccumulateGrad(void* acc, const void* in, uint64_t n, DType type) {
  switch (type) {
    case DType::kF32:
      return Accumulate<DType::kF32>(acc, in, n);
    case DType::kF16:
      return Accumulate<DType::kF16>(acc, in, n);
    case DType::kBF16:
      return Accumulate<DType::kBF16>(acc, in, n);
  }
  std::abort();  // not a DType
}

double SumSquares(const void* data, uint64_t n, DType type) {
  switch (type) {
    case DType::kF32:
      return Squares<DType::kF32>(data, n);
    case DType::kF16:
      return Squares<DType::kF16>(data, n);
    case DType::kBF16:
      return Squares<DType::kBF16>(data, n);
  }
  std::abort();
}

}  // namespace ztier::optim
