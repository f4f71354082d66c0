"""AdaRankGradAdamW: the library's low-rank AdamW (AdaRankGrad, or GaLore) as a torch.optim.Optimizer.

The work is the libtorch adapter's optimizer (adapters/torch/include/velora/torch/optimizer.hpp)
over the very parameter tensors of this optimizer's groups: a step updates them in place. This
class keeps torch's surface: param_groups (read at every step, so LR schedulers work),
state_dict()/load_state_dict(), zero_grad(set_to_none=...), step(closure).
"""
import warnings
from dataclasses import dataclass, field

import torch
from torch.optim import Optimizer

from .. import _C
from ..errors import NumericalError
from ._checks import require_cpu

_LOW_RANK_KEYS = ("rank", "adaptive_rank", "refresh", "kind")


@dataclass
class StepReport:
    """What the last step did: ``status`` is the library's ("ok", "degenerate_input",
    "non_finite_input": the whole step was skipped, "overflow": some parameters were left
    unchanged); ``events`` lists (group, index, status) of every parameter whose status was not ok."""
    status: str = "ok"
    skipped: bool = False
    stepped: int = 0
    events: list = field(default_factory=list)


class AdaRankGradAdamW(Optimizer):
    """Low-rank AdamW over param groups that accept galore-torch's keys (docs/python.md).

    - A group with ``rank`` (galore-torch's keys ``rank``, ``update_proj_gap`` (200), ``scale``
      (0.25), ``proj_type`` ("std")) is GaLore: fixed rank, a new basis every update_proj_gap steps
      by an exact SVD, moments kept. A group with none of rank/adaptive_rank/refresh/kind is dense
      AdamW, as galore-torch's groups without ``rank`` are.
    - The library's own keys: ``kind`` ("auto": AdaRankGrad's choice per parameter, "low_rank",
      "dense"), ``adaptive_rank`` ((ξ, r_min, r_max)), ``refresh`` (("converged" |
      "captured_energy", threshold, min_interval, max_interval)), ``transport``
      ("squared_rotation", "clamped_rotation", "reset", "none"), ``seed``, ``nd`` ("flatten",
      "dense": parameters of more than 2 dimensions), ``state`` ("float32"; "8bit": the moments
      in 8-bit blocks of ``state_block`` elements, a power of two in [64, 4096], default 256;
      float32 and bfloat16 parameters), ``basis`` ("float32"; "int8", "int4": a low-rank
      parameter's projection basis quantised with a float scale per block of ``basis_block``
      elements of a row, a power of two in [32, 4096], default 256, Q-GaLore's INT4 projection;
      float32 and bfloat16 parameters; not with a rank budget), ``weight_rounding``
      ("stochastic", the default, or "nearest": how a torch.bfloat16 parameter's new weight is
      rounded back to bf16; such a parameter is stepped in float from
      its bf16 weight with no float master copy, the rounding noise a function of the seed, the
      parameter, its step and the element), ``convention`` ("galore": ε and the decay
      where GaLore/Hugging Face put them; "torch": torch.optim.AdamW's, under which dense groups
      match torch.optim.AdamW). With kind="auto" and no other key a group is the library's
      AdaRankGrad (adaptive rank ξ = 0.05 in [1, 128], refresh on convergence, α = 0.25).
    - Defaults are galore-torch's (lr 1e-3, betas (0.9, 0.999), eps 1e-6, weight decay 0, the
      "galore" convention), not torch.optim.AdamW's (eps 1e-8, weight decay 1e-2, "torch").
    - Only lr may change after a group's first step (the state belongs to the other options);
      changing another raises ValueError naming it.
    - ``nonfinite``: "skip" (default, GradScaler's rule: a step whose gradients hold NaN/Inf
      changes nothing and is reported in ``last_step``) or "raise" (the same, then
      velora.NumericalError).
    - ``process_group``: data-parallel training over torch.distributed (any ProcessGroup, e.g.
      ``torch.distributed.group.WORLD`` with the Gloo backend). Each rank computes the gradients
      of its own share of the batch; every step then uses the mean over the ranks: a low-rank
      parameter all-reduces its projected gradient (rank × other values) and, at a refresh, the
      subspace search's products; a dense one its gradient. Do not average the gradients elsewhere
      too (no DDP). Every rank builds the same optimizer and ends each step with the same bits.
    - CPU tensors of dtype float32, float64 or bfloat16 only (ValueError otherwise).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True,
                 no_deprecation_warning=False, convention="galore", nonfinite="skip", process_group=None, **library_defaults):
        fn = "velora.torch.AdaRankGradAdamW"
        if not correct_bias:
            raise ValueError(f"{fn}: argument 'correct_bias' is False; the library always corrects the moments' bias")
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"{fn}: argument 'nonfinite' is {nonfinite!r}; expected 'skip' or 'raise'")
        if not (lr >= 0):
            raise ValueError(f"{fn}: argument 'lr' is {lr}; it must be finite and >= 0")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, convention=convention, **library_defaults)
        super().__init__(params, defaults)
        self._nonfinite = nonfinite
        self._core = None
        self.last_step = StepReport()
        for group in self.param_groups:
            for p in group["params"]:
                require_cpu(p, fn, "params")
        # Every group's options checked now (ValueError naming the option), as torch's optimizers do.
        self._engine()
        if process_group is not None:
            self._core.set_process_group(process_group)

    # ---------------------------------------------------------------- torch's surface
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        status, skipped, stepped, events = self._engine().step(self._resolved_groups())
        self.last_step = StepReport(status, skipped, stepped, list(events))
        if self._nonfinite == "raise" and status in ("non_finite_input", "overflow"):
            what = "the step was skipped" if skipped else "some parameters were left unchanged"
            raise NumericalError(f"velora.torch.AdaRankGradAdamW.step: {status}: {what} (events {list(events)})", status, events)
        return loss

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            require_cpu(p, "velora.torch.AdaRankGradAdamW.add_param_group", "params")
        if getattr(self, "_core", None) is not None:
            self._core.add_param_group(list(group["params"]), self._resolve(group))

    def state_dict(self):
        """torch's state dict (param_groups with every option) plus ``"velora"``: the library's
        state (the adapter's archive: every group's options and each parameter's moments and basis)
        as a uint8 tensor. A round trip through load_state_dict is bit-identical."""
        sd = super().state_dict()
        sd["velora"] = torch.frombuffer(bytearray(self._engine().save()), dtype=torch.uint8)
        return sd

    def load_state_dict(self, state_dict):
        """Restores a state_dict() of an optimizer over parameters of the same shapes and dtypes in
        the same order. ValueError (naming the group, parameter and field) and nothing changed
        when it does not fit."""
        blob = state_dict.get("velora")
        rest = {k: v for k, v in state_dict.items() if k != "velora"}
        engine = self._engine()
        if blob is not None:
            engine.load(bytes(blob.numpy().tobytes()))   # checks everything before changing anything
        super().load_state_dict(rest)

    # ---------------------------------------------------------------- library reports
    def layer_state(self, param):
        """A registered parameter's optimizer state as numbers: low_rank, rank, refreshes, state_bytes."""
        return self._engine().layer_state(param)

    def info(self, param):
        """Deprecated spelling of layer_state (removed in the next release)."""
        warnings.warn("AdaRankGradAdamW.info is renamed layer_state", DeprecationWarning, stacklevel=2)
        return self.layer_state(param)

    def basis(self, param):
        """A copy of the subspace basis of a low-rank registered parameter: rank × len with
        orthonormal rows (len = the weight's rows when ``layer_state(param)["side"]`` is "left", its
        columns when "right"). galore-torch's ``ortho_matrix`` is its transpose on the left side
        and equals it on the right. ValueError for a dense or unregistered parameter."""
        return self._engine().basis(param)

    def set_basis(self, param, basis):
        """Installs ``basis`` (rank × len as basis() returns it, orthonormal rows, the parameter's
        dtype) as the subspace of a low-rank parameter, as a refresh would: the moments are
        transported by the group's policy (they are zero before the first step, which then keeps
        this basis) and the refresh schedule counts from here. The groups are registered first, as
        a step would. Returns the library's status ("ok"; "overflow": the transported moments would
        not be finite, nothing changed); ValueError (nothing changed) for a wrong shape, dtype, a
        non-finite entry or rows that are not orthonormal."""
        require_cpu(basis, "velora.torch.AdaRankGradAdamW.set_basis", "basis")
        with torch.no_grad():
            return self._engine().set_basis(param, basis)

    @property
    def skipped_steps(self):
        return self._engine().skipped_steps()

    def state_bytes(self):
        """Bytes of optimizer state held (bases and moments) and what torch.optim.AdamW would hold."""
        e = self._engine()
        return e.state_bytes(), e.adamw_state_bytes()

    # ---------------------------------------------------------------- internals
    def _engine(self):
        if self._core is None:
            self._core = _C.OptimizerCore([(list(g["params"]), self._resolve(g)) for g in self.param_groups])
        return self._core

    def _resolved_groups(self):
        out = []
        for g in self.param_groups:
            d = self._resolve(g)
            d["params"] = list(g["params"])
            out.append(d)
        return out

    @staticmethod
    def _resolve(group):
        """The group's options as the engine reads them (every key explicit)."""
        d = dict(lr=float(group["lr"]), beta1=float(group["betas"][0]), beta2=float(group["betas"][1]), eps=float(group["eps"]),
                 weight_decay=float(group["weight_decay"]), convention=group.get("convention", "galore"),
                 proj_type=group.get("proj_type", "std"), nd=group.get("nd", "flatten"))
        for key in ("transport", "seed", "scale", "update_proj_gap", "adaptive_rank", "refresh", "rank", "state", "state_block", "basis", "basis_block",
                    "weight_rounding"):
            if group.get(key) is not None:
                d[key] = group[key]
        if not any(group.get(k) is not None for k in _LOW_RANK_KEYS):
            d["kind"] = "dense"   # galore-torch: a group without 'rank' is AdamW
        elif group.get("rank") is not None and not any(group.get(k) is not None for k in ("adaptive_rank", "refresh")):
            d["galore"] = True    # GaLore: fixed rank, refresh every update_proj_gap steps, exact SVD
            d["kind"] = group.get("kind", "low_rank")
        else:
            d["kind"] = group.get("kind", "auto")
        return d
