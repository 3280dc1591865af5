# Installs the build tree into WORK_DIR/prefix, then builds and runs the
# consumer twice: through find_package(ztier) and through pkg-config.
# Run as: cmake -DBUILD_DIR=... -DWORK_DIR=... -DCONSUMER_DIR=... -P this.
file(REMOVE_RECURSE ${WORK_DIR})
set(prefix ${WORK_DIR}/prefix)

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  message("${out}${err}")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}")
  endif()
endfunction()

run(${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${prefix})
foreach(f include/ztier/ztier.h)
  if(NOT EXISTS ${prefix}/${f})
    message(FATAL_ERROR "not installed: ${f}")
  endif()
endforeach()
file(GLOB_RECURSE _libs ${prefix}/*/libztier.so.0)
file(GLOB_RECURSE _pc ${prefix}/*/ztier.pc)
file(GLOB_RECURSE _cfg ${prefix}/*/ztierConfig.cmake)
if(NOT _libs OR NOT _pc OR NOT _cfg)
  message(FATAL_ERROR "missing libztier.so.0 / ztier.pc / ztierConfig.cmake under ${prefix}")
endif()

# 1. CMake package.
set(gen)
if(GENERATOR)
  set(gen -G ${GENERATOR})
endif()
run(${CMAKE_COMMAND} -S ${CONSUMER_DIR} -B ${WORK_DIR}/consumer ${gen}
    -DCMAKE_PREFIX_PATH=${prefix})
run(${CMAKE_COMMAND} --build ${WORK_DIR}/consumer)
run(${WORK_DIR}/consumer/consumer)

# 2. pkg-config (where installed).
find_program(PKG_CONFIG pkg-config)
find_program(CC NAMES cc gcc clang)
if(PKG_CONFIG AND CC)
  get_filename_component(pcdir ${_pc} DIRECTORY)
  set(ENV{PKG_CONFIG_PATH} ${pcdir})
  execute_process(COMMAND ${PKG_CONFIG} --cflags --libs ztier
                  OUTPUT_VARIABLE flags RESULT_VARIABLE rc OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "pkg-config --cflags --libs ztier failed")
  endif()
  separate_arguments(flags UNIX_COMMAND "${flags}")
  get_filename_component(libdir ${_libs} DIRECTORY)
  run(${CC} -std=c99 -Wall -Werror ${CONSUMER_DIR}/main.c ${flags} -Wl,-rpath,${libdir}
      -o ${WORK_DIR}/consumer_pc)
  run(${WORK_DIR}/consumer_pc)
else()
  message("pkg-config or a C compiler not found: pkg-config check skipped")
endif()
