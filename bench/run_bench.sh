#!/usr/bin/env bash
# Builds and runs the CPU benchmarks (Release, -O3 -march=native -fopenmp, GEMMs through Debian's
# OpenBLAS): bench_gemm (every GEMM engine on the hot shapes), bench_velora, then bench_adarank,
# each followed by its table. Arguments go to Google Benchmark (all programs), e.g.
# --benchmark_repetitions=3. VELORA_BLA_VENDOR picks another BLAS (e.g. FLAME for BLIS).
set -euo pipefail
cd "$(dirname "$0")/.."
source tests/deps.sh
velora_require_packages cmake g++ make libeigen3-dev libbenchmark-dev libopenblas-openmp-dev libblis-openmp-dev
vendor=${VELORA_BLA_VENDOR:-OpenBLAS}
cmake -S . -B "build/bench-$vendor" -DCMAKE_BUILD_TYPE=Release -DVELORA_BUILD_TESTS=OFF -DVELORA_BUILD_EXAMPLES=OFF -DVELORA_CUDA=OFF \
      -DVELORA_BLAS=ON -DBLA_VENDOR="$vendor" >/dev/null
cmake --build "build/bench-$vendor" -j"$(nproc)" --target bench_gemm bench_velora bench_adarank
"build/bench-$vendor/bench/bench_gemm" "$@"
echo
"build/bench-$vendor/bench/bench_velora" "$@"
echo
exec "build/bench-$vendor/bench/bench_adarank" "$@"
