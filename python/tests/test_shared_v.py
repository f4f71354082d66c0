"""share_v in one process (torch.distributed not initialised): the layers' v and state as
without it, and the argument errors. The two-rank behaviour is test_distributed.py's."""
import pytest
import torch
from torch import nn

import velora.torch as vt


def test_one_process_is_unchanged_by_share_v():
    torch.manual_seed(3)
    x = torch.randn(12, 16)
    plain = vt.VeloraLinear(16, 8, groups=4)
    shared = vt.VeloraLinear(16, 8, groups=4, share_v=True)
    shared.load_state_dict(plain.state_dict())
    for layer in (plain, shared):
        layer(x).sum().backward()
    assert shared.share_v and not plain.share_v and shared.process_group is None
    assert torch.equal(shared.velora_state, plain.velora_state) and torch.equal(shared.v, plain.v)
    assert torch.equal(shared.weight.grad, plain.weight.grad)
    assert "share_v=True" in repr(shared) and "share_v" not in repr(plain)


def test_share_v_sets_every_velora_layer_of_a_model():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    vt.replace_linear(model, ["0"], groups=4)
    model.add_module("lora", vt.VeloraLoRALinear(nn.Linear(8, 8), r=2, groups=2))
    assert vt.share_v(model) == ["0", "lora.lora_A"]
    assert model[0].share_v and model.lora.lora_A.share_v
    # replace_linear and VeloraLoRALinear pass the option on.
    model = nn.Sequential(nn.Linear(16, 16))
    vt.replace_linear(model, ["0"], groups=4, share_v=True)
    assert model[0].share_v
    assert vt.VeloraLoRALinear(nn.Linear(8, 8), r=2, groups=2, share_v=True).lora_A.share_v


def test_share_v_errors():
    for mode in ("batch_mean", "ema"):
        with pytest.raises(ValueError, match=f"velora.torch.VeloraLinear: argument 'v' is '{mode}'; a v shared by the ranks needs"):
            vt.VeloraLinear(16, 8, groups=4, v=mode, share_v=True)
    for mode in ("random", "given"):   # the same on every rank already: accepted, nothing to share
        assert vt.VeloraLinear(16, 8, groups=4, v=mode, share_v=True).share_v
    with pytest.raises(ValueError, match="argument 'process_group' is a str, not a torch.distributed ProcessGroup"):
        vt.VeloraLinear(16, 8, groups=4, share_v=True, process_group="world")
    with pytest.raises(ValueError, match="argument 'process_group' is given but share_v is False"):
        vt.VeloraLinear(16, 8, groups=4, process_group=object())
    with pytest.raises(ValueError, match=r"velora.torch.share_v: argument 'module' \(Sequential\) holds no VeloraLinear"):
        vt.share_v(nn.Sequential(nn.Linear(4, 4)))
    # A model with one layer that cannot share: refused naming it, no layer changed.
    model = nn.Sequential(vt.VeloraLinear(16, 8, groups=4), vt.VeloraLinear(8, 8, groups=2, v="ema"))
    with pytest.raises(ValueError, match=r"velora.torch.share_v \(layer '1'\): argument 'v' is 'ema'"):
        vt.share_v(model)
    assert not model[0].share_v and not model[1].share_v
