#!/usr/bin/env bash
# Proof that a redesign changed no behaviour: builds tests/golden/golden_run.cpp (this working
# tree's copy, against each tree's headers) and the demo trainer at BASE (a commit) and in the
# working tree with the same flags, runs both, and compares
#   - golden_run: the FNV-1a-64 of save_state() and of the weights after fixed 60-step runs
#     (dense, low-rank left/right, factored; galore and torch conventions; float and double),
#     single-process and on 2 MPI ranks;
#   - lm_train --json for a short run of the five default configurations, with the fields that
#     measure time or memory of the process (ms/step, tok/s, peak RSS) and the settings' paths
#     removed.
# Prints the differences and exits 1 when there are any (0: the same bits).
#
#   bash tests/golden/compare.sh BASE [lm_train arguments...]   (default arguments: --steps 40)
#
# Needs what tests/run_tests.sh installs (Open MPI, OpenBLAS, fortunes). Builds in build/golden-*.
set -euo pipefail
cd "$(dirname "$0")/../.."
base=${1:?usage: compare.sh BASE [lm_train arguments...]}
shift
demo_args=("$@")
[ ${#demo_args[@]} -gt 0 ] || demo_args=(--steps 40)
root=$PWD
work=$root/build/golden-work
rm -rf "$work"
mkdir -p "$work"
base_tree=$work/base
git worktree add --detach "$base_tree" "$base" >/dev/null
trap 'git -C "$root" worktree remove --force "$base_tree" >/dev/null 2>&1 || true' EXIT
# The same driver on both sides (the base may predate it, or hold an older copy).
mkdir -p "$base_tree/tests/golden"
cp tests/golden/golden_run.cpp "$base_tree/tests/golden/golden_run.cpp"

mpi_flags=(--oversubscribe)
[ "$(id -u)" -eq 0 ] && mpi_flags+=(--allow-run-as-root)
strip_json() {   # removes the process's own timings, memory and paths; keeps every number the run computed
    python3 -c '
import json, sys
drop = {"mean_step_ms", "tokens_per_second", "peak_rss_bytes", "wall_seconds", "seconds"}
def clean(x):
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items() if k not in drop and not k.endswith("_path") and k not in ("corpus_dir", "json", "plot")}
    if isinstance(x, list):
        return [clean(v) for v in x]
    return x
print(json.dumps(clean(json.load(open(sys.argv[1]))), indent=1, sort_keys=True))
' "$1"
}

for side in base head; do
    src=$root
    [ $side = base ] && src=$base_tree
    build=$root/build/golden-$side
    cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS="-march=native" -DVELORA_BUILD_BENCHMARKS=OFF \
        -DVELORA_BUILD_EXAMPLES=ON -DVELORA_CUDA=OFF -DVELORA_TORCH=OFF -DVELORA_MPI=ON -DVELORA_BLAS=ON -DBLA_VENDOR=OpenBLAS >/dev/null
    # The base may have no golden targets in its CMake files: add them for this build only.
    if ! grep -q golden_run "$src/tests/CMakeLists.txt"; then
        cat >>"$src/tests/CMakeLists.txt" <<'CMAKE'
add_executable(golden_run golden/golden_run.cpp)
target_link_libraries(golden_run PRIVATE velora::adarank)
add_executable(golden_run_mpi golden/golden_run.cpp)
target_link_libraries(golden_run_mpi PRIVATE velora::mpi)
target_compile_definitions(golden_run_mpi PRIVATE VELORA_GOLDEN_MPI=1)
CMAKE
        cmake "$build" >/dev/null
    fi
    cmake --build "$build" -j"$(nproc)" --target golden_run golden_run_mpi lm_train >/dev/null
    "$build/tests/golden_run" >"$work/$side.golden"
    OMP_NUM_THREADS=1 mpirun "${mpi_flags[@]}" -x OMP_NUM_THREADS -np 2 "$build/tests/golden_run_mpi" >>"$work/$side.golden"
    "$build/examples/lm_train" "${demo_args[@]}" --json "$work/$side.json" >/dev/null 2>"$work/$side.demo.log"
    strip_json "$work/$side.json" >"$work/$side.json.stripped"
done

status=0
echo "== golden_run ($(wc -l <"$work/head.golden") lines)"
if diff "$work/base.golden" "$work/head.golden"; then echo "identical"; else status=1; fi
echo "== lm_train ${demo_args[*]} --json (timings, memory and paths removed)"
if diff "$work/base.json.stripped" "$work/head.json.stripped"; then echo "identical"; else status=1; fi
exit $status
