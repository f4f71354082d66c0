#!/usr/bin/env python3
r"""PyTorch CPU reference timings (float32) for the GaLore-style kernels.

PyTorch is NOT a dependency of the project: this script is only a reference to
compare against, run from a throwaway virtual environment outside the
repository (setup_venv.sh beside it creates one; docs/performance.md).

Output: header lines start with '#'; then one line per measurement:

    name  median_ms  extra

median_ms is the median over --reps repetitions of the per-call time; each
repetition times a loop of n calls (n chosen after warm-up so that one
repetition takes >= --min-rep-s seconds), using time.perf_counter.

Usage:
    "$VENV"/bin/python bench/pytorch_reference/torch_reference.py \
        [--threads 2] [--reps 5] [--min-rep-s 0.2] [--refresh-reps 3] \
        [--only REGEX] [--alloc]
"""

import argparse
import math
import os
import re
import statistics
import sys
import time
import warnings


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2,
                    help="torch.set_num_threads (default 2)")
    ap.add_argument("--reps", type=int, default=5,
                    help="timed repetitions per measurement; median reported (default 5)")
    ap.add_argument("--min-rep-s", type=float, default=0.2,
                    help="minimum wall time of one repetition in s (default 0.2)")
    ap.add_argument("--warmup-s", type=float, default=0.1,
                    help="minimum warm-up time per measurement in s (default 0.1)")
    ap.add_argument("--refresh-reps", type=int, default=3,
                    help="repetitions for the expensive SVD measurements "
                         "(GaLore refresh step, full linalg.svd); capped by --reps (default 3)")
    ap.add_argument("--only", type=str, default=None,
                    help="only run measurements whose name matches this regex")
    ap.add_argument("--alloc", action="store_true",
                    help="GEMMs: use plain `a @ b` (allocates the result each call) "
                         "instead of torch.matmul(a, b, out=preallocated)")
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


# --------------------------------------------------------------------------
# timing helpers
# --------------------------------------------------------------------------

def selected(name):
    return ARGS.only is None or re.search(ARGS.only, name) is not None


def emit(name, median_ms, extra=""):
    print(f"{name:<34s} {median_ms:11.3f}  {extra}", flush=True)


def bench(fn, reps=None, min_rep_s=None, warmup_s=None, fixed_n=None):
    """Returns (median_ms, min_ms, n_per_rep, reps)."""
    reps = ARGS.reps if reps is None else reps
    min_rep_s = ARGS.min_rep_s if min_rep_s is None else min_rep_s
    warmup_s = ARGS.warmup_s if warmup_s is None else warmup_s

    # warm-up: one call, then >= 2 calls and >= warmup_s seconds that give
    # the per-call estimate (skipped when fixed_n is given).
    fn()
    if fixed_n is not None:
        n = fixed_n
    else:
        calls = 0
        t0 = time.perf_counter()
        while True:
            fn()
            calls += 1
            el = time.perf_counter() - t0
            if el >= warmup_s and calls >= 2:
                break
        per_call = el / calls
        n = max(1, math.ceil(min_rep_s / per_call))
        # calibration (also more warm-up): grow n until one loop of n calls
        # takes >= min_rep_s (first calls are often slow: first-touch, state allocation)
        for _ in range(4):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            el = time.perf_counter() - t0
            if el >= min_rep_s:
                break
            n = max(n + 1, math.ceil(n * 1.05 * min_rep_s / el))

    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n)
    ms = [t * 1e3 for t in times]
    return statistics.median(ms), min(ms), n, reps


def fmt_common(min_ms, n, reps):
    return f"min_ms={min_ms:.3f} n={n} reps={reps}"


def gflops(flop, ms):
    return flop / (ms * 1e-3) / 1e9


# --------------------------------------------------------------------------
# header
# --------------------------------------------------------------------------

def header():
    import importlib.metadata as md
    print(f"# torch {torch.__version__}  python {sys.version.split()[0]}")
    for line in torch.__config__.show().splitlines():
        l = line.strip()
        if any(k in l for k in ("Math Kernel Library", "MKL-DNN", "oneDNN", "OpenMP",
                                "CPU capability", "OpenBLAS")):
            print(f"#   {l.lstrip('- ')}")
    try:
        print(f"# galore-torch {md.version('galore-torch')}")
    except md.PackageNotFoundError:
        print("# galore-torch not installed")
    print(f"# torch.get_num_threads()={torch.get_num_threads()} "
          f"reps={ARGS.reps} min_rep_s={ARGS.min_rep_s} refresh_reps="
          f"{min(ARGS.refresh_reps, ARGS.reps)} gemm_out={'alloc' if ARGS.alloc else 'preallocated'} "
          f"seed={ARGS.seed}")
    print(f"# {'name':<32s} {'median_ms':>11s}  extra")


# --------------------------------------------------------------------------
# a. GEMMs
# --------------------------------------------------------------------------

def gemm_case(name, a, b):
    """a, b may be transposed views; (m x k) @ (k x n)."""
    if not selected(name):
        return
    m, k = a.shape
    k2, n = b.shape
    assert k == k2
    if ARGS.alloc:
        def fn():
            return a @ b
    else:
        out = torch.empty(m, n)

        def fn():
            torch.matmul(a, b, out=out)
    med, mn, nn, reps = bench(fn)
    flop = 2.0 * m * n * k
    emit(name, med, f"GFLOP/s={gflops(flop, med):.1f} m={m} n={n} k={k} " + fmt_common(mn, nn, reps))


def run_gemms():
    g = torch.Generator().manual_seed(ARGS.seed)
    T, D, O, R, Kr = 4096, 1024, 1024, 128, 138
    dY = torch.randn(T, O, generator=g)
    X = torch.randn(T, D, generator=g)
    Z = torch.randn(T, 32, generator=g)
    B = torch.randn(R, 1024, generator=g)
    G = torch.randn(1024, 4096, generator=g)
    N = torch.randn(R, 4096, generator=g)
    Omega = torch.randn(4096, Kr, generator=g)
    Q = torch.randn(1024, Kr, generator=g)

    gemm_case("gemm_dW_dYt_X", dY.t(), X)                 # 1024x1024, k=4096
    gemm_case("gemm_A_dYt_Z", dY.t(), Z)                  # 1024x32,   k=4096
    gemm_case("gemm_proj_B_G", B, G)                      # 128x4096,  k=1024
    gemm_case("gemm_backproj_Bt_N", B.t(), N)             # 1024x4096, k=128
    gemm_case("gemm_rsvd_G_Omega", G, Omega)              # 1024x138,  k=4096
    gemm_case("gemm_rsvd_Gt_Q", G.t(), Q)                 # 4096x138,  k=1024


# --------------------------------------------------------------------------
# b. dense linear layer fwd + bwd
# --------------------------------------------------------------------------

def run_linear():
    g = torch.Generator().manual_seed(ARGS.seed + 1)
    T, D, O = 4096, 1024, 1024
    X = torch.randn(T, D, generator=g).requires_grad_(True)
    W = (torch.randn(O, D, generator=g) / math.sqrt(D)).requires_grad_(True)
    b = torch.zeros(O).requires_grad_(True)
    dY = torch.randn(T, O, generator=g)

    name = "linear_fwd"
    if selected(name):
        def fwd():
            with torch.no_grad():
                return F.linear(X, W, b)
        med, mn, n, reps = bench(fwd)
        emit(name, med, f"GFLOP/s={gflops(2.0 * T * D * O, med):.1f} T={T} D={D} O={O} no_grad "
             + fmt_common(mn, n, reps))

    name = "linear_fwd_bwd"
    if selected(name):
        def fwdbwd():
            X.grad = None
            W.grad = None
            b.grad = None
            Y = F.linear(X, W, b)
            Y.backward(dY)
        med, mn, n, reps = bench(fwdbwd)
        emit(name, med, f"GFLOP/s={gflops(3 * 2.0 * T * D * O, med):.1f} T={T} D={D} O={O} "
             "(fwd+dX+dW+db, grads set_to_none each iter) " + fmt_common(mn, n, reps))


# --------------------------------------------------------------------------
# c. torch.optim.AdamW
# --------------------------------------------------------------------------

def run_adamw():
    shape = (1024, 4096)
    nel = shape[0] * shape[1]
    variants = [
        ("adamw_fused", dict(fused=True)),
        ("adamw_foreach", dict(fused=False, foreach=True)),
        ("adamw_single_tensor", dict(fused=False, foreach=False)),
    ]
    for name, kw in variants:
        if not selected(name):
            continue
        g = torch.Generator().manual_seed(ARGS.seed + 2)
        p = torch.nn.Parameter(torch.randn(*shape, generator=g) * 0.02)
        p.grad = torch.randn(*shape, generator=g) * 1e-3   # fixed gradient
        opt = torch.optim.AdamW([p], lr=1e-3, betas=(0.9, 0.999), eps=1e-6,
                                weight_decay=0.0, **kw)
        med, mn, n, reps = bench(opt.step)
        emit(name, med, f"ns/elem={med * 1e6 / nel:.3f} shape={shape[0]}x{shape[1]} "
             f"{kw} " + fmt_common(mn, n, reps))


# --------------------------------------------------------------------------
# test matrix for d./e.: G = U diag(1/(1+i)) V^T + N(0, (1e-10)^2)
# --------------------------------------------------------------------------

def make_G(m=1024, n=4096, seed=None):
    seed = ARGS.seed + 3 if seed is None else seed
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    U = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    s = 1.0 / (1.0 + torch.arange(r, dtype=torch.float64))
    G = (U * s) @ V.t() + 1e-10 * torch.randn(m, n, generator=g, dtype=torch.float64)
    return G.to(torch.float32).contiguous()


# --------------------------------------------------------------------------
# d. GaLore AdamW
# --------------------------------------------------------------------------

def import_galore():
    # galore_torch/__init__.py also imports its 8-bit variant, which pulls in
    # bitsandbytes (and transformers for require_version); silence their
    # import-time chatter about missing optional CUDA/triton kernels.
    import logging
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from galore_torch import GaLoreAdamW
    finally:
        logging.disable(logging.NOTSET)
    return GaLoreAdamW


def run_galore(G):
    names = ["galore_adamw_step", "galore_adamw_refresh_step"]
    if not any(selected(n) for n in names):
        return
    GaLoreAdamW = import_galore()
    shape = tuple(G.shape)
    rank = 128

    def make(update_proj_gap):
        g = torch.Generator().manual_seed(ARGS.seed + 4)
        p = torch.nn.Parameter(torch.randn(*shape, generator=g) * 0.02)
        p.grad = G.clone()  # fixed gradient (decaying spectrum)
        group = dict(params=[p], rank=rank, update_proj_gap=update_proj_gap,
                     scale=0.25, proj_type="std")
        opt = GaLoreAdamW([group], lr=1e-3, betas=(0.9, 0.999), eps=1e-6,
                          weight_decay=0.0, no_deprecation_warning=True)
        return p, opt

    name = "galore_adamw_step"
    if selected(name):
        p, opt = make(10 ** 9)
        opt.step()  # first step: computes the SVD (outside timing)
        st = opt.state[p]
        P = st["projector"].ortho_matrix
        side = "left(P=U[:,:r], R=P^T G)" if P.shape[0] == shape[0] else "right(P=Vh[:r], R=G P^T)"
        med, mn, n, reps = bench(opt.step)
        emit(name, med, f"shape={shape[0]}x{shape[1]} rank={rank} ortho={tuple(P.shape)} "
             f"side={side} state={tuple(st['exp_avg'].shape)} " + fmt_common(mn, n, reps))

    name = "galore_adamw_refresh_step"
    if selected(name):
        p, opt = make(1)  # SVD (torch.linalg.svd, full_matrices=False) every step
        reps = max(1, min(ARGS.refresh_reps, ARGS.reps))
        med, mn, n, reps = bench(opt.step, reps=reps, fixed_n=1, warmup_s=0.0)
        emit(name, med, f"shape={shape[0]}x{shape[1]} rank={rank} update_proj_gap=1 "
             "(full torch.linalg.svd every step) " + fmt_common(mn, n, reps))


def run_full_svd(G):
    name = "linalg_svd_full_1024x4096"
    if not selected(name):
        return
    reps = max(1, min(ARGS.refresh_reps, ARGS.reps))
    med, mn, n, reps = bench(lambda: torch.linalg.svd(G, full_matrices=False),
                             reps=reps, fixed_n=1, warmup_s=0.0)
    emit(name, med, f"torch.linalg.svd(G, full_matrices=False) (what a GaLore refresh calls) "
         + fmt_common(mn, n, reps))


# --------------------------------------------------------------------------
# e. torch.svd_lowrank
# --------------------------------------------------------------------------

def run_svd_lowrank(G):
    names = ["svd_lowrank_q138_niter2", "svd_lowrank_q138_niter1"]
    if not any(selected(n) for n in names):
        return
    r, q = 128, 138
    G64 = G.double()
    sig = torch.linalg.svdvals(G64)
    tail = math.sqrt(float((sig[r:] ** 2).sum()))

    for niter in (2, 1):
        name = f"svd_lowrank_q{q}_niter{niter}"
        if not selected(name):
            continue
        # accuracy from one seeded call
        torch.manual_seed(ARGS.seed + 5)
        U, S, V = torch.svd_lowrank(G, q=q, niter=niter)
        Ur = U[:, :r].double()
        res = float(torch.linalg.norm(G64 - Ur @ (Ur.t() @ G64)))
        ratio = res / tail
        torch.manual_seed(ARGS.seed + 6)
        med, mn, n, reps = bench(lambda: torch.svd_lowrank(G, q=q, niter=niter))
        emit(name, med, f"residual_ratio={ratio:.6f} (top-{r} of q={q}; "
             f"tail={tail:.6e} sigma_{r}={float(sig[r]):.4e}) " + fmt_common(mn, n, reps))


# --------------------------------------------------------------------------

def main():
    header()
    t_all = time.perf_counter()
    run_gemms()
    run_linear()
    run_adamw()
    need_G = any(selected(n) for n in ("galore_adamw_step", "galore_adamw_refresh_step",
                                       "linalg_svd_full_1024x4096",
                                       "svd_lowrank_q138_niter2", "svd_lowrank_q138_niter1"))
    if need_G:
        G = make_G()
        run_galore(G)
        run_full_svd(G)
        run_svd_lowrank(G)
    print(f"# total wall time {time.perf_counter() - t_all:.1f} s")


if __name__ == "__main__":
    main()
