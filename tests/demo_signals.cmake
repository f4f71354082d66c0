# lm_train trains each configuration in a forked process; none may outlive it. For SIGKILL,
# SIGTERM and SIGHUP of lm_train (the parent) in the middle of a long run, its training process
# must be gone within 10 s (at once, in practice). SIGKILL leaves an existing --json file as it
# was; SIGTERM and SIGHUP are forwarded, so the training process stops after its step, and
# lm_train writes what was trained (marked interrupted) and exits with 128 + the signal.
# The processes of a run are told apart by their command line, which holds a --json path unique
# to the run (the child is a fork: same command line), and by their parent: the script signals
# only those, and kills whatever of them is left however it ends (the old lm_train left its
# child training for the whole --steps 1000000).
include(${CMAKE_CURRENT_LIST_DIR}/demo_corpus.cmake)
find_program(BASH bash REQUIRED)
string(RANDOM LENGTH 10 ALPHABET abcdefghijklmnopqrstuvwxyz0123456789 tag)
set(script [=[
set -u
trainer=$1 corpus=$2 json=$3 sig=$4
# 0 when process $1 is alive (not a zombie), its parent is $2 (when given) and its command line
# holds this run's --json path. Builtins only, as it runs for every process while looking.
alive() {
  local stat args
  read -r stat 2>/dev/null < /proc/$1/stat || return 1
  set -- "$1" "${2:-}" ${stat##*) }   # then, after the command name: state, parent, ...
  [ "$3" != Z ] && [ "$3" != X ] && { [ -z "$2" ] || [ "$4" = "$2" ]; } || return 1
  mapfile -d '' args 2>/dev/null < /proc/$1/cmdline || return 1
  case "${args[*]}" in *"$json"*) return 0 ;; esac
  return 1
}
parent= child=
cleanup() { for p in $child $parent; do alive $p && kill -KILL $p; done; }
trap cleanup EXIT
"$trainer" --corpus "$corpus" --steps 1000000 --eval-every 1000000 --batch 2 --context 16 --d-model 16 --heads 2 --ffn 32 \
           --configs adamw --json "$json" > "$json.out" 2>&1 &
parent=$!
for i in $(seq 100); do   # up to 10 s for the training process to appear
  for p in /proc/[0-9]*; do
    alive ${p#/proc/} $parent && child=${p#/proc/}
  done
  [ -n "$child" ] && break
  sleep 0.1
done
[ -n "$child" ] || { echo "no training process of lm_train (pid $parent) appeared"; cat "$json.out"; exit 1; }
sleep 1   # let it train
kill -$sig $parent
for i in $(seq 100); do   # up to 10 s for both to end (usually well under 1 s)
  alive $parent || alive $child || break
  sleep 0.1
done
if alive $child; then echo "the training process (pid $child) still runs 10 s after kill -$sig of lm_train (pid $parent)"; exit 1; fi
if alive $parent; then echo "lm_train (pid $parent) still runs 10 s after kill -$sig"; exit 1; fi
wait $parent
echo "status=$?"
]=])
foreach(signal KILL TERM HUP)
  set(json ${WORK_DIR}/signal-${signal}-${tag}.json)
  set(old "{\"old\":\"results\"}\n")
  file(WRITE ${json} "${old}")
  execute_process(COMMAND ${BASH} -c "${script}" demo_signals ${TRAINER} ${WORK_DIR}/corpus ${json} ${signal}
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 60)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "kill -${signal} of lm_train: ${out}${err}")
  endif()
  file(READ ${json} content)
  if(signal STREQUAL KILL)
    if(NOT out MATCHES "status=137" OR NOT content STREQUAL old)
      message(FATAL_ERROR "kill -KILL of lm_train: expected status 137 and the old --json file, got ${out} and '${content}'")
    endif()
  else()   # the parent stops its child, writes what was trained and exits with 128 + SIGTERM (15) or SIGHUP (1)
    if(signal STREQUAL TERM)
      set(expected 143)
    else()
      set(expected 129)
    endif()
    string(JSON interrupted ERROR_VARIABLE parse_error GET "${content}" runs 0 interrupted)
    if(NOT out MATCHES "status=${expected}" OR NOT interrupted STREQUAL "ON")
      file(READ ${json}.out log)
      message(FATAL_ERROR "kill -${signal} of lm_train: expected status ${expected} and a --json file with the interrupted run, got ${out}"
                          "and '${content}' ${parse_error}; lm_train said: ${log}")
    endif()
  endif()
  message("kill -${signal} of lm_train: ${out}")
endforeach()
