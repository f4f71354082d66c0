# Data-parallel demo (a build with MPI): `mpiexec -n 2 lm_train` with --batch 4 (two sequences per
# rank) must give what one process gives with --batch 4, for all five configurations, with
# refreshes and rank changes: the same table (steps, validation loss and perplexity, optimizer
# state, to the printed digits) and in --json the same ranks, optimizer bytes and step counts,
# and every training loss, validation loss and gradient energy (which, unlike the losses, shows a
# gradient of the wrong scale at once: Adam normalises its steps) within 1e-5 relative: the ranks
# sum in another order than one process, nothing more. Then: a --batch that the ranks do not
# divide is a clear error, and SIGTERM to one rank stops both after the same step (rank 0 writes
# the --json of the interrupted run, the exit status is 128 + 15).
# Arguments: TRAINER, WORK_DIR, MPIEXEC, NP_FLAG, PREFLAGS and POSTFLAGS (space-separated).
include(${CMAKE_CURRENT_LIST_DIR}/demo_corpus.cmake)
find_program(BASH bash REQUIRED)

# The launcher: Open MPI refuses root without --allow-run-as-root, and more ranks than cores
# without --oversubscribe.
separate_arguments(preflags UNIX_COMMAND "${PREFLAGS}")
separate_arguments(postflags UNIX_COMMAND "${POSTFLAGS}")
set(launcher ${MPIEXEC} ${NP_FLAG} 2)
execute_process(COMMAND ${MPIEXEC} --version OUTPUT_VARIABLE version ERROR_VARIABLE version)
if(version MATCHES "Open MPI|OpenRTE")
  list(APPEND launcher --oversubscribe)
  execute_process(COMMAND id -u OUTPUT_VARIABLE uid OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(uid STREQUAL "0")
    list(APPEND launcher --allow-run-as-root)
  endif()
endif()
list(APPEND launcher ${preflags})
set(env ${CMAKE_COMMAND} -E env OMP_NUM_THREADS=1)   # one thread per rank: the ranks share the cores

# ξ = 0.3: AdaRankGrad's ranks change within 120 steps (at the default 0.05 this tiny model keeps the cap).
set(flags --corpus ${WORK_DIR}/corpus --steps 120 --eval-every 20 --batch 4 --context 32 --d-model 32 --heads 2 --ffn 64 --rank 8 --groups 8
          --configs adamw,galore,velora,adarank:xi=0.3,velora+adarank:xi=0.3)
set(configs adamw galore velora adarank:xi=0.3 velora+adarank:xi=0.3)
execute_process(COMMAND ${env} ${TRAINER} ${flags} --json ${WORK_DIR}/one.json
                RESULT_VARIABLE rc OUTPUT_VARIABLE one ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "lm_train (one process) failed (${rc}): ${err}")
endif()
execute_process(COMMAND ${env} ${launcher} ${TRAINER} ${postflags} ${flags} --json ${WORK_DIR}/two.json
                RESULT_VARIABLE rc OUTPUT_VARIABLE two ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "${launcher} lm_train failed (${rc}): ${two}${err}")
endif()
message("one process:\n${one}\n2 ranks:\n${two}")

# The table: steps, validation loss, perplexity and optimizer MiB of every row, as printed.
foreach(name IN LISTS configs)
  string(REPLACE "+" "\\+" pattern "${name}")
  set(row "\n${pattern} +([0-9]+) +([0-9.]+) +([0-9.]+) +[0-9.]+ +([0-9.]+) ")
  if(NOT one MATCHES "${row}")
    message(FATAL_ERROR "one process: no table row for ${name}")
  endif()
  set(expected "${CMAKE_MATCH_1} ${CMAKE_MATCH_2} ${CMAKE_MATCH_3} ${CMAKE_MATCH_4}")
  if(NOT two MATCHES "${row}")
    message(FATAL_ERROR "2 ranks: no table row for ${name}")
  endif()
  set(got "${CMAKE_MATCH_1} ${CMAKE_MATCH_2} ${CMAKE_MATCH_3} ${CMAKE_MATCH_4}")
  if(NOT got STREQUAL expected)
    message(FATAL_ERROR "${name}: 2 ranks print steps, val loss, val ppl, optim. MiB '${got}', one process '${expected}'")
  endif()
endforeach()

# A JSON number as a 12-digit integer mantissa (10^11 <= |m| < 10^12, or 0) and a power of ten:
# CMake's arithmetic is integer only (64-bit: |m|·10·10^5 fits).
function(decimal text out_mantissa out_exponent)
  if(NOT text MATCHES "^(-?)([0-9]+)(\\.([0-9]+))?([eE]([-+]?[0-9]+))?$")
    message(FATAL_ERROR "not a number: '${text}'")
  endif()
  set(sign "${CMAKE_MATCH_1}")
  set(digits "${CMAKE_MATCH_2}${CMAKE_MATCH_4}")
  set(power "${CMAKE_MATCH_6}")
  string(LENGTH "${CMAKE_MATCH_4}" fraction)
  set(exponent 0)
  if(NOT "${power}" STREQUAL "")
    string(REGEX REPLACE "^\\+" "" power "${power}")
    math(EXPR exponent "${power}")
  endif()
  math(EXPR exponent "${exponent} - ${fraction}")
  string(REGEX REPLACE "^0+" "" digits "${digits}")
  if(digits STREQUAL "")
    set(${out_mantissa} 0 PARENT_SCOPE)
    set(${out_exponent} 0 PARENT_SCOPE)
    return()
  endif()
  string(LENGTH "${digits}" length)
  if(length GREATER 12)   # cut to 12 digits (string(JSON) writes 17): 1e-11 relative at most
    math(EXPR exponent "${exponent} + ${length} - 12")
    string(SUBSTRING "${digits}" 0 12 digits)
    set(length 12)
  endif()
  while(length LESS 12)
    string(APPEND digits 0)
    math(EXPR exponent "${exponent} - 1")
    math(EXPR length "${length} + 1")
  endwhile()
  set(${out_mantissa} "${sign}${digits}" PARENT_SCOPE)
  set(${out_exponent} ${exponent} PARENT_SCOPE)
endfunction()

# Fails unless |a - b| <= 1e-5 · max(|a|, |b|).
function(expect_close a b what)
  decimal("${a}" ma ea)
  decimal("${b}" mb eb)
  if(ma EQUAL 0 OR mb EQUAL 0)
    if(NOT ma EQUAL mb)
      message(FATAL_ERROR "${what}: ${a} (one process) vs ${b} (2 ranks)")
    endif()
    return()
  endif()
  math(EXPR shift "${ea} - ${eb}")
  if(shift GREATER 1 OR shift LESS -1)   # a factor of 10 or more apart
    message(FATAL_ERROR "${what}: ${a} (one process) vs ${b} (2 ranks)")
  elseif(shift EQUAL 1)
    math(EXPR ma "${ma} * 10")
  elseif(shift EQUAL -1)
    math(EXPR mb "${mb} * 10")
  endif()
  math(EXPR difference "${ma} - ${mb}")
  if(difference LESS 0)
    math(EXPR difference "-${difference}")
  endif()
  string(REGEX REPLACE "^-" "" la "${ma}")
  string(REGEX REPLACE "^-" "" lb "${mb}")
  set(largest ${la})
  if(lb GREATER la)
    set(largest ${lb})
  endif()
  math(EXPR scaled "${difference} * 100000")
  if(scaled GREATER largest)
    message(FATAL_ERROR "${what}: ${a} (one process) vs ${b} (2 ranks) differ by more than 1e-5 relative")
  endif()
endfunction()

function(expect_close_lists one_json two_json run what)
  string(JSON count LENGTH "${one_json}" runs ${run} ${ARGN})
  string(JSON count2 LENGTH "${two_json}" runs ${run} ${ARGN})
  if(NOT count EQUAL count2)
    message(FATAL_ERROR "${what}: ${count} values in one process, ${count2} with 2 ranks")
  endif()
  if(count EQUAL 0)
    return()
  endif()
  math(EXPR last "${count} - 1")
  foreach(i RANGE ${last})
    string(JSON a GET "${one_json}" runs ${run} ${ARGN} ${i})
    string(JSON b GET "${two_json}" runs ${run} ${ARGN} ${i})
    expect_close("${a}" "${b}" "${what} [${i}]")
  endforeach()
endfunction()

file(READ ${WORK_DIR}/one.json one_json)
file(READ ${WORK_DIR}/two.json two_json)
string(JSON ranks GET "${two_json}" settings ranks)
if(NOT ranks EQUAL 2)
  message(FATAL_ERROR "two.json: settings.ranks is ${ranks}, expected 2")
endif()
set(refreshes 0)
foreach(run RANGE 4)
  list(GET configs ${run} name)
  foreach(field name error steps interrupted optimizer_bytes ranks)
    string(JSON a GET "${one_json}" runs ${run} ${field})
    string(JSON b GET "${two_json}" runs ${run} ${field})
    if(NOT a STREQUAL b)
      message(FATAL_ERROR "${name}: ${field} is '${b}' with 2 ranks, '${a}' in one process")
    endif()
  endforeach()
  expect_close_lists("${one_json}" "${two_json}" ${run} "${name} train_loss" train_loss)
  expect_close_lists("${one_json}" "${two_json}" ${run} "${name} validation loss" valid_curve loss)
  expect_close_lists("${one_json}" "${two_json}" ${run} "${name} gradient energy" valid_curve gradient_energy)
  string(JSON communicated GET "${two_json}" runs ${run} communicated_bytes)
  if(communicated LESS_EQUAL 0)
    message(FATAL_ERROR "${name}: 2 ranks communicated ${communicated} bytes")
  endif()
endforeach()
# The comparison covers a rank change (adarank's per-parameter ranks over the run differ).
string(JSON adarank_ranks GET "${one_json}" runs 3 ranks values)
string(REGEX MATCHALL "[0-9]+" values "${adarank_ranks}")
list(REMOVE_DUPLICATES values)
list(LENGTH values distinct)
if(distinct LESS 2)
  message(FATAL_ERROR "adarank's ranks never changed in this run (${adarank_ranks}): lengthen it")
endif()
message("2 ranks = one process: the same table, ranks and state bytes; losses and gradient energies within 1e-5 relative")

# --batch must be divisible by the ranks (every rank says nothing else: rank 0 reports).
execute_process(COMMAND ${env} ${launcher} ${TRAINER} ${postflags} ${flags} --config adarank --batch 3
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(rc EQUAL 0 OR NOT err MATCHES "lm_train: --batch 3 is not divisible by the 2 ranks of this data-parallel run")
  message(FATAL_ERROR "--batch 3 on 2 ranks: expected a failure naming it, got ${rc}: ${out}${err}")
endif()

# SIGTERM to the rank that does not write (rank 1, told by the launcher's environment; else any
# rank): both stop after the same step, rank 0 writes the interrupted run, every rank exits 143.
set(script [=[
set -u
json=$1 trainer=$2; shift 2
OMP_NUM_THREADS=1 "$@" --json "$json" > "$json.out" 2>&1 &
launcher=$!
ranks=
for i in $(seq 200); do   # up to 20 s for both ranks to be set up (rank 0 prints the header after that)
  ranks=
  for p in /proc/[0-9]*; do
    args=$(tr '\0' ' ' < $p/cmdline 2>/dev/null) || continue
    case "$args" in "$trainer "*"--json $json"*) ranks="$ranks ${p#/proc/}" ;; esac
  done
  [ $(echo $ranks | wc -w) -ge 2 ] && grep -q "^data-parallel" "$json.out" && break
  sleep 0.1
done
sleep 1   # let them train
target=
for p in $ranks; do
  tr '\0' '\n' < /proc/$p/environ 2>/dev/null | grep -qE '^(OMPI_COMM_WORLD_RANK|PMIX_RANK|PMI_RANK)=1$' && target=$p
done
[ -n "$target" ] || target=$(echo $ranks | cut -d' ' -f1)
[ -n "$target" ] || { echo "no rank of the launcher (pid $launcher) appeared"; cat "$json.out"; kill -KILL $launcher; exit 1; }
kill -TERM $target
for i in $(seq 300); do   # up to 30 s for the run to end
  kill -0 $launcher 2>/dev/null || break
  sleep 0.1
done
if kill -0 $launcher 2>/dev/null; then echo "still running 30 s after kill -TERM of rank pid $target"; kill -KILL $launcher; exit 1; fi
wait $launcher
echo "status=$?"
]=])
set(json ${WORK_DIR}/signal.json)
execute_process(COMMAND ${BASH} -c "${script}" demo_mpi ${json} ${TRAINER} ${launcher} ${TRAINER} ${postflags} --corpus ${WORK_DIR}/corpus
                        --steps 1000000 --eval-every 1000000 --batch 2 --context 16 --d-model 16 --heads 2 --ffn 32 --configs adamw
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 90)
file(READ ${json}.out log)
if(NOT rc EQUAL 0 OR NOT out MATCHES "status=143" OR NOT EXISTS ${json})
  message(FATAL_ERROR "kill -TERM of one rank: expected exit status 143 and a --json file, got ${rc}: ${out}${err}; lm_train said: ${log}")
endif()
file(READ ${json} content)
string(JSON interrupted GET "${content}" runs 0 interrupted)
string(JSON steps GET "${content}" runs 0 steps)
if(NOT interrupted STREQUAL "ON" OR steps LESS 1)
  message(FATAL_ERROR "kill -TERM of one rank: the --json file does not hold an interrupted run: ${content}")
endif()
message("kill -TERM of one rank: both stopped after step ${steps}, ${out}")
