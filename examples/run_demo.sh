#!/usr/bin/env bash
# The README's main command: installs what it needs, builds the example in Release with
# -O3 -march=native -fopenmp (override with VELORA_NATIVE_FLAGS=...) and runs it.
# Extra arguments go to the example, e.g. `bash examples/run_demo.sh --steps 600`.
set -euo pipefail
cd "$(dirname "$0")/.."
source tests/deps.sh
velora_require_packages cmake g++ make libeigen3-dev
cmake -S . -B build/demo -DCMAKE_BUILD_TYPE=Release -DVELORA_BUILD_TESTS=OFF -DVELORA_BUILD_BENCHMARKS=OFF \
      -DVELORA_NATIVE_FLAGS="${VELORA_NATIVE_FLAGS:--march=native}" >/dev/null
cmake --build build/demo -j"$(nproc)" --target velora_linear
exec build/demo/examples/velora_linear "$@"
