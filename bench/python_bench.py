#!/usr/bin/env python3
r"""velora.torch from Python, in one process: AdaRankGradAdamW.step against galore-torch's
GaLoreAdamW.step, and VeloraLinear's forward + backward against nn.Linear and (with --official)
the official VeLoRA function. Not a CI gate; neither peer is a dependency of the package.

Run it with an interpreter that imports both the installed package (docs/python.md) and
galore-torch, e.g. a throwaway venv outside the repository (Debian's python3, so that the venv
sees Debian's torch):

    /usr/bin/python3 -m venv --system-site-packages VENV
    VENV/bin/pip install "scikit-build-core>=0.8"
    VENV/bin/pip install --no-build-isolation ./python
    VENV/bin/pip install --no-deps galore-torch==1.0
    VENV/bin/python bench/python_bench.py [--threads 2] [--reps 5] [--check] [--official DIR]

galore_torch/__init__.py imports its 8-bit optimizer (bitsandbytes) and, in adamw.py,
transformers' require_version (a torch version check). Neither is needed for GaLoreAdamW on the
CPU, so when they are missing this script loads galore_torch/adamw.py and galore_projector.py
directly, with require_version as a no-op (said in its output).

--official DIR: a copy of github.com/roymiles/VeLoRA (not on PyPI; e.g. `git clone` it, or its
velora/velora.py alone under DIR/velora/), outside this repository. load_official says how it is
imported (stubs for its unused peft/transformers imports).

--check (instead of the timings): GaLore mode against GaLoreAdamW over 25 steps inside one
subspace (the issue's bound on the weights: 1e-5 relative) in three cases: (a) a least-squares
model whose first gradient has well-separated singular values and no small projected entries,
(b) the random structure of earlier runs, (c) (b) with galore-torch's own basis installed in the
library (AdaRankGradAdamW.set_basis), which leaves the optimizer's arithmetic alone; then both
past refreshes every 5 steps (basis signs, weights); with --official, VeloraLinear's output and
gradients against the official function. docs/python.md has the figures.
"""
import argparse
import math
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
    # calls per repetition so that one repetition takes about min_s (one call when a call alone
    # takes longer: galore-torch's refresh step is tens of seconds)
    n = max(1, math.ceil(n * min_s / (time.perf_counter() - t0)))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t0) / n)
    return statistics.median(samples)


def optimizer_pair(GaLoreAdamW, rows, cols, rank, gap, seed=0, own_keys=None):
    """The same parameter under AdaRankGradAdamW and GaLoreAdamW with galore-torch's keys; with
    `own_keys` (the library's keys), the library's group adds them (e.g. a refresh rule, which
    makes it the library's own low-rank mode: randomized SVD, moments transported)."""
    torch.manual_seed(seed)
    w0 = torch.randn(rows, cols) * 0.02
    a, b = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    group = {"rank": rank, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std"}
    mine = vt.AdaRankGradAdamW([dict(params=[a], **group, **(own_keys or {}))], lr=1e-3)
    theirs = GaLoreAdamW([dict(params=[b], **group)], lr=1e-3)
    return a, b, mine, theirs


def bench_steps(GaLoreAdamW, args):
    rows, cols, rank = 1024, 4096, 128
    g = torch.randn(rows, cols)
    out = []
    # The third row is the comparison the C++ figure makes (docs/performance.md): the library's
    # own refresh (rank 128, randomized SVD warm-started from the previous basis, moments
    # transported: a refresh rule forced to every step) against GaLore's exact-SVD refresh.
    every_step = {"refresh": ("converged", 0.5, 1, 1)}
    for label, gap, own in (("steady (no refresh)", 10 ** 9, None), ("refresh (every step, exact SVD both)", 1, None),
                            ("refresh (every step), library's randomized SVD", 1, every_step)):
        a, b, mine, theirs = optimizer_pair(GaLoreAdamW, rows, cols, rank, gap, own_keys=own)
        a.grad, b.grad = g.clone(), g.clone()
        mine.step()
        theirs.step()   # the first step finds the subspace in both
        t_mine = timed(mine.step, args.reps)
        t_theirs = timed(theirs.step, args.reps)
        out.append((f"step {rows}x{cols} r={rank}, {label}", t_mine, t_theirs))
    return out


def bench_linear(args, official=None):
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

    t_mine = timed(run(mine), args.reps)
    out = [(f"linear fwd+bwd T={t} D={d} O={o} G={groups} (vs nn.Linear)", t_mine, timed(run(ref), args.reps))]
    if official is not None:
        # The official function takes B x L x D (its backward transposes dims 1 and 2): the same
        # T = 8 x 256 tokens; fp16=False, so that both keep float32 records.
        theirs = nn.Linear(d, o)
        wrapper = official.VeLoRAWrapper(dims=d, rank=1, num_groups=groups, init_type="batch_average_once", fp16=False)
        x3, dy3 = x.view(8, t // 8, d), dy.view(8, t // 8, o)

        def f():
            theirs.zero_grad(set_to_none=True)
            official_forward(official, wrapper, x3, theirs.weight, theirs.bias).backward(dy3)

        out.append((f"linear fwd+bwd T={t} D={d} O={o} G={groups} (vs official VeLoRA)", t_mine, timed(f, args.reps)))
    return out


# ---------------------------------------------------------------- GaLore parity (--check)
def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _vector_error(p, exact):
    """Largest entry error of p's columns against exact's (float64), each up to its sign."""
    p = p.double()
    return torch.minimum((p - exact).abs().amax(0), (p + exact).abs().amax(0)).max().item()


def _galore_state(opt, param):
    return opt.state[param]


def _galore_basis(opt, param, side):
    """galore-torch's projector basis as columns (len × r): its ortho_matrix is U[:, :r] on the left
    side and Vh[:r, :] on the right."""
    q = _galore_state(opt, param)["projector"].ortho_matrix
    return q if side == "left" else q.t()


def _mine_basis(opt, param):
    return opt.basis(param).t()   # the library's basis is r × len (rows): as columns


def _exact_first_step(g, w0, rank, side, lr, scale, basis=None, eps=1e-6, beta1=0.9, beta2=0.999):
    """GaLore's first step in float64: W1 − W0 = −step·scale·P·(m/(√v + ε)) with m = (1−β₁)Ĝ,
    v = (1−β₂)Ĝ², step = lr·√(1−β₂)/(1−β₁), P the exact SVD basis (or `basis`)."""
    gd = g.double()
    if basis is None:
        u, _, vh = torch.linalg.svd(gd, full_matrices=False)
        basis = u[:, :rank] if side == "left" else vh[:rank].t()
    p = basis.double()
    proj = p.t() @ gd if side == "left" else gd @ p
    m, v = (1 - beta1) * proj, (1 - beta2) * proj * proj
    n = m / (v.sqrt() + eps)
    step = lr * (1 - beta2) ** 0.5 / (1 - beta1)
    back = p @ n if side == "left" else n @ p.t()
    return -step * scale * back


def _exact_basis(g, rank, side):
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    return u[:, :rank] if side == "left" else vh[:rank].t()


def _projected_sign_flips(g, bases, exact, side):
    """Entries of the first projected gradient whose sign differs from the exact basis's (each basis
    vector's sign aligned with the exact one first), for velora and galore-torch, and the smallest
    |entry| relative to the largest: Adam's first step is m/(√v + ε) ≈ sign, so a flipped entry moves
    its weights the other way."""
    gd = g.double()
    out, worst = [], []
    for key in ("mine", "theirs"):
        p = bases[key].double()
        p = p * torch.sign((p * exact).sum(0))
        proj = (lambda q: q.t() @ gd) if side == "left" else (lambda q: gd @ q)
        mine, ref = proj(p), proj(exact)
        out.append(int((torch.sign(mine) != torch.sign(ref)).sum()))
        worst.append(((mine - ref).abs() / ref.abs()).max().item())
    ref = proj(exact).abs()
    out.append((ref.min() / ref.max()).item())
    return out + worst


def hadamard(n):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


class LeastSquares:
    """½‖W·X − Y‖²/N with the input's covariance X·Xᵀ/N = H·diag(c²)·Hᵀ (H a normalised Hadamard
    matrix: every entry ±1/√cols) and the target chosen so that the first gradient is
    G₀ = (W₀ − W*)·X·Xᵀ/N = U·diag(σ)·H[:, :rows]ᵀ with σ = 10·(32, 31, …, 1) and then 0.05 for the
    other directions: well-separated singular values (float32's SVD gets each vector to ~1e-6)
    and a projected gradient ±σᵢ/√cols with no entry near zero (Adam's m/√v has no sign to lose).
    The gradient of either trajectory is that of its own weights."""

    def __init__(self, rows, cols, w0, seed=5):
        gen = torch.Generator().manual_seed(seed)
        h = hadamard(cols)
        c2 = torch.linspace(2.0, 0.5, cols, dtype=torch.float64)   # the input's designed spectrum
        n = 2 * cols
        q, _ = torch.linalg.qr(torch.randn(n, cols, generator=gen, dtype=torch.float64))
        self.x = ((h * c2.sqrt()) @ q.t() * n ** 0.5).float()           # cols × N
        u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=gen, dtype=torch.float64))
        sigma = torch.full((rows,), 0.05, dtype=torch.float64)
        sigma[:32] = 10 * torch.arange(32, 0, -1, dtype=torch.float64)
        delta = (u * (sigma / c2[:rows])) @ h[:, :rows].t()            # W₀ − W*
        self.y = ((w0.double() - delta) @ self.x.double()).float()      # rows × N
        self.n = n

    def loss(self, w):
        with torch.no_grad():
            return (0.5 * ((w.double() @ self.x.double() - self.y.double()) ** 2).sum() / self.n).item()

    def grad(self, w):
        with torch.no_grad():
            return (w @ self.x - self.y) @ self.x.t() / self.n


def _run_pair(GaLoreAdamW, rows, cols, rank, gap, steps, grad_of, seed=3, inject=False, on_refresh=None):
    """Both optimizers over `steps` steps from the same weights; grad_of(step, w) gives the gradient."""
    a, b, mine, theirs = optimizer_pair(GaLoreAdamW, rows, cols, rank, gap, seed=seed)
    w0 = b.detach().clone()
    side = None
    first = {}
    for step in range(steps):
        ga, gb = grad_of(step, a.detach()), grad_of(step, b.detach())
        a.grad, b.grad = ga, gb
        theirs.step()
        if step == 0:
            side = "left" if tuple(_galore_state(theirs, b)["projector"].ortho_matrix.shape) == (rows, rank) else "right"
            if inject:   # galore-torch's own first basis, installed before velora's first step
                status = mine.set_basis(a, _galore_basis(theirs, b, side).t().contiguous())
                assert status == "ok", status
        mine.step()
        if step == 0:
            assert mine.layer_state(a)["side"] == side, (mine.layer_state(a)["side"], side)
            first = dict(g=gb, w0=w0, mine=(a.detach() - w0), theirs=(b.detach() - w0), side=side)
        if on_refresh is not None and step % gap == 0:
            on_refresh(step, mine, a, theirs, b, side)
    return a, b, w0, first


class canonical_galore_signs:
    """Within the block, galore-torch's projector (patched in memory, this process only) flips its
    SVD basis vectors as the library does: each one's largest-magnitude entry positive."""

    def __enter__(self):
        self.cls = sys.modules["galore_torch.galore_projector"].GaLoreProjector
        self.original = original = self.cls.get_orthogonal_matrix

        def canonical(proj, weights, rank, type):
            q = original(proj, weights, rank, type)
            cols = q if type == "left" else q.t()
            signs = torch.sign(cols.gather(0, cols.abs().argmax(0).unsqueeze(0))).squeeze(0)
            signs[signs == 0] = 1
            cols = cols * signs
            return cols if type == "left" else cols.t().contiguous()

        self.cls.get_orthogonal_matrix = canonical
        return self

    def __exit__(self, *exc):
        self.cls.get_orthogonal_matrix = self.original


def check(GaLoreAdamW, steps=25):
    rows, cols, rank = 256, 512, 32
    out = {}

    # (a) well-separated spectrum: a least-squares model, 25 steps without a refresh.
    torch.manual_seed(3)
    w0 = torch.randn(rows, cols) * 0.02
    model = LeastSquares(rows, cols, w0)
    a, b, w0_, first = _run_pair(GaLoreAdamW, rows, cols, rank, 10 ** 9, steps, lambda s, w: model.grad(w))
    exact = _exact_first_step(first["g"], first["w0"], rank, first["side"], 1e-3, 0.25)
    out["a"] = dict(weights=_rel(a.detach(), b.detach()), moved=_rel(b.detach(), w0_),
                    first_mine=_rel(first["mine"], exact), first_theirs=_rel(first["theirs"], exact))
    e = _exact_basis(first["g"], rank, first["side"])
    out["a"]["sv"] = torch.linalg.svdvals(first["g"].double())[: rank + 2].tolist()

    # (b) the random case of earlier runs: one rank-32 structure with singular values
    # 32..1 times random factors in [1, 1.5] (so some nearly equal) plus 1e-3 noise.
    gen = torch.Generator().manual_seed(4)
    u, _ = torch.linalg.qr(torch.randn(rows, rank, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, rank, generator=gen, dtype=torch.float64))
    spectrum = torch.arange(rank, 0, -1, dtype=torch.float64)
    grads = []
    for _ in range(steps):
        s = spectrum * (1 + 0.5 * torch.rand(rank, generator=gen, dtype=torch.float64))
        grads.append(((u * s) @ v.t()).float() + 1e-3 * torch.randn(rows, cols, generator=gen))
    bases = {}

    def keep_bases(step, mine, pa, theirs, pb, side):
        if step == 0:
            bases["mine"], bases["theirs"] = _mine_basis(mine, pa), _galore_basis(theirs, pb, side)

    a, b, w0_, first = _run_pair(GaLoreAdamW, rows, cols, rank, 10 ** 9, steps, lambda s, w: grads[s].clone(), on_refresh=keep_bases)
    exact = _exact_first_step(first["g"], first["w0"], rank, first["side"], 1e-3, 0.25)
    e = _exact_basis(first["g"], rank, first["side"])
    sv = torch.linalg.svdvals(first["g"].double())[: rank + 1]
    gaps = torch.minimum(torch.cat([torch.tensor([float("inf")], dtype=sv.dtype), sv[:-2] - sv[1:-1]]), sv[:-1] - sv[1:])
    flips = _projected_sign_flips(first["g"], bases, e, first["side"])
    out["b"] = dict(flips=flips, weights=_rel(a.detach(), b.detach()), moved=_rel(b.detach(), w0_),
                    first_mine=_rel(first["mine"], exact), first_theirs=_rel(first["theirs"], exact),
                    first_theirs_own=_rel(first["theirs"], _exact_first_step(first["g"], first["w0"], rank, first["side"], 1e-3, 0.25, basis=bases["theirs"])),
                    basis_mine=_vector_error(bases["mine"], e), basis_theirs=_vector_error(bases["theirs"], e),
                    min_gap=(gaps.min() / sv[0]).item())
    # the same for (a)'s first basis, for comparison
    a2, b2, _, first2 = _run_pair(GaLoreAdamW, rows, cols, rank, 10 ** 9, 1, lambda s, w: model.grad(w), on_refresh=keep_bases)
    e2 = _exact_basis(first2["g"], rank, first2["side"])
    out["a"].update(basis_mine=_vector_error(bases["mine"], e2), basis_theirs=_vector_error(bases["theirs"], e2),
                    flips=_projected_sign_flips(first2["g"], bases, e2, first2["side"]))

    # (c) the random case with galore-torch's own first basis installed in the library
    # (AdaRankGradAdamW.set_basis before its first step): the same subspace, the optimizer's arithmetic alone.
    a, b, w0_, first = _run_pair(GaLoreAdamW, rows, cols, rank, 10 ** 9, steps, lambda s, w: grads[s].clone(), inject=True)
    out["c"] = dict(weights=_rel(a.detach(), b.detach()), moved=_rel(b.detach(), w0_), first=_rel(first["mine"], first["theirs"]))
    return out


def refresh_check(GaLoreAdamW, steps=25, gap=5):
    """Past refreshes (update_proj_gap = gap): per refresh, how many basis vectors keep their sign
    from the previous basis in each implementation, how many agree in sign between them, and the
    weights at the end; then galore-torch with its SVD signs canonicalised as the library's."""
    rows, cols, rank = 256, 512, 32
    torch.manual_seed(3)
    w0 = torch.randn(rows, cols) * 0.02
    model = LeastSquares(rows, cols, w0)
    rows_out = []
    prev = {}

    def record(step, mine, pa, theirs, pb, side):
        bm, bt = _mine_basis(mine, pa), _galore_basis(theirs, pb, side)
        cross = (bm * bt).sum(0)   # per column: +1 same sign, −1 opposite
        entry = dict(step=step + 1, agree=int((cross > 0).sum()), aligned=float(cross.abs().min()))
        if prev:
            cm, ct = (bm * prev["m"]).sum(0), (bt * prev["t"]).sum(0)
            entry.update(kept_mine=int((cm > 0).sum()), kept_theirs=int((ct > 0).sum()), overlap=float(min(cm.abs().min(), ct.abs().min())))
        prev["m"], prev["t"] = bm.clone(), bt.clone()
        rows_out.append(entry)

    a, b, w0_, _ = _run_pair(GaLoreAdamW, rows, cols, rank, gap, steps, lambda s, w: model.grad(w), on_refresh=record)
    plain = dict(weights=_rel(a.detach(), b.detach()), moved=_rel(b.detach(), w0_), loss0=model.loss(w0_),
                 loss_mine=model.loss(a.detach()), loss_theirs=model.loss(b.detach()))
    with canonical_galore_signs():
        a, b, w0_, _ = _run_pair(GaLoreAdamW, rows, cols, rank, gap, steps, lambda s, w: model.grad(w))
    canon = dict(weights=_rel(a.detach(), b.detach()))
    a, b, w0_, _ = _run_pair(GaLoreAdamW, rows, cols, rank, 10 ** 9, steps, lambda s, w: model.grad(w))
    none = dict(weights=_rel(a.detach(), b.detach()))
    return rows_out, plain, canon, none


# ---------------------------------------------------------------- the official VeLoRA function (--official DIR)
def load_official(folder):
    """The official VeLoRA code (github.com/roymiles/VeLoRA, velora/velora.py), from `folder` (the
    repository's root or its velora/ folder). Its file imports peft and transformers.models.llama
    at the top without using them in the functions compared here: stubs stand in when they are
    missing. It decorates a method with a bare @torch.no_grad, which torch < 2.1 cannot: on such a
    torch the decorator is given a shim while the file loads (said in the output). The module is
    loaded under another name, since ours is also called velora."""
    path = os.path.join(folder, "velora", "velora.py")
    if not os.path.exists(path):
        path = os.path.join(folder, "velora.py")
    if not os.path.exists(path):
        sys.exit(f"--official: no velora/velora.py under {folder}")
    notes = []
    for name in ("peft", "transformers", "transformers.models", "transformers.models.llama"):
        if name not in sys.modules:
            try:
                importlib.import_module(name)
            except ImportError:
                sys.modules[name] = types.ModuleType(name)
                notes.append(f"{name} stubbed")
    original = torch.no_grad
    try:
        original(lambda: None)
    except TypeError:
        class _no_grad_shim:
            def __new__(cls, func=None):
                return original()(func) if callable(func) else original()
        torch.no_grad = _no_grad_shim
        notes.append("bare @torch.no_grad shimmed while loading")
    try:
        spec = importlib.util.spec_from_file_location("velora_official", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        torch.no_grad = original
    return module, f"official VeLoRA from {path}" + (f" ({', '.join(notes)})" if notes else "")


def official_forward(official, wrapper, x, weight, bias, scale=1.0):
    """The official path of functional_velora_linear_fn for a plain linear layer: the wrapper
    records zp (one value per sub-token of size D/G) and v (its `embed`), then
    VeLoRA.apply(x, W, b, zp, embed, scale). x is B × L × D (its backward transposes dims 1, 2)."""
    bsz, n, d = x.shape
    with torch.no_grad():
        zp = wrapper(x.reshape(bsz * n * wrapper.num_groups, d // wrapper.num_groups))
    return official.VeLoRA.apply(x, weight, bias, zp, wrapper.embed, scale)


def official_check(official, b=4, n=64, d=256, o=384, groups=16, seed=0):
    """VeloraLinear against the official function at the same settings: G = num_groups (sub-tokens
    of D/G values), v the normalised mean of the first batch's sub-tokens (official init_type
    "batch_average_once", fp16=False: float32 like VeloraLinear's default z_storage), scale 1."""
    torch.manual_seed(seed)
    base = nn.Linear(d, o)
    mine = vt.VeloraLinear.from_linear(nn.Linear(d, o), groups=groups)
    with torch.no_grad():
        mine.weight.copy_(base.weight)
        mine.bias.copy_(base.bias)
    wrapper = official.VeLoRAWrapper(dims=d, rank=1, num_groups=groups, init_type="batch_average_once", fp16=False)
    out = {}
    for k in range(2):   # the first batch sets v in both; the second uses it
        x = torch.randn(b, n, d) + (0.5 if k == 0 else 0.3)   # a non-zero mean, so that v is well defined
        dy = torch.randn(b, n, o)
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        base.zero_grad(set_to_none=True)
        mine.zero_grad(set_to_none=True)
        y1 = mine(x1)
        y1.backward(dy)
        y2 = official_forward(official, wrapper, x2, base.weight, base.bias)
        y2.backward(dy)
        out[k] = dict(v=_rel(mine.v.detach(), wrapper.embed.detach().reshape(-1)), y=_rel(y1.detach(), y2.detach()),
                      dx=_rel(x1.grad, x2.grad), dw=_rel(mine.weight.grad, base.weight.grad), db=_rel(mine.bias.grad, base.bias.grad))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--check", action="store_true", help="numerical comparisons instead of timings")
    p.add_argument("--official", metavar="DIR", help="a checkout of github.com/roymiles/VeLoRA (outside this repository)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    GaLoreAdamW, how = load_galore()
    official, how_official = load_official(args.official) if args.official else (None, None)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads; galore: {how}" + (f"; {how_official}" if official else ""))
    if args.check:
        r = check(GaLoreAdamW)
        a, b, c = r["a"], r["b"], r["c"]
        verdict = lambda x: "within" if x <= 1e-5 else "ABOVE"
        print("GaLore mode vs GaLoreAdamW, 256x512, r=32, 25 steps without a refresh; max |W_velora - W_galore| / max |W_galore|:")
        print(f"  (a) least squares, well-separated spectrum:      {a['weights']:.3g} ({verdict(a['weights'])} 1e-5); weights moved {a['moved']:.3g}")
        print(f"      first step vs the exact float64 GaLore step: velora {a['first_mine']:.3g}, galore-torch {a['first_theirs']:.3g}")
        print(f"      first basis vs float64 SVD (max entry error): velora {a['basis_mine']:.3g}, galore-torch {a['basis_theirs']:.3g}")
        print(f"      projected first gradient, entries of flipped sign: velora {a['flips'][0]}, galore-torch {a['flips'][1]}"
              f" (smallest |entry| {a['flips'][2]:.3g} of the largest);"
              f" largest relative entry error velora {a['flips'][3]:.3g}, galore-torch {a['flips'][4]:.3g}")
        print(f"  (b) random structure, near-equal values:        {b['weights']:.3g} ({verdict(b['weights'])} 1e-5); weights moved {b['moved']:.3g}")
        print(f"      smallest gap among the kept singular values: {b['min_gap']:.3g} of the largest")
        print(f"      first basis vs float64 SVD (max entry error): velora {b['basis_mine']:.3g}, galore-torch {b['basis_theirs']:.3g}")
        print(f"      first step vs the exact float64 GaLore step: velora {b['first_mine']:.3g}, galore-torch {b['first_theirs']:.3g}"
              f" (vs the float64 step on its own basis: {b['first_theirs_own']:.3g})")
        print(f"      projected first gradient, entries of flipped sign: velora {b['flips'][0]}, galore-torch {b['flips'][1]}"
              f" (smallest |entry| {b['flips'][2]:.3g} of the largest);"
              f" largest relative entry error velora {b['flips'][3]:.3g}, galore-torch {b['flips'][4]:.3g}")
        print(f"  (c) (b) with galore-torch's basis installed in velora (set_basis): {c['weights']:.3g} ({verdict(c['weights'])} 1e-5);"
              f" first step {c['first']:.3g}")
        rows, plain, canon, none = refresh_check(GaLoreAdamW)
        print("refresh every 5 steps (least squares of (a), 25 steps): per refresh, columns of the r=32 basis")
        print(f"  {'step':>4s} {'same sign velora/galore':>24s} {'kept sign velora':>17s} {'kept sign galore':>17s} {'min |cos| old/new (both)':>25s}")
        for e in rows:
            print(f"  {e['step']:4d} {e['agree']:24d} {e.get('kept_mine', '-'):>17} {e.get('kept_theirs', '-'):>17} {e.get('overlap', float('nan')):25.6f}")
        print(f"  weights after 25 steps: {plain['weights']:.3g} (moved {plain['moved']:.3g}); with galore-torch's signs canonicalised"
              f" as the library's: {canon['weights']:.3g}; the same run without a refresh: {none['weights']:.3g}")
        print(f"  loss {plain['loss0']:.6g} at the start; after 25 steps velora {plain['loss_mine']:.6g}, galore-torch {plain['loss_theirs']:.6g}")
        if official is not None:
            for k, e in official_check(official).items():
                print(f"VeloraLinear vs official VeLoRA (B=4 L=64 D=256 O=384 G=16), batch {k + 1}: "
                      + ", ".join(f"{name} {val:.3g}" for name, val in e.items()) + " (max relative)")
        return
    print(f"{'case':66s} {'velora ms':>10s} {'other ms':>10s} {'speed-up':>9s}")
    for name, t_mine, t_other in bench_steps(GaLoreAdamW, args) + bench_linear(args, official):
        print(f"{name:66s} {1e3 * t_mine:10.2f} {1e3 * t_other:10.2f} {t_other / t_mine:8.2f}x")


if __name__ == "__main__":
    main()
