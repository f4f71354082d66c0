#!/usr/bin/env bash
# The README's main command: installs what it needs (the text corpus comes from Debian's
# `fortunes` package), builds the demo trainer in Release with -O3 -march=native -fopenmp
# (override with VELORA_NATIVE_FLAGS=...), its GEMMs through Debian's OpenBLAS, and runs it: a small byte-level transformer LM trained
# with AdamW, GaLore, VeLoRA, AdaRankGrad and VeLoRA + AdaRankGrad.
# Extra arguments go to the trainer, e.g. `bash examples/run_demo.sh --steps 3000 --json out.json --plot out.svg`.
# The trainer is built with Open MPI, so afterwards it also runs data-parallel:
# `OMP_NUM_THREADS=1 mpirun -np 2 build/demo/examples/lm_train --config adarank` (as root add --allow-run-as-root).
set -euo pipefail
cd "$(dirname "$0")/.."
source tests/deps.sh
velora_require_packages cmake g++ make libeigen3-dev libopenblas-openmp-dev fortunes libopenmpi-dev openmpi-bin
cmake -S . -B build/demo -DCMAKE_BUILD_TYPE=Release -DVELORA_BUILD_TESTS=OFF -DVELORA_BUILD_BENCHMARKS=OFF -DVELORA_CUDA=OFF -DVELORA_MPI=ON \
      -DVELORA_NATIVE_FLAGS="${VELORA_NATIVE_FLAGS:--march=native}" >/dev/null
cmake --build build/demo -j"$(nproc)" --target lm_train
exec build/demo/examples/lm_train "$@"
