# Model files (--save-model, --init): what is refused, each with one line on stderr and exit 2,
# before anything trains: a missing file, one that is no model file, a truncated one, one with a
# byte changed, and a model of another shape than the flags ask for (both shapes named). A file
# written again replaces the old one only when complete: no temporary file is left behind.
include(${CMAKE_CURRENT_LIST_DIR}/demo_corpus.cmake)
set(size --batch 4 --context 32 --d-model 32 --heads 2 --ffn 64)
execute_process(COMMAND ${TRAINER} --corpus ${WORK_DIR}/corpus --configs adamw --steps 2 --eval-every 2 ${size} --save-model ${WORK_DIR}/base.model
                RESULT_VARIABLE rc ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "--save-model failed (${rc}): ${err}")
endif()
file(SIZE ${WORK_DIR}/base.model bytes)
file(GLOB leftovers ${WORK_DIR}/base.model.tmp-*)
if(leftovers)
  message(FATAL_ERROR "temporary files left behind: ${leftovers}")
endif()
# Broken copies (sh: head and dd).
math(EXPR half "${bytes} / 2")
execute_process(COMMAND sh -c "head -c ${half} '${WORK_DIR}/base.model' > '${WORK_DIR}/truncated.model' &&
                               cp '${WORK_DIR}/base.model' '${WORK_DIR}/corrupt.model' &&
                               printf 'X' | dd of='${WORK_DIR}/corrupt.model' bs=1 seek=${half} conv=notrunc 2>/dev/null"
                RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "could not make the broken copies")
endif()
function(refused what regex)
  execute_process(COMMAND ${TRAINER} --corpus ${WORK_DIR}/corpus --configs lora --steps 1 ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  string(STRIP "${err}" err)
  if(NOT rc EQUAL 2 OR NOT err MATCHES "^lm_train: ${regex}" OR err MATCHES "\n" OR out MATCHES "before training")
    message(FATAL_ERROR "${what}: expected exit 2 and one line matching '${regex}', got ${rc}: ${err}")
  endif()
  message("${what}: ${err}")
endfunction()
refused("missing" "model file '.*no-such.model' cannot be opened: No such file or directory" --init ${WORK_DIR}/no-such.model ${size})
refused("not a model file" "model file '.*sample': blob does not start with the magic 'VLRS'" --init ${WORK_DIR}/corpus/sample ${size})
refused("truncated" "model file '.*truncated.model': blob is truncated or has trailing bytes" --init ${WORK_DIR}/truncated.model ${size})
refused("corrupt" "model file '.*corrupt.model': checksum mismatch: the blob is corrupted" --init ${WORK_DIR}/corrupt.model ${size})
refused("other shape" "model file '.*base.model' holds a model of d_model 32, 2 layers, 2 heads, ffn 64, context 32, vocabulary 256, but the flags ask for d_model 16, 2 layers, 2 heads, ffn 64, context 32, vocabulary 256"
        --init ${WORK_DIR}/base.model --batch 4 --context 32 --d-model 16 --heads 2 --ffn 64)
refused("other context" "model file '.*base.model' holds a model of .*context 32.*but the flags ask for .*context 16"
        --init ${WORK_DIR}/base.model --batch 4 --context 16 --d-model 32 --heads 2 --ffn 64)
# An unwritable --save-model is refused before training, a good file is left as it was.
refused("unwritable" "cannot write output file '.*no-such-dir/m.model'" --init ${WORK_DIR}/base.model ${size} --save-model ${WORK_DIR}/no-such-dir/m.model
        --configs full)
file(SIZE ${WORK_DIR}/base.model after)
if(NOT after EQUAL bytes)
  message(FATAL_ERROR "base.model changed size (${bytes} -> ${after})")
endif()
message("model files: missing, foreign, truncated, corrupt and other-shape files refused")
