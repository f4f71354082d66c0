# The demo's :state=8bit key: adamw, galore and velora+adarank with 8-bit moments train (the
# trainer's own cross-check of memory.hpp's optimizer bytes against state_bytes() holds, or the
# run fails), and the 8-bit rows hold less than a third of the float rows' optimizer state.
include(${CMAKE_CURRENT_LIST_DIR}/demo_corpus.cmake)
execute_process(COMMAND ${TRAINER} --corpus ${WORK_DIR}/corpus --steps 6 --eval-every 3 --batch 4 --context 32 --d-model 32 --heads 2
                        --ffn 64 --rank 8 --groups 8
                        --configs adamw,adamw:state=8bit,galore:state=8bit,velora+adarank:state=8bit
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
message("${out}")
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "lm_train failed (${rc}): ${err}")
endif()
# configuration, steps, val loss, val ppl, activ. MiB, optim. MiB (three decimals)
set(number "[0-9]+\\.[0-9]+")
foreach(name adamw galore:state=8bit velora\\+adarank:state=8bit adamw:state=8bit)
  if(NOT out MATCHES "\n${name} +6 +${number} +${number} +${number} +([0-9]+)\\.([0-9]+)")
    message(FATAL_ERROR "the table has no row for ${name} with 6 steps")
  endif()
  # thousandths of a MiB, as an integer (leading zeros dropped)
  string(REGEX REPLACE "^0*([0-9])" "\\1" last_optim "${CMAKE_MATCH_1}${CMAKE_MATCH_2}")
  if(name STREQUAL "adamw")
    set(float_optim ${last_optim})
  endif()
endforeach()
math(EXPR three_q8 "${last_optim} * 3")
if(NOT three_q8 LESS float_optim)
  message(FATAL_ERROR "adamw:state=8bit holds ${last_optim}/1000 MiB of optimizer state, not less than a third of adamw's ${float_optim}/1000")
endif()
