# The demo's :weights key: adamw and galore with bf16 weights (stochastic rounding, and
# round-to-nearest) train to finite losses beside their float rows (demo_weights_key: a value other
# than bf16|bf16-nearest|float is refused naming the choices).
include(${CMAKE_CURRENT_LIST_DIR}/demo_corpus.cmake)
execute_process(COMMAND ${TRAINER} --corpus ${WORK_DIR}/corpus --steps 6 --eval-every 3 --batch 4 --context 32 --d-model 32 --heads 2
                        --ffn 64 --rank 8 --groups 8
                        --configs adamw,adamw:weights=bf16,adamw:weights=bf16-nearest,galore:weights=bf16
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
message("${out}")
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "lm_train failed (${rc}): ${err}")
endif()
# configuration, steps, val loss, ...
set(number "[0-9]+\\.[0-9]+")
foreach(name adamw adamw:weights=bf16 adamw:weights=bf16-nearest galore:weights=bf16)
  if(NOT out MATCHES "\n${name} +6 +(${number})")
    message(FATAL_ERROR "the table has no row for ${name} with 6 steps and a finite validation loss")
  endif()
endforeach()
