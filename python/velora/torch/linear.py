"""VeloraLinear: nn.Linear whose input is kept for the backward pass as a VeLoRA record.

y = x·Wᵀ + b and dX = dY·W are torch's own products (F.linear and a matmul, as nn.Linear), so
they are nn.Linear's bits. Instead of x (T×D) the forward keeps a record Z = X·(I_G ⊗ v)ᵀ
(T×G) and v (s = ceil(D/G) values), made by the library and saved with save_for_backward; the
backward computes dW = scale · dYᵀZ · (I_G ⊗ vᵀ), VeLoRA's estimate (exact when G = D).
"""
import math

import torch
from torch import nn
from torch.nn import functional as F

from .. import _C
from ._checks import require_cpu, require_input_dtype
from ._process_group import check_shareable, group_for_forward

_FORWARD = "velora.torch.VeloraLinear.forward"
_BACKWARD = "velora.torch.VeloraLinear.backward"


class _VeloraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer, record):
        wide = x if x.dtype == torch.float32 else x.float()   # half inputs: a transient copy
        y = F.linear(wide, weight, bias)
        z = v = None
        status = "ok"
        if record:
            status, z, v = layer._compress(wide.reshape(-1, wide.shape[-1]))
        ctx.layer = layer
        ctx.status = status
        ctx.x_dtype = x.dtype
        ctx.has_bias = bias is not None
        ctx.save_for_backward(z, v, weight)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        z, v, weight = ctx.saved_tensors
        dyf = dy if dy.dtype == torch.float32 else dy.float()
        dy2 = dyf.reshape(-1, dyf.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = dyf.matmul(weight)
            if ctx.x_dtype != torch.float32:
                dx = dx.to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            if dy2.shape[0] == 0:
                dw = torch.zeros_like(weight)
            elif ctx.status in ("non_finite_input", "overflow"):
                # No record could be made: a NaN gradient, so that the optimizer's whole-step check
                # (or a GradScaler) skips the step instead of training on a gradient that does not exist.
                dw = torch.full_like(weight, math.nan)
            elif z is None:
                raise ValueError(f"{_BACKWARD}: the weight gradient is needed but the forward made no record "
                                 "(the weight did not require grad, or grad mode was off, when the forward ran)")
            else:
                dw = ctx.layer._core.gradient_factor(dy2, z, v)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db, None, None


class VeloraLinear(nn.Module):
    """nn.Linear with a VeLoRA record of its input (docs/python.md).

    Arguments as nn.Linear's, plus ``groups`` (G, 1 <= G <= in_features; G = in_features keeps X
    exactly), ``v`` (how v is chosen: ``"first_batch_mean"`` (VeLoRA's, default),
    ``"batch_mean"``, ``"ema"`` with ``ema_decay``, ``"random"`` with ``seed``, ``"given"``),
    ``z_storage`` (``"float32"``, ``"float16"``, ``"bfloat16"``) and ``scale`` (multiplies dW).

    ``share_v=True``: data-parallel training, each rank calling forward on its own share of the
    batch. The first recorded forward of a layer without v reduces the first-batch sub-token sum
    over ``process_group`` (None: torch.distributed's default group, taken at that forward; none
    when torch.distributed is not initialised, i.e. one process) through the library's
    share_first_batch_v, so every rank holds the same v, the one a single process would take
    from the ranks' batches together. That forward is a collective: every rank of the group
    runs it. See velora.torch.share_v to set it on a whole model.

    Buffers: ``v`` (s floats, zero until the first recorded forward) and ``velora_state`` (uint8,
    the compressor's whole state); both go into state_dict() and load_state_dict() restores the
    compressor bit for bit. Set v with ``set_v`` (writing the buffer in place is not seen).
    A record is made only when a weight gradient can be asked for (grad mode on, weight requiring
    grad): evaluation under torch.no_grad() neither records nor moves v. Parameters are float32
    on the CPU; inputs float32, float16 or bfloat16 (float64 raises ValueError).
    """

    def __init__(self, in_features, out_features, bias=True, groups=32, v="first_batch_mean", ema_decay=0.9, seed=0,
                 z_storage="float32", scale=1.0, share_v=False, process_group=None, device=None, dtype=None):
        super().__init__()
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(f"velora.torch.VeloraLinear: argument 'device' is {device}; velora.torch takes CPU tensors "
                             "(the CUDA backend is not wired to torch yet)")
        if dtype is not None and dtype != torch.float32:
            raise ValueError(f"velora.torch.VeloraLinear: argument 'dtype' is {dtype}; the parameters are float32")
        self.in_features = in_features
        self.out_features = out_features
        self.groups = groups
        self.v_mode = v
        self.z_storage = z_storage
        self.scale = scale
        self._core = _C.LinearCore(in_features, out_features, groups, v, ema_decay, seed, z_storage, scale)
        self.share_v = False
        self.process_group = None
        if share_v:
            self._share_v_over(process_group, "velora.torch.VeloraLinear")
        elif process_group is not None:
            raise ValueError("velora.torch.VeloraLinear: argument 'process_group' is given but share_v is False "
                             "(pass share_v=True to share v over it)")
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features))
        else:
            self.register_parameter("bias", None)
        self.register_buffer("v", self._core.v())
        self.register_buffer("velora_state", self._core.save_state())
        self._published = self._core.v_updates()
        self.last_status = "ok"
        self.reset_parameters()

    @classmethod
    def from_linear(cls, linear, **options):
        """A VeloraLinear that shares ``linear``'s weight and bias Parameters (the same objects:
        an optimizer built on them keeps working)."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"velora.torch.VeloraLinear.from_linear: argument 'linear' is a {type(linear).__name__}, not an nn.Linear")
        require_cpu(linear.weight, "velora.torch.VeloraLinear.from_linear", "linear.weight")
        if linear.weight.dtype != torch.float32:
            raise ValueError(f"velora.torch.VeloraLinear.from_linear: the weight has dtype {linear.weight.dtype}; the parameters must be float32")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, **options)
        layer.weight = linear.weight
        if linear.bias is not None:
            layer.bias = linear.bias
        return layer

    def reset_parameters(self):
        """nn.Linear's initialisation (Kaiming-uniform weight, uniform bias in ±1/√D)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x):
        require_input_dtype(x, _FORWARD)
        require_cpu(x, _FORWARD, "x")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"{_FORWARD}: argument 'x' has shape {list(x.shape)}; it must be [..., {self.in_features}]")
        if self.weight.dtype != torch.float32:
            raise ValueError(f"{_FORWARD}: the weight has dtype {self.weight.dtype}; VeloraLinear keeps float32 parameters")
        record = torch.is_grad_enabled() and self.weight.requires_grad
        return _VeloraLinearFunction.apply(x, self.weight, self.bias, self, record)

    def set_v(self, v):
        """Sets v (normalised, as the library's compressor::set_v); the buffers follow."""
        self._core.set_v(torch.as_tensor(v, dtype=torch.float32))
        self._publish()

    @property
    def v_initialised(self):
        return self._core.initialised()

    @property
    def subtoken_size(self):
        return self._core.subtoken_size

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"groups={self.groups}, v={self.v_mode}, z_storage={self.z_storage}" + (", share_v=True" if self.share_v else ""))

    # ---------------------------------------------------------------- internals
    def _check_shareable(self, process_group, function):
        check_shareable(function, self.v_mode, process_group)

    def _share_v_over(self, process_group, function):
        self._check_shareable(process_group, function)
        self.share_v = True
        self.process_group = process_group

    def _compress(self, x2d):
        # x2d is a view of the input when its rows are evenly spaced (reshape of a contiguous
        # tensor); the library reads it in place.
        if not x2d.is_contiguous() and x2d.stride(-1) != 1:
            x2d = x2d.contiguous()
        shared = "ok"
        if self.share_v and self.v_mode == "first_batch_mean" and not self._core.initialised():
            group = group_for_forward(self.process_group)
            if group is not None:
                shared = self._core.share_first_batch_v(x2d, group)
                if shared in ("non_finite_input", "overflow"):
                    # Every rank has this status and no v: no record, a NaN weight gradient on
                    # every rank (the step is skipped everywhere); the next batch shares again.
                    self.last_status = shared
                    return shared, None, None
        status, z, v = self._core.compress(x2d)
        if shared == "degenerate_input" and status == "ok" and self._core.initialised():
            status = shared   # the fallback v, taken for the ranks' batches together: compress's report of such a batch
        self.last_status = status
        if self._core.v_updates() != self._published:
            self._publish()
        return status, z, v

    def _publish(self):
        with torch.no_grad():
            self.v.copy_(self._core.v())
            state = self._core.save_state()
            if state.shape == self.velora_state.shape and self.velora_state.dtype == torch.uint8:
                self.velora_state.copy_(state)
            else:
                self.velora_state = state
        self._published = self._core.v_updates()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "velora_state"
        if key in state_dict:
            # The compressor checks the state first (ValueError naming the field, nothing changed).
            self._core.load_state(state_dict[key].to(torch.uint8))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._published = self._core.v_updates()
        with torch.no_grad():
            self.v.copy_(self._core.v())
