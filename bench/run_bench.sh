#!/usr/bin/env bash
# Builds and runs the CPU benchmarks (Release, -O3 -march=native -fopenmp, GEMMs through Debian's
# OpenBLAS): bench_gemm (every GEMM engine on the hot shapes), bench_velora, bench_adarank, then
# bench_lora (fine-tuning layers at LLaMA-7B shapes; with VELORA_TORCH_REFERENCE=<output of
# bench/pytorch_reference/lora_reference.py> it also prints our time over PyTorch's), each
# followed by its table; then comm_plan (LLaMA-7B communication and memory per rank, from
# formulas) and bench_distributed on 2 MPI ranks (one OpenMP thread each). Arguments go to
# Google Benchmark (the four Google Benchmark programs), e.g. --benchmark_repetitions=3.
# VELORA_BLA_VENDOR picks another BLAS (e.g. FLAME for BLIS).
set -euo pipefail
cd "$(dirname "$0")/.."
source tests/deps.sh
velora_require_packages cmake g++ make libeigen3-dev libbenchmark-dev libopenblas-openmp-dev libblis-openmp-dev libopenmpi-dev openmpi-bin
vendor=${VELORA_BLA_VENDOR:-OpenBLAS}
cmake -S . -B "build/bench-$vendor" -DCMAKE_BUILD_TYPE=Release -DVELORA_BUILD_TESTS=OFF -DVELORA_BUILD_EXAMPLES=OFF -DVELORA_CUDA=OFF \
      -DVELORA_BLAS=ON -DBLA_VENDOR="$vendor" >/dev/null
cmake --build "build/bench-$vendor" -j"$(nproc)" --target bench_gemm bench_velora bench_adarank bench_lora comm_plan bench_distributed
"build/bench-$vendor/bench/bench_gemm" "$@"
echo
"build/bench-$vendor/bench/bench_velora" "$@"
echo
"build/bench-$vendor/bench/bench_adarank" "$@"
echo
"build/bench-$vendor/bench/bench_lora" "$@"
echo
"build/bench-$vendor/bench/comm_plan"
echo
# Open MPI refuses to run as root without --allow-run-as-root; --oversubscribe lets 2 ranks
# start on a machine with fewer cores (or slots) than that.
mpi_flags=(--oversubscribe)
[ "$(id -u)" -eq 0 ] && mpi_flags+=(--allow-run-as-root)
OMP_NUM_THREADS=1 exec mpirun "${mpi_flags[@]}" -x OMP_NUM_THREADS -np 2 "build/bench-$vendor/bench/bench_distributed"
