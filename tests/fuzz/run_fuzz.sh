#!/usr/bin/env bash
# Builds the libFuzzer harnesses of the state loaders (clang + ASan + UBSan), writes the seed
# corpus and runs every harness in both modes for a bounded time (docs/fuzzing.md).
#
#   bash tests/fuzz/run_fuzz.sh                     # CI: 60 s per harness
#   bash tests/fuzz/run_fuzz.sh --seconds 3600      # a long run
#
# Options:
#   --seconds N   time per harness and mode (libFuzzer -max_total_time), default 60
#   --jobs J      harness processes run at the same time (each is single-threaded), default nproc
#   --only NAME   run only the harnesses whose name contains NAME (repeatable), e.g. --only repair
#   --fresh       start from the seeds only (forget the corpus grown by earlier runs)
#   --no-build    use the binaries already in build/fuzz
#
# Inputs that once were findings are kept in tests/fuzz/regressions/{optimizer,compressor,reader,nf4}/
# and run with the seeds. Everything else lives under build/fuzz: binaries, seeds/ (regenerated
# every run), corpus/<harness>/ (grows from run to run), artifacts/<harness>/ (crash, leak and
# timeout inputs), logs/, and results.tsv (harness, mode, seconds, executions, exit status).
# Prints the executions of each harness and their total; exits non-zero when any harness found
# something or failed to run.
# Reproduce a finding with: build/fuzz/<harness> build/fuzz/artifacts/<harness>/crash-<sha1>
set -euo pipefail
cd "$(dirname "$0")/../.."

seconds=60
jobs=$(nproc)
only=()
fresh=0
build=1
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) seconds="$2"; shift 2 ;;
        --jobs) jobs="$2"; shift 2 ;;
        --only) only+=("$2"); shift 2 ;;
        --fresh) fresh=1; shift ;;
        --no-build) build=0; shift ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "run_fuzz.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
[[ "$seconds" =~ ^[0-9]+$ && "$seconds" -gt 0 ]] || { echo "run_fuzz.sh: --seconds needs a positive integer" >&2; exit 2; }
[[ "$jobs" =~ ^[0-9]+$ && "$jobs" -gt 0 ]] || { echo "run_fuzz.sh: --jobs needs a positive integer" >&2; exit 2; }

out=build/fuzz
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}
if [ "$build" = 1 ]; then
    source tests/deps.sh
    velora_require_packages cmake make clang libclang-rt-14-dev libeigen3-dev
    cxx=$(command -v clang++-14 || command -v clang++)
    echo "== fuzz: building the harnesses with $cxx (libFuzzer + ASan + UBSan)"
    cmake -S tests/fuzz -B "$out" -DCMAKE_CXX_COMPILER="$cxx" >/dev/null
    cmake --build "$out" -j"$(nproc)"
fi

echo "== fuzz: seed corpus"
rm -rf "$out/seeds"
"$out/make_corpus" "$out/seeds"

harnesses=(fuzz_state_reader fuzz_state_reader_repair fuzz_optimizer_state fuzz_optimizer_state_repair
           fuzz_compressor_state fuzz_compressor_state_repair fuzz_nf4_state fuzz_nf4_state_repair)
selected=()
for h in "${harnesses[@]}"; do
    if [ ${#only[@]} -eq 0 ]; then selected+=("$h"); continue; fi
    for o in "${only[@]}"; do [[ "$h" == *"$o"* ]] && { selected+=("$h"); break; }; done
done
[ ${#selected[@]} -gt 0 ] || { echo "run_fuzz.sh: no harness matches --only ${only[*]}" >&2; exit 2; }

seed_set() {
    case "$1" in
        fuzz_state_reader*) echo reader ;;
        fuzz_optimizer_state*) echo optimizer ;;
        fuzz_compressor_state*) echo compressor ;;
        fuzz_nf4_state*) echo nf4 ;;
    esac
}

mkdir -p "$out/logs"
run_one() {
    local h=$1
    local corpus="$out/corpus/$h" artifacts="$out/artifacts/$h"
    [ "$fresh" = 1 ] && rm -rf "$corpus"
    mkdir -p "$corpus" "$artifacts"
    local rc=0
    # Inputs that once were findings (tests/fuzz/regressions/<set>/) are run first, with the seeds.
    local extra=()
    [ -d "tests/fuzz/regressions/$(seed_set "$h")" ] && extra+=("tests/fuzz/regressions/$(seed_set "$h")")
    # -timeout: one input taking 30 s is a finding; -rss_limit_mb: so is 2 GiB of memory.
    "$out/$h" -max_total_time="$seconds" -print_final_stats=1 -timeout=30 -rss_limit_mb=2048 -max_len=16384 \
        -dict=tests/fuzz/state.dict -artifact_prefix="$artifacts/" "$corpus" "$out/seeds/$(seed_set "$h")" "${extra[@]}" \
        >"$out/logs/$h.log" 2>&1 || rc=$?
    echo "$rc" >"$out/logs/$h.rc"
}

echo "== fuzz: ${#selected[@]} harness runs of ${seconds} s, ${jobs} at a time (logs in $out/logs)"
start=$(date +%s)
running=0
for h in "${selected[@]}"; do
    rm -f "$out/logs/$h.rc"
    run_one "$h" &
    running=$((running + 1))
    if [ "$running" -ge "$jobs" ]; then
        wait -n || true
        running=$((running - 1))
    fi
done
wait || true
elapsed=$(( $(date +%s) - start ))

total=0
failed=0
results="$out/results.tsv"
printf 'harness\tmode\tseconds\texecutions\texit\n' >"$results"
printf '%-30s %-7s %8s %14s %10s  %s\n' harness mode seconds executions "exec/s" result
for h in "${selected[@]}"; do
    log="$out/logs/$h.log"
    rc=$(cat "$out/logs/$h.rc" 2>/dev/null || echo 99)
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" 2>/dev/null | tail -1 | grep -o '[0-9]*$' || true)
    execs=${execs:-0}
    total=$((total + execs))
    mode=raw
    [[ "$h" == *_repair ]] && mode=repair
    base=${h%_repair}
    result=clean
    if [ "$rc" != 0 ]; then
        failed=1
        result="FINDING (exit $rc; log $log)"
        crash=$(ls -t "$out/artifacts/$h"/* 2>/dev/null | head -1 || true)
        [ -n "$crash" ] && result="$result; input $crash"
    fi
    printf '%-30s %-7s %8s %14s %10s  %s\n' "$base" "$mode" "$seconds" "$execs" "$((execs / seconds))" "$result"
    printf '%s\t%s\t%s\t%s\t%s\n' "$base" "$mode" "$seconds" "$execs" "$rc" >>"$results"
done
echo "total executions: $total in ${elapsed} s wall"
if [ "$failed" != 0 ]; then
    echo "== fuzz: FINDINGS (the failed invariant is the 'FUZZ ASSERTION FAILED' or sanitizer report in each log):"
    for h in "${selected[@]}"; do
        rc=$(cat "$out/logs/$h.rc" 2>/dev/null || echo 99)
        [ "$rc" = 0 ] && continue
        echo "--- $h (exit $rc)"
        grep -m1 -E 'FUZZ ASSERTION FAILED|ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer|UndefinedBehaviorSanitizer)|runtime error|uncaught exception' "$out/logs/$h.log" || tail -5 "$out/logs/$h.log"
    done
    exit 1
fi
echo "== fuzz: nothing found"
