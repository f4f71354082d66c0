# `lm_train --estimate` prints what a run of the same flags counts: for --preset llama60m (the
# GaLore paper's LLaMA-60M layer shapes, byte vocabulary) at batch 1, one training step of adamw
# (dense AdamW, exact activations), galore (fixed rank 128) and velora+adarank (VeLoRA records,
# adaptive ranks) must report the estimate's weights, activations and every activation kind to the
# byte, and the estimate's optimizer state for adamw and galore; AdaRankGrad's data-dependent state
# must lie in (0, estimate at its rank cap] (the trainer itself checks memory.hpp's formula at the
# ranks it holds). The estimate's total leaves out only the library's scratch and the process's
# code, so it must not exceed the measured peak RSS. The LLaMA-7B estimate's weights are checked
# against a count by hand.
include(${CMAKE_CURRENT_LIST_DIR}/demo_corpus.cmake)
set(configs adamw galore velora+adarank)
list(JOIN configs "," config_list)
set(flags --preset llama60m --batch 1 --configs ${config_list})

execute_process(COMMAND ${TRAINER} ${flags} --estimate --json ${WORK_DIR}/estimate.json RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
message("${out}")
if(NOT rc EQUAL 0 OR NOT out MATCHES "d_model 512, 8 layers, 8 heads, ffn 1376, context 256" OR NOT out MATCHES "\nvelora\\+adarank\\* ")
  message(FATAL_ERROR "lm_train --estimate failed (${rc}) or printed no LLaMA-60M table: ${out}${err}")
endif()
execute_process(COMMAND ${TRAINER} ${flags} --corpus ${WORK_DIR}/corpus --steps 1 --json ${WORK_DIR}/run.json
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
message("${out}")
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "lm_train --preset llama60m failed (${rc}): ${err}")
endif()
file(READ ${WORK_DIR}/estimate.json estimate)
file(READ ${WORK_DIR}/run.json run)

# The preset's shape and rank reached the run.
foreach(check "model;d_model=512" "model;layers=8" "model;heads=8" "model;ffn=1376" "model;context=256" "model;vocab=256" "flags;rank=128"
              "flags;preset=llama60m")
  string(REGEX MATCH "^(.*)=(.*)$" _ "${check}")
  set(expected "${CMAKE_MATCH_2}")
  string(JSON value GET "${run}" settings ${CMAKE_MATCH_1})
  if(NOT value STREQUAL expected)
    message(FATAL_ERROR "run.json: settings ${CMAKE_MATCH_1} is '${value}', expected '${expected}'")
  endif()
endforeach()

set(i 0)
foreach(name IN LISTS configs)
  string(JSON measured_name GET "${run}" runs ${i} name)
  string(JSON estimated_name GET "${estimate}" estimates ${i} name)
  string(JSON steps GET "${run}" runs ${i} steps)
  if(NOT measured_name STREQUAL name OR NOT estimated_name STREQUAL name OR NOT steps EQUAL 1)
    message(FATAL_ERROR "row ${i}: run '${measured_name}' (${steps} steps), estimate '${estimated_name}', expected '${name}' with 1 step")
  endif()
  set(fields weights_bytes activation_bytes)
  foreach(kind norm_inputs linear_inputs velora_records attention_qkv attention_probs swiglu output_probs)
    list(APPEND fields "activation_bytes_by_kind/${kind}")   # a JSON path, / for ; (a list separator here)
  endforeach()
  if(NOT name MATCHES "adarank")
    list(APPEND fields optimizer_bytes)
  endif()
  foreach(field IN LISTS fields)
    string(REPLACE "/" ";" path "${field}")
    string(JSON measured GET "${run}" runs ${i} ${path})
    string(JSON estimated GET "${estimate}" estimates ${i} ${path})
    if(NOT measured STREQUAL estimated)
      message(FATAL_ERROR "${name}: ${field} is ${measured} in the run, ${estimated} in the estimate")
    endif()
  endforeach()
  string(JSON records GET "${run}" runs ${i} activation_bytes_by_kind velora_records)
  if((name MATCHES "velora") AND records EQUAL 0)
    message(FATAL_ERROR "${name}: no VeLoRA records counted")
  endif()
  string(JSON measured GET "${run}" runs ${i} optimizer_bytes)
  string(JSON estimated GET "${estimate}" estimates ${i} optimizer_bytes)
  string(JSON rank_is GET "${estimate}" estimates ${i} rank_is)
  if(name MATCHES "adarank" AND (measured LESS_EQUAL 0 OR measured GREATER estimated OR NOT rank_is STREQUAL "cap"))
    message(FATAL_ERROR "${name}: optimizer state ${measured} is not in (0, ${estimated}] (the estimate at the cap, rank_is '${rank_is}')")
  endif()
  if(NOT name MATCHES "adarank")   # the estimate's total is all counted, touched memory: a lower bound of the peak RSS
    string(JSON total GET "${estimate}" estimates ${i} total_bytes)
    string(JSON rss GET "${run}" runs ${i} peak_rss_bytes)
    if(total GREATER rss)
      message(FATAL_ERROR "${name}: the estimated total ${total} exceeds the measured peak RSS ${rss}")
    endif()
    message("${name}: estimated total ${total} bytes, peak RSS ${rss} bytes")
  endif()
  math(EXPR i "${i} + 1")
endforeach()

# LLaMA-7B at the papers' vocabulary: nothing is allocated. Weights by hand: token embedding
# 32000·4096 + positions 256·4096 + 32 layers · (2·4096 + 4·4096² + 3·11008·4096) + final gain 4096,
# 4 bytes each.
execute_process(COMMAND ${TRAINER} --preset llama7b --vocab 32000 --estimate --configs adamw --json ${WORK_DIR}/7b.json
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "lm_train --preset llama7b --estimate failed (${rc}): ${err}")
endif()
math(EXPR expected "4 * (32000 * 4096 + 256 * 4096 + 32 * (2 * 4096 + 4 * 4096 * 4096 + 3 * 11008 * 4096) + 4096)")
file(READ ${WORK_DIR}/7b.json seven)
string(JSON weights GET "${seven}" estimates 0 weights_bytes)
string(JSON optimizer GET "${seven}" estimates 0 optimizer_bytes)
math(EXPR moments "2 * ${expected}")
if(NOT weights EQUAL expected OR NOT optimizer EQUAL moments)
  message(FATAL_ERROR "LLaMA-7B estimate: weights ${weights} (expected ${expected}), AdamW state ${optimizer} (expected ${moments})")
endif()
message("--estimate equals the run's counts for --preset llama60m; LLaMA-7B weights ${weights} bytes")
