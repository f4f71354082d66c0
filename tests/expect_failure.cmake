# Runs COMMAND (a ;-list) and passes when it exits non-zero with exactly one line on stderr that
# matches REGEX: the demo's contract for bad input.
execute_process(COMMAND ${COMMAND} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(rc EQUAL 0)
  message(FATAL_ERROR "expected a non-zero exit, got 0; stderr: ${err}")
endif()
string(STRIP "${err}" err)
if(NOT err MATCHES "${REGEX}")
  message(FATAL_ERROR "stderr does not match '${REGEX}': ${err}")
endif()
if(err MATCHES "\n")
  message(FATAL_ERROR "expected a one-line error, got: ${err}")
endif()
message("exit ${rc}: ${err}")
