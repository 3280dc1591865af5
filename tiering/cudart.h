// The CUDA runtime, loaded at run time (base/dynlib.h says why and how it is
// searched for). Compiled against the toolkit's headers only, for types and
// constants: include this only where ZTIER_HAVE_CUDA is defined.
//
// Calls go through the table: `rt.cudaSetDevice(d)` for `cudaSetDevice(d)`.
// Each pointer has the type of the header's declaration, so a call is
// checked as the direct call was. Defaulted arguments of the header must be
// passed explicitly.
//
// Where: ZTIER_CUDART_LIBRARY (a path), else libcudart.so.<major ztier was
// built with> / other majors / libcudart.so, already loaded first. A runtime
// whose major version differs from the headers' is refused: structures such
// as cudaDeviceProp change between majors.
#pragma once

#include <cuda_runtime_api.h>

#include <memory>

#include "base/dynlib.h"
#include "base/status.h"

// Every runtime function ztier calls: ZTIER_CUDART_DECLARED, typed from the
// header's declaration, and ZTIER_CUDART_OVERLOADED, which cuda_runtime.h
// (included by nccl.h) overloads with C++ templates, so their C signature is
// spelled out in CudaRuntimeApi. A header that #defines a name to a
// versioned symbol (cudaGetDeviceProperties -> cudaGetDeviceProperties_v2 in
// CUDA 12) is followed: the macro argument is expanded before it is
// stringized, so the exported name is looked up.
#define ZTIER_CUDART_FUNCTIONS(X) \
  ZTIER_CUDART_DECLARED(X)        \
  ZTIER_CUDART_OVERLOADED(X)
#define ZTIER_CUDART_OVERLOADED(X) X(cudaMalloc) X(cudaMallocAsync)
#define ZTIER_CUDART_DECLARED(X)  \
  X(cudaRuntimeGetVersion)        \
  X(cudaGetLastError)             \
  X(cudaGetErrorString)           \
  X(cudaGetErrorName)             \
  X(cudaGetDeviceCount)           \
  X(cudaSetDevice)                \
  X(cudaGetDeviceProperties)      \
  X(cudaDeviceGetAttribute)       \
  X(cudaDeviceSynchronize)        \
  X(cudaMemGetInfo)               \
  X(cudaFree)                     \
  X(cudaFreeAsync)                \
  X(cudaPointerGetAttributes)     \
  X(cudaStreamCreateWithFlags)    \
  X(cudaStreamDestroy)            \
  X(cudaStreamSynchronize)        \
  X(cudaStreamWaitEvent)          \
  X(cudaEventCreateWithFlags)     \
  X(cudaEventDestroy)             \
  X(cudaEventRecord)              \
  X(cudaEventQuery)               \
  X(cudaEventSynchronize)         \
  X(cudaMemcpyAsync)              \
  X(cudaMemsetAsync)              \
  X(cudaLaunchHostFunc)           \
  X(cudaHostRegister)             \
  X(cudaHostUnregister)

namespace ztier::tiering {

struct CudaRuntimeApi {
  SharedLibrary library;
  // cudaRuntimeGetVersion: 1000 x major + 10 x minor.
  int version = 0;
#define ZTIER_CUDART_MEMBER(fn) decltype(&::fn) fn = nullptr;
  ZTIER_CUDART_DECLARED(ZTIER_CUDART_MEMBER)
#undef ZTIER_CUDART_MEMBER
  cudaError_t (*cudaMalloc)(void** ptr, size_t bytes) = nullptr;
  cudaError_t (*cudaMallocAsync)(void** ptr, size_t bytes, cudaStream_t stream) = nullptr;
};

// Searches, opens and resolves now, reading ZTIER_CUDART_LIBRARY now; every
// call searches again. Unavailable, naming what was tried and how to fix
// it, when no usable runtime is found. For tests and diagnostics: the
// backend uses CudaRuntime().
Result<std::unique_ptr<const CudaRuntimeApi>> LoadCudaRuntime();

// The process's runtime: loaded by the first call (thread-safe), the same
// table or the same error for every later one.
Result<const CudaRuntimeApi*> CudaRuntime();

}  // namespace ztier::tiering
