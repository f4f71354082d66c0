#!/usr/bin/env bash
# The README's main command: installs what it needs (the text corpus comes from Debian's
# `fortunes` package), builds the demo trainer in Release with -O3 -march=native -fopenmp
# (override with VELORA_NATIVE_FLAGS=...), its GEMMs through Debian's OpenBLAS, and runs it: a small byte-level transformer LM trained
# with AdamW, GaLore, VeLoRA, AdaRankGrad and VeLoRA + AdaRankGrad.
# Extra arguments go to the trainer, e.g. `bash examples/run_demo.sh --steps 3000 --json out.json --plot out.svg`.
# The trainer is built with Open MPI, so afterwards it also runs data-parallel:
# `OMP_NUM_THREADS=1 mpirun -np 2 build/demo/examples/lm_train --config adarank` (as root add --allow-run-as-root).
#
# `bash examples/run_demo.sh finetune [trainer arguments]`: the fine-tuning demo. It also installs
# `fortunes-es` (Spanish fortune cookies: the target text), pretrains the base model once
# (AdamW, 3000 steps on the English fortunes, kept in build/demo/base.model; delete it to
# pretrain again) and fine-tunes it on the Spanish text with full, lora, velora+lora, qlora,
# velora+qlora, galore, adarank and velora+adarank for 160 steps each at the learning rates the
# fine-tuning study chose (docs/results.md), printing the loss before and after and what each
# configuration trains and holds.
set -euo pipefail
cd "$(dirname "$0")/.."
source tests/deps.sh
finetune=0
if [ "${1:-}" = finetune ]; then
  finetune=1
  shift
fi
packages=(cmake g++ make libeigen3-dev libopenblas-openmp-dev fortunes libopenmpi-dev openmpi-bin)
[ "$finetune" = 1 ] && packages+=(fortunes-es)
velora_require_packages "${packages[@]}"
cmake -S . -B build/demo -DCMAKE_BUILD_TYPE=Release -DVELORA_BUILD_TESTS=OFF -DVELORA_BUILD_BENCHMARKS=OFF -DVELORA_CUDA=OFF -DVELORA_MPI=ON \
      -DVELORA_NATIVE_FLAGS="${VELORA_NATIVE_FLAGS:--march=native}" >/dev/null
cmake --build build/demo -j"$(nproc)" --target lm_train
trainer=build/demo/examples/lm_train
if [ "$finetune" = 0 ]; then
  exec "$trainer" "$@"
fi
base=build/demo/base.model
if [ ! -f "$base" ]; then
  echo "Pretraining the base model once: AdamW, 3000 steps on /usr/share/games/fortunes, saved to $base"
  "$trainer" --configs adamw --steps 3000 --eval-every 500 --save-model "$base"
  echo
fi
exec "$trainer" --init "$base" --corpus /usr/share/games/fortunes/es --configs full,lora,velora+lora,qlora,velora+qlora,galore,adarank,velora+adarank \
     --steps 160 --eval-every 40 --lr 5e-4 --lr-lora 4e-3 --lr-low-rank 2.5e-3 "$@"
