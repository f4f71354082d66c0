#!/usr/bin/env bash
# The prepared GPU run, one script for a short lease of a GPU machine: configure Release with
# CUDA for the card, build the GPU tests and bench_cuda, run every GPU test with
# VELORA_REQUIRE_GPU=1 (a skip is a failure), test_cuda's shape sweep and narrow-record test
# under compute-sanitizer (memcheck, racecheck, synccheck, initcheck), then bench_cuda. Logs go
# to $OUT (default build/gpu-out); the script goes on past a failed stage and exits non-zero at
# the end if any stage failed, so one lease yields every stage's result.
#
# Environment:
#   OUT                    where the logs go (default build/gpu-out)
#   VELORA_GPU_ARCH        CMAKE_CUDA_ARCHITECTURES (default 90: H100/H200)
#   VELORA_GPU_DEPS        a prefix holding what the build needs where no Debian package is
#                          installed (Eigen's headers, doctest's header, a Google Benchmark
#                          build): passed as CMAKE_PREFIX_PATH
#   VELORA_GPU_JOBS        build jobs (default nproc)
#   VELORA_BENCH_ARGS      arguments for bench_cuda (default --benchmark_repetitions=3)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-build/gpu-out}
mkdir -p "$out"
arch=${VELORA_GPU_ARCH:-90}
jobs=${VELORA_GPU_JOBS:-$(nproc)}
build=build/gpu
failed=()
stage() {   # stage NAME COMMAND...: runs it, logs to $out/NAME.log, records a failure
    local name=$1
    shift
    echo "== $name: $*"
    local start=$SECONDS
    "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "   exit $rc after $((SECONDS - start)) s (log: $out/$name.log)"
    tail -n 5 "$out/$name.log" | sed 's/^/   | /'
    [ $rc -eq 0 ] || failed+=("$name")
    return $rc
}

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    nvcc --version 2>&1 | tail -n 2
    git rev-parse HEAD 2>/dev/null
} >"$out/machine.txt"
cat "$out/machine.txt"
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)

[ -n "${CUDACXX:-}" ] || ! [ -x /usr/local/cuda/bin/nvcc ] || command -v nvcc >/dev/null || export CUDACXX=/usr/local/cuda/bin/nvcc
prefix=()
[ -n "${VELORA_GPU_DEPS:-}" ] && prefix=(-DCMAKE_PREFIX_PATH="$VELORA_GPU_DEPS")
stage configure cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DVELORA_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch" \
    -DVELORA_BUILD_BENCHMARKS=ON -DVELORA_BUILD_EXAMPLES=OFF -DVELORA_TORCH=OFF -DVELORA_MPI=OFF -DVELORA_BLAS=OFF "${prefix[@]}" || {
    echo "configure failed: nothing else can run"
    exit 1
}
targets=(test_cuda test_cuda_host bench_cuda)
grep -q '^VELORA_NCCL:BOOL=ON' "$build/CMakeCache.txt" && targets+=(test_nccl test_nccl_host test_nccl_2gpu)
stage build cmake --build "$build" -j"$jobs" --target "${targets[@]}" || {
    echo "build failed: nothing else can run"
    exit 1
}

# Every GPU test, a skip counted as a failure. With one GPU the two-GPU NCCL test cannot run:
# it is left out (and said so) instead of failing the stage.
exclude=()
if [ "$gpus" -lt 2 ]; then
    exclude=(-E '^test_nccl_2gpu$')
    echo "   (one GPU: test_nccl_2gpu not run)"
fi
stage ctest_gpu env VELORA_REQUIRE_GPU=1 ctest --test-dir "$build" -L gpu --output-on-failure "${exclude[@]}"
stage ctest_host ctest --test-dir "$build" -R '^test_(cuda|nccl)_host$' --output-on-failure

# compute-sanitizer over the shapes most likely to go out of bounds or race: rows 1..70000, odd
# columns, misaligned views, the chunked conversion of narrow records.
if command -v compute-sanitizer >/dev/null || [ -x /usr/local/cuda/bin/compute-sanitizer ]; then
    sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
    for tool in memcheck racecheck synccheck initcheck; do
        stage "sanitizer_$tool" env VELORA_REQUIRE_GPU=1 "$sanitizer" --tool "$tool" --error-exitcode 99 \
            "$build/tests/test_cuda" -tc='*shape sweep*,*over 32768 elements*'
    done
else
    echo "== compute-sanitizer not found: sanitizer stages not run"
    failed+=(sanitizer_missing)
fi

stage bench_cuda env VELORA_REQUIRE_GPU=1 "$build/bench/bench_cuda" ${VELORA_BENCH_ARGS:---benchmark_repetitions=3}

if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED stages: ${failed[*]}"
    exit 1
fi
echo "all stages passed"
