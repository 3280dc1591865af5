#include "base/dynlib.h"

#include <dlfcn.h>

#include <cstdlib>
#include <utility>

#include <fmt/format.h>

namespace ztier {
namespace {

// dlerror's text for the last failure on this thread, never null.
std::string LoaderError() {
  const char* e = dlerror();
  return e != nullptr ? e : "unknown dynamic-loader error";
}

// One candidate that did not work, and why.
struct Refusal {
  std::string name;
  std::string reason;
};

// Opens `name` with `flags`; on success asks `accept`. Returns the library,
// or nothing with the reason added to `refused` (NOLOAD misses are not
// reasons: "not loaded yet" tells the user nothing).
bool TryOpen(const SharedLibrarySearch& search, const std::string& name, int flags,
             std::vector<Refusal>* refused, SharedLibrary* out) {
  const bool noload = (flags & RTLD_NOLOAD) != 0;
  void* handle = dlopen(name.c_str(), flags);
  if (handle == nullptr) {
    std::string why = LoaderError();
    if (!noload) refused->push_back({name, std::move(why)});
    return false;
  }
  SharedLibrary lib{handle, name, noload};
  if (search.accept) {
    Status ok = search.accept(lib);
    if (!ok.ok()) {
      refused->push_back({name, std::string(ok.message())});
      dlclose(handle);
      return false;
    }
  }
  *out = std::move(lib);
  return true;
}

Status NotLoadable(const SharedLibrarySearch& search, std::string_view tried_from,
                   const std::vector<Refusal>& refused) {
  std::string msg = fmt::format("{} cannot be loaded{}:", search.what, tried_from);
  for (size_t i = 0; i < refused.size(); ++i) {
    msg += fmt::format("{} {} ({})", i ? ";" : "", refused[i].name, refused[i].reason);
  }
  if (!search.fix.empty()) msg += fmt::format("; fix: {}", search.fix);
  return Status::Unavailable(std::move(msg));
}

}  // namespace

Result<SharedLibrary> OpenSharedLibrary(const SharedLibrarySearch& search) {
  std::vector<Refusal> refused;
  SharedLibrary lib;
  const char* path = search.env_var.empty() ? nullptr : std::getenv(search.env_var.c_str());
  if (path != nullptr && path[0] != '\0') {
    if (TryOpen(search, path, RTLD_NOW | RTLD_LOCAL, &refused, &lib)) return lib;
    return NotLoadable(search, fmt::format(" from {}={}", search.env_var, path), refused);
  }
  for (const std::string& name : search.sonames) {
    if (TryOpen(search, name, RTLD_NOW | RTLD_NOLOAD, &refused, &lib)) return lib;
  }
  // A name refused above is loaded already: opening it again would return
  // the same library and the same refusal.
  const size_t refused_loaded = refused.size();
  for (const std::string& name : search.sonames) {
    bool seen = false;
    for (size_t i = 0; i < refused_loaded; ++i) seen = seen || refused[i].name == name;
    if (!seen && TryOpen(search, name, RTLD_NOW | RTLD_LOCAL, &refused, &lib)) return lib;
  }
  return NotLoadable(search, "", refused);
}

Result<void*> FindSymbol(const SharedLibrary& library, const char* symbol) {
  (void)dlerror();  // a stale error must not be taken for this lookup's
  void* p = dlsym(library.handle, symbol);
  if (p == nullptr) {
    return Status::Unavailable(fmt::format("{} has no symbol {} ({}); it is older than ztier needs",
                                           library.name, symbol, LoaderError()));
  }
  return p;
}

}  // namespace ztier
