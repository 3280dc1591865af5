#include "tiering/cudart.h"

#include <fmt/format.h>

#include <string>
#include <vector>

namespace ztier::tiering {
namespace {

#define ZTIER_CUDART_STR_INNER(x) #x
#define ZTIER_CUDART_STR(x) ZTIER_CUDART_STR_INNER(x)

constexpr int kBuiltMajor = CUDART_VERSION / 1000;

// Resolves every function of the table from `lib`, then checks the version.
Status Resolve(const SharedLibrary& lib, CudaRuntimeApi* api) {
#define ZTIER_CUDART_RESOLVE(fn)                                           \
  {                                                                        \
    ZTIER_ASSIGN_OR_RETURN(void* p, FindSymbol(lib, ZTIER_CUDART_STR(fn))); \
    api->fn = reinterpret_cast<decltype(api->fn)>(p);                      \
  }
  ZTIER_CUDART_FUNCTIONS(ZTIER_CUDART_RESOLVE)
#undef ZTIER_CUDART_RESOLVE
  int version = 0;
  const cudaError_t err = api->cudaRuntimeGetVersion(&version);
  if (err != cudaSuccess) {
    return Status::Unavailable(
        fmt::format("cudaRuntimeGetVersion failed ({})", static_cast<int>(err)));
  }
  if (version / 1000 != kBuiltMajor) {
    return Status::Unavailable(fmt::format(
        "it is CUDA runtime {}.{}, ztier was built for CUDA {}.x", version / 1000,
        version % 1000 / 10, kBuiltMajor));
  }
  api->version = version;
  return Status::Ok();
}

// The built major's soname first: the one ztier's headers describe.
std::vector<std::string> Sonames() {
  std::vector<std::string> names{fmt::format("libcudart.so.{}", kBuiltMajor)};
  for (int major : {13, 12}) {
    if (major != kBuiltMajor) names.push_back(fmt::format("libcudart.so.{}", major));
  }
  names.push_back("libcudart.so");
  return names;
}

}  // namespace

Result<std::unique_ptr<const CudaRuntimeApi>> LoadCudaRuntime() {
  auto api = std::make_unique<CudaRuntimeApi>();
  SharedLibrarySearch search;
  search.what = "the CUDA runtime (libcudart)";
  search.env_var = "ZTIER_CUDART_LIBRARY";
  search.sonames = Sonames();
  search.fix = fmt::format(
      "install the CUDA {} runtime (libcudart.so.{}) where the dynamic loader finds it "
      "(ldconfig or LD_LIBRARY_PATH), or set ZTIER_CUDART_LIBRARY to its path; "
      "or use the host device instead",
      kBuiltMajor, kBuiltMajor);
  search.accept = [&api](const SharedLibrary& lib) { return Resolve(lib, api.get()); };
  ZTIER_ASSIGN_OR_RETURN(api->library, OpenSharedLibrary(search));
  return std::unique_ptr<const CudaRuntimeApi>(std::move(api));
}

Result<const CudaRuntimeApi*> CudaRuntime() {
  // Never destroyed: streams' host callbacks may still run during exit.
  static const auto* const loaded =
      new Result<std::unique_ptr<const CudaRuntimeApi>>(LoadCudaRuntime());
  if (!loaded->ok()) return loaded->status();
  return loaded->value().get();
}

}  // namespace ztier::tiering
