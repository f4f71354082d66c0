#!/usr/bin/env python3
r"""PyTorch CPU reference timings (float32) for bench/bench_lora.cpp: a PEFT-style LoRA linear
layer in plain torch at LLaMA-7B shapes, forward + backward through autograd.

PyTorch is NOT a dependency of the project: run this from a throwaway virtual environment
outside the repository (setup_venv.sh beside it, or `python3 -m venv` + `pip install torch`;
docs/performance.md says how the recorded figures were taken).

The layer is what PEFT's lora.Linear computes with dropout 0 and no bias (LLaMA's linears have
none): a frozen base F.linear(x, W) plus the adapter path F.linear(F.linear(x, A), B) * s,
with W not requiring grad, A, B and x requiring grad (x stands for an activation inside the
network, so dX is computed, as bench_lora computes it). One timed call = forward + backward(dY),
gradients reset to None each call. T = 4096, r = 16, s = 32/16:
    lora_fwd_bwd_vproj   D = O = 4096
    lora_fwd_bwd_down    D = 11008, O = 4096

Output (the format bench_lora reads through VELORA_TORCH_REFERENCE): header lines start with
'#'; then one line per measurement:

    name  median_ms  extra

median_ms is the median over --reps timed calls after --warmup untimed ones (time.perf_counter).

Usage:
    "$VENV"/bin/python bench/pytorch_reference/lora_reference.py [--threads 2] [--reps 5] [--warmup 2]
"""

import argparse
import os
import statistics
import sys
import time


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--reps", type=int, default=5, help="timed calls per measurement; median reported (default 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    ap.add_argument("--only", type=str, default=None, help="only shapes whose name contains this (vproj, down)")
    ap.add_argument("--seed", type=int, default=1234)
    return ap.parse_args()


ARGS = parse_args()
# Thread env must be in place before torch initialises OpenMP/MKL.
os.environ.setdefault("OMP_NUM_THREADS", str(ARGS.threads))
os.environ.setdefault("MKL_NUM_THREADS", str(ARGS.threads))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

torch.set_num_threads(ARGS.threads)
torch.set_default_dtype(torch.float32)

T, R, ALPHA = 4096, 16, 32.0
SHAPES = [("vproj", 4096, 4096), ("down", 11008, 4096)]


def main():
    print(f"# torch {torch.__version__}  python {sys.version.split()[0]}")
    for line in torch.__config__.show().splitlines():
        l = line.strip()
        if any(k in l for k in ("Math Kernel Library", "MKL-DNN", "oneDNN", "OpenMP", "CPU capability", "OpenBLAS")):
            print(f"#   {l.lstrip('- ')}")
    print(f"# torch.get_num_threads()={torch.get_num_threads()} reps={ARGS.reps} warmup={ARGS.warmup} T={T} r={R} alpha={ALPHA} float32")
    print(f"# {'name':<32s} {'median_ms':>11s}  extra")
    s = ALPHA / R
    for name, d, o in SHAPES:
        if ARGS.only and ARGS.only not in name:
            continue
        g = torch.Generator().manual_seed(ARGS.seed)
        x = (torch.randn(T, d, generator=g) + 0.5).requires_grad_(True)
        w = torch.randn(o, d, generator=g) / d ** 0.5            # frozen: no grad
        a = (torch.randn(R, d, generator=g) / d ** 0.5).requires_grad_(True)
        b = (torch.randn(o, R, generator=g) * 0.01).requires_grad_(True)
        dy = torch.randn(T, o, generator=g)

        def step():
            x.grad = None
            a.grad = None
            b.grad = None
            y = F.linear(x, w) + F.linear(F.linear(x, a), b) * s
            y.backward(dy)

        for _ in range(ARGS.warmup):
            step()
        times = []
        for _ in range(ARGS.reps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        flops = 2 * 2.0 * T * o * d + 2.0 * T * R * (3.0 * d + 3.0 * o)
        med = statistics.median(times)
        print(f"{'lora_fwd_bwd_' + name:<34s} {med:11.3f}  min_ms={min(times):.3f} GFLOP/s={flops / med * 1e-6:.1f} "
              f"T={T} D={d} O={o} r={R} reps={ARGS.reps}", flush=True)


if __name__ == "__main__":
    main()
