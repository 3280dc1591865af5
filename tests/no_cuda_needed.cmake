# Fails when libztier.so or the `ztier` command names the CUDA runtime or
# NCCL among its NEEDED libraries: both are opened at run time (base/dynlib.h),
# so that ztier starts without them and shares a framework's copies.
#   cmake -DFILES="<lib>|<program>" -P no_cuda_needed.cmake
find_program(READELF readelf REQUIRED)
string(REPLACE "|" ";" _files "${FILES}")
foreach(f IN LISTS _files)
  execute_process(COMMAND ${READELF} -d ${f} OUTPUT_VARIABLE out RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "readelf -d ${f} failed (${rc})")
  endif()
  string(REGEX MATCHALL "\\(NEEDED\\)[^\n]*" needed "${out}")
  # A list without libc would mean the output was not understood.
  if(NOT needed MATCHES "libc\\.so")
    message(FATAL_ERROR "${f}: no NEEDED libc.so in readelf's output:\n${out}")
  endif()
  if(needed MATCHES "libcudart|libnccl|libcuda\\.so")
    message(FATAL_ERROR "${f} links the CUDA runtime or NCCL; they must be opened at run time:\n${needed}")
  endif()
  string(REGEX REPLACE "\\(NEEDED\\) +Shared library: " "" needed "${needed}")
  message(STATUS "${f}: NEEDED ${needed}")
endforeach()
