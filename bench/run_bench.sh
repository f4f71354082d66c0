#!/usr/bin/env bash
# Builds and runs the CPU benchmarks (Release, -O3 -march=native -fopenmp): bench_velora, then
# bench_adarank, each followed by its ratio table. Arguments go to Google Benchmark (both
# programs), e.g. --benchmark_repetitions=3.
set -euo pipefail
cd "$(dirname "$0")/.."
source tests/deps.sh
velora_require_packages cmake g++ make libeigen3-dev libbenchmark-dev
cmake -S . -B build/bench -DCMAKE_BUILD_TYPE=Release -DVELORA_BUILD_TESTS=OFF -DVELORA_BUILD_EXAMPLES=OFF >/dev/null
cmake --build build/bench -j"$(nproc)" --target bench_velora bench_adarank
build/bench/bench/bench_velora "$@"
echo
exec build/bench/bench/bench_adarank "$@"
