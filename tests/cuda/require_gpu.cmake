# Runs PROGRAM with VELORA_REQUIRE_GPU=1 and passes unless it skipped: the variable must turn
# every GPU skip into a failure. Passes when the program ran (exit 0: a GPU was there) or when it
# failed through the GPU gate (tests/cuda/gpu_gate.hpp), whose message names the reason and the
# CUDA error; fails on exit 77 (skipped despite the variable) and on a failure without the gate's
# message (the tests themselves ran and failed: test_cuda/test_nccl report those).
execute_process(COMMAND ${CMAKE_COMMAND} -E env VELORA_REQUIRE_GPU=1 ${PROGRAM} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
string(STRIP "${err}" err)
if(rc EQUAL 77)
  message(FATAL_ERROR "${PROGRAM} skipped (exit 77) although VELORA_REQUIRE_GPU=1: ${out}${err}")
elseif(rc EQUAL 0)
  message("${PROGRAM} ran on a GPU (exit 0)")
elseif(err MATCHES "GPU required \\(VELORA_REQUIRE_GPU=1\\) but not run: .*(failed: cuda[A-Za-z]+ \\(|needs [0-9]+ CUDA devices|reports 0 devices)"
       OR err MATCHES "CUDA is unusable: .*failed: cuda[A-Za-z]+ \\(")
  message("${PROGRAM} failed as required (exit ${rc}): ${err}")
else()
  message(FATAL_ERROR "${PROGRAM} exited ${rc} without the GPU gate's message; stderr: ${err}")
endif()
