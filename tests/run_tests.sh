#!/usr/bin/env bash
# The README's test command: installs what it needs, builds the test suite and runs it twice,
# once optimised and once under AddressSanitizer + UndefinedBehaviorSanitizer, installs and tests
# the Python package (tests/python_package.sh), then fuzzes the state loaders for a bounded time
# (tests/fuzz, docs/fuzzing.md).
#
# Environment:
#   VELORA_FUZZ_SECONDS   seconds per fuzz harness and mode (8 runs, nproc at a time; default 60,
#                         about 5-6 minutes with the build on 2 cores); 0 skips the fuzzing stage.
set -euo pipefail
cd "$(dirname "$0")/.."
source tests/deps.sh
velora_require_packages cmake g++ make libeigen3-dev doctest-dev libopenblas-openmp-dev libblis-openmp-dev libopenmpi-dev openmpi-bin
# ---- libtorch adapter (velora::torch, CTest label torch): Debian's libtorch (1.13, CPU). Installed
# after the OpenMP OpenBLAS above, which then provides libtorch's BLAS. Built and tested in the
# Release stage only; the BLIS and sanitizer builds leave it out (-DVELORA_TORCH=OFF: libtorch is
# not built with the sanitizers, and it brings its own BLAS).
velora_require_packages libtorch-dev
# ---- end of the libtorch adapter
jobs=$(nproc)
# The CUDA backend is built (and its host-side tests run) when the CUDA toolkit is installed;
# CMake finds nvcc on PATH, or here in the toolkit's standard folder. GPU tests skip themselves
# where no GPU is visible.
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ] && [ -z "${CUDACXX:-}" ]; then
    export CUDACXX=/usr/local/cuda/bin/nvcc
fi

echo "== Release build + tests, GEMM through OpenBLAS (data-parallel tests under mpirun -np 2: label mpi; libtorch adapter: label torch)"
# -march=native so the vectorised kernel paths (e.g. AVX-512) are the ones tested. The CPU GEMM
# goes through Debian's OpenBLAS (OpenMP build); the GEMM tests also run Eigen's product.
cmake -S . -B build/test -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS="-march=native" -DVELORA_BUILD_BENCHMARKS=OFF -DVELORA_BUILD_EXAMPLES=ON \
      -DVELORA_BLAS=ON -DBLA_VENDOR=OpenBLAS >/dev/null
cmake --build build/test -j"$jobs"
ctest --test-dir build/test --output-on-failure -j"$jobs"

echo "== Python package (python/, velora.torch): pip install into a venv over Debian's python3-torch, then pytest"
bash tests/python_package.sh build/python-venv

echo "== BLIS build: GEMM correctness and thread-count determinism with a second BLAS"
cmake -S . -B build/blis -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS="-march=native" -DVELORA_BUILD_BENCHMARKS=OFF -DVELORA_BUILD_EXAMPLES=OFF \
      -DVELORA_INSTALL=OFF -DVELORA_CUDA=OFF -DVELORA_TORCH=OFF -DVELORA_BLAS=ON -DBLA_VENDOR=FLAME >/dev/null
cmake --build build/blis -j"$jobs" --target test_core test_determinism
ctest --test-dir build/blis --output-on-failure -R "^test_(core|determinism)$"

# Without MPI: Open MPI's own allocations are reported as leaks by LeakSanitizer.
echo "== AddressSanitizer + UndefinedBehaviorSanitizer build + tests, GEMM through Eigen's product (no BLAS), no MPI, no libtorch"
san="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
cmake -S . -B build/sanitize -DCMAKE_BUILD_TYPE=Debug -DVELORA_BUILD_BENCHMARKS=OFF -DVELORA_BUILD_EXAMPLES=OFF \
      -DVELORA_INSTALL=OFF -DVELORA_CUDA=OFF -DVELORA_MPI=OFF -DVELORA_TORCH=OFF -DVELORA_BLAS=OFF -DCMAKE_CXX_FLAGS="-O1 $san" -DCMAKE_EXE_LINKER_FLAGS="$san" >/dev/null
cmake --build build/sanitize -j"$jobs"
ctest --test-dir build/sanitize --output-on-failure -j"$jobs" -LE header

fuzz_seconds=${VELORA_FUZZ_SECONDS:-60}
if [ "$fuzz_seconds" = 0 ]; then
    echo "== Fuzzing skipped (VELORA_FUZZ_SECONDS=0)"
else
    echo "== Fuzzing the state loaders: libFuzzer + ASan + UBSan, ${fuzz_seconds} s per harness and mode"
    bash tests/fuzz/run_fuzz.sh --seconds "$fuzz_seconds" --jobs "$jobs"
fi
