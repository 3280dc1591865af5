# Feature switches. AUTO: on where the dependency is found, off otherwise.
# ON: required (configure fails with the reason if missing). OFF: not built.
set(ZTIER_WITH_IO_URING AUTO CACHE STRING "Build the io_uring backend (AUTO|ON|OFF)")
set(ZTIER_WITH_LIBAIO AUTO CACHE STRING "Build the libaio backend (AUTO|ON|OFF)")
set(ZTIER_WITH_CUDA AUTO CACHE STRING "Build the CUDA device backend (AUTO|ON|OFF)")
set(ZTIER_WITH_NCCL AUTO CACHE STRING "Build the NCCL collective backend (AUTO|ON|OFF)")
set(ZTIER_WITH_GLOO AUTO CACHE STRING "Build the gloo collective backend (AUTO|ON|OFF)")
foreach(opt ZTIER_WITH_IO_URING ZTIER_WITH_LIBAIO ZTIER_WITH_CUDA ZTIER_WITH_NCCL ZTIER_WITH_GLOO)
  set_property(CACHE ${opt} PROPERTY STRINGS AUTO ON OFF)
endforeach()
option(ZTIER_BUILD_TESTS "Build the GoogleTest suites" ON)
option(ZTIER_BUILD_BENCHMARKS "Build the Google Benchmark programs" ON)
# Link liburing, libaio and yaml-cpp statically, so the build folder runs on a
# machine that lacks those packages (the GPU check machine).
option(ZTIER_STATIC_DEPS "Link liburing/libaio/yaml-cpp/gtest statically" OFF)
set(ZTIER_SANITIZE "" CACHE STRING "Sanitizers: '', 'address,undefined' or 'thread'")

if(ZTIER_SANITIZE)
  add_compile_options(-fsanitize=${ZTIER_SANITIZE} -fno-omit-frame-pointer -g)
  add_link_options(-fsanitize=${ZTIER_SANITIZE})
  if(ZTIER_SANITIZE MATCHES "undefined")
    add_compile_options(-fno-sanitize-recover=undefined)
  endif()
endif()
