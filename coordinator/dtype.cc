#include <fmt/format.h>

#include "coordinator/collective.h"

namespace ztier::coordinator {

uint32_t DTypeBytes(DType t) {
  switch (t) {
    case DType::kFloat32: return 4;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
    case DType::kUInt8: return 1;
  }
  return 1;
}

std::string_view DTypeName(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kUInt8: return "uint8";
  }
  return "?";
}

Result<DType> ParseDType(std::string_view name) {
  if (name == "float32" || name == "fp32") return DType::kFloat32;
  if (name == "float16" || name == "fp16") return DType::kFloat16;
  if (name == "bfloat16" || name == "bf16") return DType::kBFloat16;
  if (name == "uint8") return DType::kUInt8;
  return Status::InvalidArgument(fmt::format(
      "unknown dtype '{}' (use float32, float16, bfloat16 or uint8)", name));
}

}  // namespace ztier::coordinator
