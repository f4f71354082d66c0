#!/usr/bin/env python3
r"""velora.torch from Python, in one process: AdaRankGradAdamW.step against galore-torch's
GaLoreAdamW.step, and VeloraLinear's forward + backward against nn.Linear. Not a CI gate.

Run it with an interpreter that imports both the installed package (docs/python.md) and
galore-torch, e.g. a throwaway venv outside the repository:

    python3 -m venv --system-site-packages /tmp/velora-bench-venv
    /tmp/velora-bench-venv/bin/pip install "scikit-build-core>=0.8"
    /tmp/velora-bench-venv/bin/pip install --no-build-isolation ./python
    /tmp/velora-bench-venv/bin/pip install --no-deps galore-torch==1.0
    /tmp/velora-bench-venv/bin/python bench/python_bench.py [--threads 2] [--reps 5] [--check]

galore_torch/__init__.py imports its 8-bit optimizer (bitsandbytes) and, in adamw.py,
transformers' require_version (a torch version check). Neither is needed for GaLoreAdamW on the
CPU, so when they are missing this script loads galore_torch/adamw.py and galore_projector.py
directly, with require_version as a no-op (said in its output).

--check (instead of the timings): GaLore mode against GaLoreAdamW over 25 steps inside one subspace (update_proj_gap
larger than the run): the weights' largest relative difference (the issue's bound: 1e-5).
"""
import argparse
import importlib.util
import os
import statistics
import sys
import time
import types

import torch
from torch import nn

import velora.torch as vt


def load_galore():
    try:
        from galore_torch import GaLoreAdamW  # noqa: F401
        return GaLoreAdamW, "galore_torch (package import)"
    except ImportError:
        pass
    spec = importlib.util.find_spec("galore_torch")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("galore-torch is not installed: pip install --no-deps galore-torch==1.0")
    folder = list(spec.submodule_search_locations)[0]
    if "transformers.utils.versions" not in sys.modules:
        stub = types.ModuleType("transformers.utils.versions")
        stub.require_version = lambda *a, **k: None
        sys.modules.setdefault("transformers", types.ModuleType("transformers"))
        sys.modules.setdefault("transformers.utils", types.ModuleType("transformers.utils"))
        sys.modules["transformers.utils.versions"] = stub
    package = types.ModuleType("galore_torch")
    package.__path__ = [folder]
    sys.modules["galore_torch"] = package
    for name in ("galore_projector", "adamw"):
        s = importlib.util.spec_from_file_location(f"galore_torch.{name}", os.path.join(folder, f"{name}.py"))
        m = importlib.util.module_from_spec(s)
        sys.modules[f"galore_torch.{name}"] = m
        s.loader.exec_module(m)
    return sys.modules["galore_torch.adamw"].AdamW, "galore_torch/adamw.py loaded directly (require_version stubbed)"


def timed(fn, reps, min_s=0.2):
    fn()   # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_s / 4:
        fn()
        n += 1
    n = max(1, n * 4)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t0) / n)
    return statistics.median(samples)


def optimizer_pair(GaLoreAdamW, rows, cols, rank, gap, seed=0):
    torch.manual_seed(seed)
    w0 = torch.randn(rows, cols) * 0.02
    a, b = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    group = {"rank": rank, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std"}
    mine = vt.AdaRankGradAdamW([dict(params=[a], **group)], lr=1e-3)
    theirs = GaLoreAdamW([dict(params=[b], **group)], lr=1e-3)
    return a, b, mine, theirs


def bench_steps(GaLoreAdamW, args):
    rows, cols, rank = 1024, 4096, 128
    g = torch.randn(rows, cols)
    out = []
    for label, gap in (("steady (no refresh)", 10 ** 9), ("refresh (every step)", 1)):
        a, b, mine, theirs = optimizer_pair(GaLoreAdamW, rows, cols, rank, gap)
        a.grad, b.grad = g.clone(), g.clone()
        mine.step()
        theirs.step()   # the first step finds the subspace in both
        t_mine = timed(mine.step, args.reps)
        t_theirs = timed(theirs.step, args.reps)
        out.append((f"step {rows}x{cols} r={rank}, {label}", t_mine, t_theirs))
    return out


def bench_linear(args):
    t, d, o, groups = 2048, 1024, 4096, 32
    torch.manual_seed(0)
    ref = nn.Linear(d, o)
    mine = vt.VeloraLinear.from_linear(nn.Linear(d, o), groups=groups)
    x = torch.randn(t, d)
    dy = torch.randn(t, o)

    def run(m):
        def f():
            xx = x.requires_grad_(False)
            m.zero_grad(set_to_none=True)
            m(xx).backward(dy)
        return f

    return [(f"linear fwd+bwd T={t} D={d} O={o} G={groups} (vs nn.Linear)", timed(run(mine), args.reps), timed(run(ref), args.reps))]


def check(GaLoreAdamW):
    # The gradients share one rank-32 structure with well-separated singular values (32, 31, ..., 1)
    # plus 1e-3 noise: the subspace found at step 1 and each of its vectors are then determined to
    # float rounding in both implementations. (With near-equal singular values inside the kept rank,
    # e.g. a rank-8 signal plus noise at r = 32, individual vectors are not determined and Adam's
    # element-wise normalisation, which depends on them, differs at the 1e-3 level between any two
    # SVD implementations.)
    rows, cols, rank = 256, 512, 32
    a, b, mine, theirs = optimizer_pair(GaLoreAdamW, rows, cols, rank, 10 ** 9, seed=3)
    w0 = b.detach().clone()
    gen = torch.Generator().manual_seed(4)
    u, _ = torch.linalg.qr(torch.randn(rows, rank, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, rank, generator=gen, dtype=torch.float64))
    spectrum = torch.arange(rank, 0, -1, dtype=torch.float64)
    for step in range(25):
        s = spectrum * (1 + 0.5 * torch.rand(rank, generator=gen, dtype=torch.float64))
        g = ((u * s) @ v.t()).float() + 1e-3 * torch.randn(rows, cols, generator=gen)
        a.grad, b.grad = g.clone(), g.clone()
        mine.step()
        theirs.step()
    rel = ((a - b).abs().max() / b.abs().max()).item()
    travelled = ((b - w0).abs().max() / w0.abs().max()).item()   # so that a small difference means something
    return rel, travelled


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--check", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    GaLoreAdamW, how = load_galore()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads; galore: {how}")
    if args.check:
        rel, travelled = check(GaLoreAdamW)
        print(f"check: GaLore mode vs GaLoreAdamW, 256x512 r=32, 25 steps without a refresh: max relative weight difference {rel:.3g}"
              f" ({'within' if rel <= 1e-5 else 'ABOVE'} 1e-5); the weights moved {travelled:.3g} (relative)")
        return
    print(f"{'case':62s} {'velora ms':>10s} {'other ms':>10s} {'speed-up':>9s}")
    for name, t_mine, t_other in bench_steps(GaLoreAdamW, args) + bench_linear(args):
        print(f"{name:62s} {1e3 * t_mine:10.2f} {1e3 * t_other:10.2f} {t_other / t_mine:8.2f}x")


if __name__ == "__main__":
    main()
