// Shared libraries opened at run time (dlopen) instead of linked: the CUDA
// runtime and NCCL. Linking them would make libztier.so and the `ztier`
// command refuse to start on a machine without that exact CUDA, and inside a
// framework that already carries its own copy (PyTorch) it would add a
// second one beside it, whose communicators and streams are not the
// framework's.
//
// The search, in order:
//  1. `env_var` (a path), when set and not empty: that file only. An
//     explicit choice that does not load is an error, never a silent
//     fallback to another copy.
//  2. each soname already loaded in the process (RTLD_NOLOAD), so that the
//     copy a framework brought is the one used;
//  3. each soname through the ordinary dynamic-loader search
//     (LD_LIBRARY_PATH, the rpath, ld.so.cache).
// A candidate that opens is handed to `accept` (symbol lookup, version
// check); one it refuses is closed and its reason kept for the error.
//
// Handles of accepted libraries are never closed: function pointers taken
// from them stay valid for the life of the process.
#pragma once

#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"

namespace ztier {

struct SharedLibrary {
  void* handle = nullptr;
  // The soname or path that opened it.
  std::string name;
  // True when it was already in the process before ztier asked for it.
  bool was_loaded = false;
};

struct SharedLibrarySearch {
  // For messages: "the CUDA runtime".
  std::string what;
  // Environment variable holding a path that overrides the search.
  std::string env_var;
  // Tried in this order, in each of the two passes.
  std::vector<std::string> sonames;
  // How to make the library loadable, appended to the error.
  std::string fix;
  // Decides whether an opened candidate is usable; may be empty.
  std::function<Status(const SharedLibrary&)> accept;
};

// The first candidate that opens and is accepted, or Unavailable naming
// every candidate tried with the loader's reason for each, and `fix`.
Result<SharedLibrary> OpenSharedLibrary(const SharedLibrarySearch& search);

// The address of `symbol` in `library`, or Unavailable naming both (a
// library too old for ztier lacks some).
Result<void*> FindSymbol(const SharedLibrary& library, const char* symbol);

}  // namespace ztier
