#include "coordinator/nccl_api.h"

#include <fmt/format.h>

namespace ztier::coordinator {
namespace {

#define ZTIER_NCCL_STR_INNER(x) #x
#define ZTIER_NCCL_STR(x) ZTIER_NCCL_STR_INNER(x)

// NCCL's version code was 1000 x major + 100 x minor + patch before 2.9.
int MajorOf(int code) { return code >= 10000 ? code / 10000 : code / 1000; }

// Resolves every function of the table from `lib`, then checks the version.
Status Resolve(const SharedLibrary& lib, NcclApi* api) {
#define ZTIER_NCCL_RESOLVE(fn)                                           \
  {                                                                      \
    ZTIER_ASSIGN_OR_RETURN(void* p, FindSymbol(lib, ZTIER_NCCL_STR(fn))); \
    api->fn = reinterpret_cast<decltype(api->fn)>(p);                    \
  }
  ZTIER_NCCL_FUNCTIONS(ZTIER_NCCL_RESOLVE)
#undef ZTIER_NCCL_RESOLVE
  int version = 0;
  const ncclResult_t r = api->ncclGetVersion(&version);
  if (r != ncclSuccess) {
    return Status::Unavailable(fmt::format("ncclGetVersion failed ({})", static_cast<int>(r)));
  }
  if (MajorOf(version) != NCCL_MAJOR) {
    return Status::Unavailable(fmt::format("it is NCCL version code {}, ztier was built for NCCL {}.x",
                                           version, NCCL_MAJOR));
  }
  api->version = version;
  return Status::Ok();
}

}  // namespace

Result<std::unique_ptr<const NcclApi>> LoadNccl() {
  auto api = std::make_unique<NcclApi>();
  SharedLibrarySearch search;
  search.what = "NCCL (libnccl)";
  search.env_var = "ZTIER_NCCL_LIBRARY";
  search.sonames = {fmt::format("libnccl.so.{}", NCCL_MAJOR), "libnccl.so"};
  search.fix = fmt::format(
      "install NCCL {}.x (2.14 or later) where the dynamic loader finds it (ldconfig or "
      "LD_LIBRARY_PATH), or set ZTIER_NCCL_LIBRARY to the path of libnccl.so.{}; "
      "or use comm.backend gloo",
      NCCL_MAJOR, NCCL_MAJOR);
  search.accept = [&api](const SharedLibrary& lib) { return Resolve(lib, api.get()); };
  ZTIER_ASSIGN_OR_RETURN(api->library, OpenSharedLibrary(search));
  return std::unique_ptr<const NcclApi>(std::move(api));
}

Result<const NcclApi*> Nccl() {
  // Never destroyed: communicators may still be released during exit.
  static const auto* const loaded = new Result<std::unique_ptr<const NcclApi>>(LoadNccl());
  if (!loaded->ok()) return loaded->status();
  return loaded->value().get();
}

}  // namespace ztier::coordinator
