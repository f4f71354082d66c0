#!/usr/bin/env bash
# The Python package's CI step (run by tests/run_tests.sh): pip-installs python/ into a venv that
# sees Debian's python3-torch (--system-site-packages: the package builds against and runs with
# the torch the interpreter imports; a venv keeps pip away from Debian's own site-packages, so no
# --break-system-packages), then runs its pytest suite from outside the source folder (so that
# the installed package is the one imported). The extension's CMake build folder is kept under
# python/build/, so a second run rebuilds nothing.
#
# Usage: tests/python_package.sh [VENV_DIR]   (default build/python-venv)
set -euo pipefail
cd "$(dirname "$0")/.."
source tests/deps.sh
velora_require_packages python3-torch python3-venv python3-dev python3-pytest libtorch-dev pybind11-dev
venv=${1:-build/python-venv}
python=/usr/bin/python3
[ -x "$python" ] || python=python3
[ -x "$venv/bin/python" ] || "$python" -m venv --system-site-packages "$venv"
# The build backend from PyPI; --no-build-isolation, because an isolated build environment would
# not see the installed torch that the extension is built against.
"$venv/bin/python" -m pip install -q --disable-pip-version-check "scikit-build-core>=0.8"
CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation ./python
"$venv/bin/python" -m pytest -q -p no:cacheprovider python/tests
