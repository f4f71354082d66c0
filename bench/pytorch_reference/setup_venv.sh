#!/usr/bin/env bash
# Creates a throwaway virtual environment with PyTorch and GaLore for the reference timings of
# docs/performance.md, in the folder given as the first argument (outside the repository;
# default: a new temporary folder). PyTorch is NOT part of the project or its build.
# The download.pytorch.org CPU index was unreachable where this was written (only PyPI), and the
# PyPI torch wheel is the CUDA build that would pull ~3 GB of nvidia-* wheels.
# So: torch --no-deps + pure-python deps + only the 4 nvidia libs that
# libtorch_cuda.so cannot find elsewhere. Everything else it links (cudart,
# cublas, cusolver, cudnn, cufft, ...) resolves from the system CUDA toolkit
# 13.0 in /usr/local/cuda (via ldconfig) on the machine these figures were taken on.
# On a machine WITHOUT /usr/local/cuda use instead:  pip install torch==2.15.0
# (with deps, ~4 GB) or the CPU index if it is reachable.
set -euo pipefail
venv=${1:-$(mktemp -d)/venv}
python3 -m venv "$venv"
. "$venv/bin/activate"
pip install --upgrade pip
pip install --no-deps torch==2.15.0
pip install filelock typing-extensions sympy networkx jinja2 fsspec mpmath MarkupSafe numpy
pip install --no-deps nvidia-cufile==1.17.1.22 nvidia-cusparselt-cu13==0.8.1 \
    nvidia-nvshmem-cu13==3.7.2 nvidia-nccl-cu13==2.30.7
# galore_torch/__init__.py imports adamw8bit (-> bitsandbytes) and adamw/adafactor
# (-> transformers.utils.versions.require_version), so both must be importable.
pip install --no-deps galore-torch==1.0 bitsandbytes==0.50.2
pip install transformers==5.24.0        # its deps are small pure-python/tokenizers; no nvidia
python -W ignore -c "import torch; print(torch.__version__, torch.randn(3) @ torch.randn(3)); from galore_torch import GaLoreAdamW; print('galore ok')"
echo "venv: $venv"
