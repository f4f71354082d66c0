# --json and --plot replace an existing file only with a complete one: a run that fails after the
# start-up checks keeps the old files (they used to be truncated at start-up), creates no file
# where there was none, leaves no temporary file, and a completed run replaces both.
# (A run killed by SIGKILL keeps them too: tests/demo_signals.cmake.)
include(${CMAKE_CURRENT_LIST_DIR}/demo_corpus.cmake)
set(old "old results, kept until a run completes\n")
file(WRITE ${WORK_DIR}/out.json "${old}")
file(WRITE ${WORK_DIR}/out.svg "${old}")
set(small --steps 2 --eval-every 1 --batch 2 --context 16 --d-model 16 --heads 2 --ffn 32 --rank 4 --groups 4 --configs adamw)

function(expect_old)
  foreach(file out.json out.svg)
    file(READ ${WORK_DIR}/${file} content)
    if(NOT content STREQUAL old)
      message(FATAL_ERROR "${ARGV0}: ${file} was changed to '${content}'")
    endif()
  endforeach()
  file(GLOB temporary ${WORK_DIR}/*.tmp-*)
  if(temporary)
    message(FATAL_ERROR "${ARGV0}: temporary files left: ${temporary}")
  endif()
endfunction()

# Fails after the output checks (the corpus is loaded after them).
execute_process(COMMAND ${TRAINER} --corpus ${WORK_DIR}/no-such-corpus ${small} --json ${WORK_DIR}/out.json --plot ${WORK_DIR}/out.svg
                RESULT_VARIABLE rc OUTPUT_QUIET ERROR_VARIABLE err)
if(rc EQUAL 0 OR NOT err MATCHES "does not exist")
  message(FATAL_ERROR "expected the missing corpus to fail the run, got exit ${rc}: ${err}")
endif()
expect_old("a run that failed")

# Nothing is created where there was no file.
execute_process(COMMAND ${TRAINER} --corpus ${WORK_DIR}/no-such-corpus ${small} --json ${WORK_DIR}/new.json --plot ${WORK_DIR}/new.svg
                RESULT_VARIABLE rc OUTPUT_QUIET ERROR_QUIET)
if(EXISTS ${WORK_DIR}/new.json OR EXISTS ${WORK_DIR}/new.svg)
  message(FATAL_ERROR "a run that failed created new.json or new.svg")
endif()

# A completed run replaces both.
execute_process(COMMAND ${TRAINER} --corpus ${WORK_DIR}/corpus ${small} --json ${WORK_DIR}/out.json --plot ${WORK_DIR}/out.svg
                RESULT_VARIABLE rc OUTPUT_QUIET ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "lm_train failed (${rc}): ${err}")
endif()
file(READ ${WORK_DIR}/out.json json)
string(JSON runs ERROR_VARIABLE parse_error LENGTH "${json}" runs)
if(parse_error OR NOT runs EQUAL 1)
  message(FATAL_ERROR "a completed run did not replace out.json with its results (${parse_error}): ${json}")
endif()
file(READ ${WORK_DIR}/out.svg svg)
if(NOT svg MATCHES "^<svg" OR NOT svg MATCHES "</svg>\n$")
  message(FATAL_ERROR "a completed run did not replace out.svg with its plot: ${svg}")
endif()
file(GLOB temporary ${WORK_DIR}/*.tmp-*)
if(temporary)
  message(FATAL_ERROR "a completed run left temporary files: ${temporary}")
endif()
message("old --json/--plot files kept by a failed run, replaced by a completed one")
