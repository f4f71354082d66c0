# Installs the package into a private prefix, then configures, builds and runs the consumer.
file(REMOVE_RECURSE ${WORK_DIR})
# First a CPU-only consumer that cannot find CUDA at all (it must not need it, whatever the
# package was built with), then one that asks for the optional cuda, mpi and torch components.
foreach(step
    "${CMAKE_COMMAND};--install;${BINARY_DIR};--prefix;${WORK_DIR}/prefix"
    "${CMAKE_COMMAND};-S;${SOURCE_DIR}/tests/consumer;-B;${WORK_DIR}/cpu;-DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix;-DCMAKE_CXX_COMPILER=${CXX};-DCMAKE_DISABLE_FIND_PACKAGE_CUDAToolkit=TRUE"
    "${CMAKE_COMMAND};--build;${WORK_DIR}/cpu"
    "${WORK_DIR}/cpu/consumer"
    "${CMAKE_COMMAND};-S;${SOURCE_DIR}/tests/consumer;-B;${WORK_DIR}/build;-DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix;-DCMAKE_CXX_COMPILER=${CXX};-DVELORA_CONSUMER_COMPONENTS=cuda,mpi,torch"
    "${CMAKE_COMMAND};--build;${WORK_DIR}/build"
    "${WORK_DIR}/build/consumer"
    "${CMAKE_COMMAND};-DEXE=${WORK_DIR}/build/consumer_cuda;-P;${SOURCE_DIR}/tests/consumer/run_if_exists.cmake"
    "${CMAKE_COMMAND};-DEXE=${WORK_DIR}/build/consumer_mpi;-P;${SOURCE_DIR}/tests/consumer/run_if_exists.cmake"
    "${CMAKE_COMMAND};-DEXE=${WORK_DIR}/build/consumer_torch;-P;${SOURCE_DIR}/tests/consumer/run_if_exists.cmake")
  execute_process(COMMAND ${step} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "install consumer step failed (${rc}): ${step}")
  endif()
endforeach()
