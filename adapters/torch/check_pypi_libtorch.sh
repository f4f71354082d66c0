#!/usr/bin/env bash
# Checks the libtorch adapter against the libtorch of PyTorch's pip wheel (2.x), next to Debian's
# libtorch 1.13 that CI uses. Not part of CI, and the project does not depend on it: it needs
# network access to a Python package index and about 1 GB (CPU wheel) or 6 GB (CUDA wheel) of disk.
#
#   adapters/torch/check_pypi_libtorch.sh [VENV [BUILD_DIR]]
#
# VENV       a virtual environment outside the repository, created if missing
#            (default ${TMPDIR:-/tmp}/velora-venv-torch); reused if torch is already installed in it
# BUILD_DIR  the CMake build folder (default ${TMPDIR:-/tmp}/velora-build-torch-pypi)
# VELORA_JOBS parallel build jobs (default: nproc)
#
# Steps: python3 -m venv; pip install torch from the CPU index (download.pytorch.org/whl/cpu), or
# from plain PyPI when that index is unreachable (PyPI's Linux wheel is a CUDA build: it runs on CPU
# but its CMake package wants a CUDA toolkit (nvcc) at configure time); configure this repository
# with CMAKE_PREFIX_PATH = torch.utils.cmake_prefix_path (libtorch's TorchConfig sets the wheel's
# _GLIBCXX_USE_CXX11_ABI on the `torch` target, which velora::torch passes on); build the adapter's
# tests and the example; run the CTest label torch (the three test programs, the header tests,
# example_torch). docs/torch.md records the versions checked and the outcome.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
tmp=${TMPDIR:-/tmp}
venv=${1:-$tmp/velora-venv-torch}
build=${2:-$tmp/velora-build-torch-pypi}
jobs=${VELORA_JOBS:-$(nproc)}
case "$(realpath -m "$venv")/" in "$repo"/*) echo "the virtual environment must be outside the repository" >&2; exit 2 ;; esac

py=$venv/bin/python
if ! [ -x "$py" ]; then
    python3 -m venv "$venv"
fi
if ! "$py" -c 'import torch' 2>/dev/null; then
    "$py" -m pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu ||
        { echo "== the CPU wheel index is unreachable: installing torch from PyPI"; "$py" -m pip install --quiet torch; }
fi
read -r version prefix cuda abi site < <("$py" -W ignore -c 'import os, torch; print(torch.__version__, torch.utils.cmake_prefix_path, torch.version.cuda, int(torch.compiled_with_cxx11_abi()), os.path.dirname(os.path.dirname(torch.__file__)))')
echo "== torch $version (CUDA: $cuda, _GLIBCXX_USE_CXX11_ABI=$abi), CMake package under $prefix"

linker_flags=""
if [ "$cuda" != None ]; then
    # A CUDA wheel's libtorch_cuda.so finds its CUDA libraries through its RPATH into the wheel's
    # nvidia/* packages; the linker must look there too, before any CUDA toolkit on the system
    # (an older NCCL there lacks symbols libtorch_cuda.so needs).
    dirs=$(find "$site/nvidia" -mindepth 2 -maxdepth 2 -type d -name lib 2>/dev/null | paste -sd: - || true)
    [ -n "$dirs" ] && linker_flags="-Wl,-rpath-link,$dirs"
fi

cmake -S "$repo" -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_EXE_LINKER_FLAGS="$linker_flags" \
      -DVELORA_TORCH=ON -DVELORA_CUDA=OFF -DVELORA_MPI=OFF -DVELORA_BUILD_BENCHMARKS=OFF -DVELORA_BUILD_EXAMPLES=ON >/dev/null
cmake --build "$build" -j"$jobs" --target test_torch_view test_torch_optim test_torch_linear torch_train
ctest --test-dir "$build" -L torch --output-on-failure
echo "== libtorch $version: the CTest label torch passed"
