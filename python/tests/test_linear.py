"""VeloraLinear, VeloraLoRALinear and replace_linear against torch's own modules and VeLoRA's closed form."""
import pytest
import torch
from torch import nn

import velora.torch as vt


def _pair(d, o, groups, seed=0, bias=True):
    torch.manual_seed(seed)
    ref = nn.Linear(d, o, bias=bias)
    layer = vt.VeloraLinear(d, o, bias=bias, groups=groups)
    with torch.no_grad():
        layer.weight.copy_(ref.weight)
        if bias:
            layer.bias.copy_(ref.bias)
    return ref, layer


def _run(module, x, dy):
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(dy)
    return y.detach(), x.grad, module.weight.grad, module.bias.grad if module.bias is not None else None


def test_full_groups_match_nn_linear():
    # G = D: the record keeps X exactly (s = 1, v = ±1), so dW is dYᵀX; y, dX and db are torch's products.
    d, o = 24, 10
    ref, layer = _pair(d, o, groups=d)
    x = torch.randn(3, 7, d)
    dy = torch.randn(3, 7, o)
    y0, dx0, dw0, db0 = _run(ref, x, dy)
    y1, dx1, dw1, db1 = _run(layer, x, dy)
    assert torch.equal(y0, y1)
    assert torch.equal(dx0, dx1)
    assert torch.equal(db0, db1)
    assert layer.subtoken_size == 1 and layer.v.abs().item() == 1.0
    # dW: the library's GEMM against torch's (different summation order): rounding only.
    assert torch.allclose(dw0, dw1, rtol=1e-5, atol=1e-6), (dw0 - dw1).abs().max()


def test_closed_form_below_full_groups():
    # G < D with D not a multiple of G (the last group padded): dW = dYᵀ·Z·(I_G ⊗ vᵀ), Z = X·(I_G ⊗ v)ᵀ.
    d, o, g = 10, 6, 4
    s = -(-d // g)
    _, layer = _pair(d, o, groups=g, seed=1)
    x = torch.randn(9, d)
    dy = torch.randn(9, o)
    _, _, dw, _ = _run(layer, x, dy)
    v = layer.v.double()
    assert v.numel() == s and abs(v.norm().item() - 1.0) < 1e-6
    xp = torch.zeros(9, g * s, dtype=torch.float64)
    xp[:, :d] = x.double()
    z = xp.reshape(9, g, s) @ v                                   # [T, G]
    expected = ((dy.double().t() @ z)[:, :, None] * v[None, None, :]).reshape(o, g * s)[:, :d]
    assert torch.allclose(dw.double(), expected, rtol=1e-5, atol=1e-6), (dw.double() - expected).abs().max()
    # v is VeLoRA's first-batch mean: the normalised mean of the first batch's sub-tokens.
    mean = xp.reshape(-1, s).mean(0)
    assert torch.allclose(v.abs(), (mean / mean.norm()).abs(), atol=1e-6)


def test_half_input_and_no_grad():
    _, layer = _pair(16, 4, groups=4)
    with torch.no_grad():
        layer(torch.randn(3, 16))
    assert not layer.v_initialised and torch.count_nonzero(layer.v) == 0   # evaluation neither records nor moves v
    x = torch.randn(5, 16, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and layer.weight.grad.dtype == torch.float32
    assert layer.v_initialised


def test_float64_input_refused():
    _, layer = _pair(8, 4, groups=2)
    with pytest.raises(ValueError, match=r"VeloraLinear.forward: argument 'x' has dtype torch.float64"):
        layer(torch.randn(2, 8, dtype=torch.float64))


def test_state_dict_restores_the_compressor():
    torch.manual_seed(3)
    a = vt.VeloraLinear(12, 5, groups=3, v="ema", ema_decay=0.5)
    for _ in range(3):
        a(torch.randn(4, 12)).sum().backward()
    b = vt.VeloraLinear(12, 5, groups=3, v="ema", ema_decay=0.5)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.v, b.v) and torch.equal(a.velora_state, b.velora_state)
    x, dy = torch.randn(6, 12), torch.randn(6, 5)
    a.zero_grad(), b.zero_grad()
    a(x).backward(dy)
    b(x).backward(dy)
    assert torch.equal(a.weight.grad, b.weight.grad) and torch.equal(a.v, b.v)
    other = vt.VeloraLinear(12, 5, groups=4)
    with pytest.raises(ValueError, match="groups G"):
        other.load_state_dict(a.state_dict())


def test_non_finite_input_gives_nan_weight_grad():
    _, layer = _pair(8, 3, groups=2)
    layer(torch.randn(2, 8)).sum().backward()        # v fixed by a finite batch
    layer.zero_grad()
    x = torch.randn(2, 8)
    x[1, 3] = float("nan")
    layer(x).sum().backward()
    assert layer.last_status == "non_finite_input"
    assert torch.isnan(layer.weight.grad).all()


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.v_proj = nn.Linear(8, 8)
        self.out = nn.Linear(8, 8)

    def forward(self, x):
        return self.out(torch.relu(self.q_proj(x) + self.v_proj(x)))


def test_replace_linear_shares_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(_Block(), _Block())
    before = {n: p for n, p in model.named_parameters()}
    x = torch.randn(3, 8)
    y0 = model(x).detach()
    replaced = vt.replace_linear(model, target_modules=["q_proj", "v_proj"], groups=8)
    assert replaced == ["0.q_proj", "0.v_proj", "1.q_proj", "1.v_proj"]
    assert isinstance(model[0].q_proj, vt.VeloraLinear) and type(model[0].out) is nn.Linear
    after = dict(model.named_parameters())
    assert all(before[n] is after[n] for n in before)   # an optimizer built before keeps working
    assert torch.equal(model(x), y0)
    assert vt.replace_linear(nn.Sequential(_Block()), target_modules=r".*\.out", groups=4) == ["0.out"]
    with pytest.raises(ValueError, match="no nn.Linear of the model matches"):
        vt.replace_linear(model, target_modules=["k_proj"])


def test_lora_matches_plain_lora_at_full_groups():
    torch.manual_seed(5)
    base = nn.Linear(12, 6)
    lora = vt.VeloraLoRALinear(base, r=4, lora_alpha=8, groups=12)
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    a = lora.lora_A.weight.detach().clone().requires_grad_(True)
    b = lora.lora_B.weight.detach().clone().requires_grad_(True)
    x = torch.randn(5, 12)
    dy = torch.randn(5, 6)
    y_ref = nn.functional.linear(x, base.weight, base.bias) + 2.0 * (x @ a.t()) @ b.t()
    y_ref.backward(dy)
    y = lora(x)
    y.backward(dy)
    assert torch.allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    assert torch.allclose(lora.lora_A.weight.grad, a.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(lora.lora_B.weight.grad, b.grad, rtol=1e-5, atol=1e-6)
    assert base.weight.grad is None and [n for n, p in lora.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]


def test_layer_errors_carry_the_library_message():
    with pytest.raises(ValueError, match=r"velora.torch.VeloraLinear: argument 'groups' must satisfy 1 <= groups <= in_features, got groups = 9 with in_features = 8"):
        vt.VeloraLinear(8, 4, groups=9)
    with pytest.raises(ValueError, match="z_storage"):
        vt.VeloraLinear(8, 4, groups=2, z_storage="float64")
    with pytest.raises(ValueError, match="CPU tensors"):
        vt.VeloraLinear(8, 4, device="meta")
