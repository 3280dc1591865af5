// NCCL, loaded at run time (base/dynlib.h says why and how it is searched
// for). Compiled against nccl.h only, for types and constants: include this
// only where ZTIER_HAVE_NCCL is defined.
//
// Calls go through the table: `nccl.ncclAllGather(...)`, each pointer typed
// as the header declares it.
//
// Where: ZTIER_NCCL_LIBRARY (a path), else libnccl.so.2 / libnccl.so,
// already loaded first. That preference is what makes an ncclComm_t created
// by a framework usable here: a communicator may only be handed to the NCCL
// that created it, and the framework's copy is the one already in the
// process. A library of another major version than nccl.h's is refused, and
// one without every function below (NCCL older than 2.14) too.
#pragma once

#include <nccl.h>

#include <memory>

#include "base/dynlib.h"
#include "base/status.h"

// Every NCCL function ztier calls.
#define ZTIER_NCCL_FUNCTIONS(X) \
  X(ncclGetVersion)             \
  X(ncclGetErrorString)         \
  X(ncclGetLastError)           \
  X(ncclGetUniqueId)            \
  X(ncclCommInitRank)           \
  X(ncclCommFinalize)           \
  X(ncclCommAbort)              \
  X(ncclCommDestroy)            \
  X(ncclCommCount)              \
  X(ncclCommUserRank)           \
  X(ncclCommCuDevice)           \
  X(ncclCommGetAsyncError)      \
  X(ncclAllGather)              \
  X(ncclReduceScatter)

namespace ztier::coordinator {

struct NcclApi {
  SharedLibrary library;
  // ncclGetVersion's code: 10000 x major + 100 x minor + patch.
  int version = 0;
#define ZTIER_NCCL_MEMBER(fn) decltype(&::fn) fn = nullptr;
  ZTIER_NCCL_FUNCTIONS(ZTIER_NCCL_MEMBER)
#undef ZTIER_NCCL_MEMBER
};

// Searches, opens and resolves now, reading ZTIER_NCCL_LIBRARY now; every
// call searches again. Unavailable, naming what was tried and how to fix it,
// when no usable NCCL is found. For tests and diagnostics: the collective
// uses Nccl().
Result<std::unique_ptr<const NcclApi>> LoadNccl();

// The process's NCCL: loaded by the first call (thread-safe), the same table
// or the same error for every later one.
Result<const NcclApi*> Nccl();

}  // namespace ztier::coordinator
