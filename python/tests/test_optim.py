"""AdaRankGradAdamW against torch.optim.AdamW, its state_dict round trip, schedulers and errors."""
import copy

import pytest
import torch
from torch import nn

import velora
import velora.torch as vt


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4))


def _train(model, opt, steps, seed=1, scheduler=None):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 16, generator=g)
        opt.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def _max_rel(a, b):
    return max(((p - q).abs().max() / q.abs().max()).item() for p, q in zip(a.parameters(), b.parameters()))


def test_dense_groups_match_torch_adamw():
    ref, mine = _model(), _model()
    kw = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.1)
    opt_ref = torch.optim.AdamW(ref.parameters(), **kw)
    opt = vt.AdaRankGradAdamW(mine.parameters(), convention="torch", **kw)
    s_ref = torch.optim.lr_scheduler.StepLR(opt_ref, step_size=4, gamma=0.5)
    s = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    _train(ref, opt_ref, 12, scheduler=s_ref)
    _train(mine, opt, 12, scheduler=s)
    assert opt.param_groups[0]["lr"] == opt_ref.param_groups[0]["lr"] == 1e-2 * 0.5 ** 3
    assert _max_rel(mine, ref) <= 1e-6
    assert all(not opt.layer_state(p)["low_rank"] for p in mine.parameters())


def test_galore_keys_make_low_rank_groups():
    model = _model()
    weights = [model[0].weight, model[2].weight]
    rest = [model[0].bias, model[2].bias]
    opt = vt.AdaRankGradAdamW([{"params": rest}, {"params": weights, "rank": 2, "update_proj_gap": 3, "scale": 0.25, "proj_type": "std"}], lr=1e-2)
    _train(model, opt, 7)
    info = opt.layer_state(model[0].weight)
    assert info["low_rank"] and info["rank"] == 2 and info["refreshes"] == 3   # steps 1, 4 and 7
    assert not opt.layer_state(model[0].bias)["low_rank"]
    held, adamw = opt.state_bytes()
    assert held < adamw


def test_basis_and_set_basis():
    model = _model()
    w = model[0].weight   # 12 x 16: the left side (len 12)
    opt = vt.AdaRankGradAdamW([{"params": [model[0].bias, model[2].bias, model[2].weight]}, {"params": [w], "rank": 3, "update_proj_gap": 100}], lr=1e-2)
    q, _ = torch.linalg.qr(torch.randn(12, 3, generator=torch.Generator().manual_seed(2)))
    given = q.t().contiguous()
    # before the first step: the groups are registered, the first step keeps this basis
    assert opt.set_basis(w, given) == "ok"
    w0 = w.detach().clone()
    _train(model, opt, 2)
    info = opt.layer_state(w)
    assert info["side"] == "left" and info["rank"] == 3 and info["refreshes"] == 1
    assert torch.equal(opt.basis(w), given)
    moved = w.detach() - w0   # in the given subspace: (I - QQᵀ)·(W - W0) = 0
    assert (moved - q @ (q.t() @ moved)).abs().max() <= 1e-5 * moved.abs().max()   # float rounding of W0 + ΔW
    with pytest.raises(ValueError, match="optimised densely"):
        opt.basis(model[0].bias)
    with pytest.raises(ValueError, match="orthonormal"):
        opt.set_basis(w, 2 * given)
    with pytest.raises(ValueError, match="dtype"):
        opt.set_basis(w, given.double())
    assert torch.equal(opt.basis(w), given)   # nothing changed


def test_state_dict_round_trip_is_bit_identical():
    model = _model()
    opt = vt.AdaRankGradAdamW(model.parameters(), lr=1e-2, kind="auto", adaptive_rank=(0.05, 1, 4))
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    _train(model, opt, 5, scheduler=sched)
    # a checkpoint: model, optimizer and scheduler (the scheduler's position is its own state_dict)
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})

    resumed = _model(seed=9)
    resumed.load_state_dict(ckpt["model"])
    opt2 = vt.AdaRankGradAdamW(resumed.parameters(), lr=0.5, kind="auto", adaptive_rank=(0.05, 1, 4))
    sched2 = torch.optim.lr_scheduler.ExponentialLR(opt2, gamma=0.9)
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    again = opt2.state_dict()
    assert torch.equal(again["velora"], ckpt["opt"]["velora"])
    assert again["param_groups"] == ckpt["opt"]["param_groups"]
    _train(model, opt, 4, seed=2, scheduler=sched)
    _train(resumed, opt2, 4, seed=2, scheduler=sched2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))
    assert torch.equal(opt.state_dict()["velora"], opt2.state_dict()["velora"])


def test_load_state_dict_refuses_another_model():
    opt = vt.AdaRankGradAdamW(_model().parameters(), lr=1e-2)
    other = vt.AdaRankGradAdamW(nn.Linear(3, 3).parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="param group 0 has 4 parameters in the archive but 2 here"):
        other.load_state_dict(opt.state_dict())


def test_zero_grad_set_to_none():
    model = _model()
    opt = vt.AdaRankGradAdamW(model.parameters())
    model(torch.randn(2, 16)).sum().backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())


def test_non_finite_gradient_skips_or_raises():
    model = _model()
    opt = vt.AdaRankGradAdamW(model.parameters(), lr=1e-2)
    _train(model, opt, 1)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(2, 16)).sum().backward()
    model[2].bias.grad[0] = float("inf")
    opt.step()
    assert opt.last_step.skipped and opt.last_step.status == "non_finite_input"
    assert opt.last_step.events == [(0, 3, "non_finite_input")] and opt.skipped_steps == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    strict = vt.AdaRankGradAdamW(model.parameters(), lr=1e-2, nonfinite="raise")
    with pytest.raises(velora.NumericalError) as info:
        strict.step()
    assert info.value.status == "non_finite_input" and isinstance(info.value, ArithmeticError)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_option_errors_are_value_errors_with_the_library_message():
    model = _model()
    with pytest.raises(ValueError, match="option 'proj_type' is 'full'"):
        vt.AdaRankGradAdamW([{"params": model.parameters(), "rank": 2, "proj_type": "full"}])
    with pytest.raises(ValueError, match="correct_bias"):
        vt.AdaRankGradAdamW(model.parameters(), correct_bias=False)
    with pytest.raises(ValueError, match="CPU tensors"):
        vt.AdaRankGradAdamW([nn.Parameter(torch.empty(3, 3, device="meta"))])
    with pytest.raises(ValueError, match="param group 0"):
        vt.AdaRankGradAdamW(model.parameters(), betas=(1.5, 0.999))


def test_beta_and_weight_decay_schedules_match_torch_adamw():
    ref, mine = _model(), _model()
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = vt.AdaRankGradAdamW(mine.parameters(), lr=1e-2, eps=1e-8, weight_decay=1e-2, convention="torch")
    g = torch.Generator().manual_seed(1)
    for t in range(10):
        for o in (opt, opt_ref):
            o.param_groups[0]["betas"] = (0.85 + 0.01 * t, 0.999)
            o.param_groups[0]["weight_decay"] = 0.01 * (1 + t % 3)
        x = torch.randn(8, 16, generator=g)
        for m, o in ((mine, opt), (ref, opt_ref)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    assert _max_rel(mine, ref) <= 1e-6


def test_changing_an_option_after_the_first_step():
    model = _model()
    opt = vt.AdaRankGradAdamW(model.parameters(), lr=1e-2, kind="auto")
    _train(model, opt, 1)
    opt.param_groups[0]["seed"] = 7
    with pytest.raises(ValueError, match="option seed changed after the group's first step"):
        opt.step()


def _quantised_basis_run(basis, steps=4, seed=0, **extra):
    model = _model(seed)
    w = model[0].weight   # 12 x 16: the left side (len 12), rank 3
    groups = [{"params": [model[0].bias, model[2].bias, model[2].weight]},
              {"params": [w], "rank": 3, "update_proj_gap": 2, "basis": basis, "basis_block": 32, **extra}]
    opt = vt.AdaRankGradAdamW(groups, lr=1e-2)
    _train(model, opt, steps)
    return model, opt, w


def test_quantised_basis_reaches_the_library_and_round_trips():
    _, opt_f, w_f = _quantised_basis_run("float32")
    float_bytes = opt_f.state_bytes()[0]
    for basis, row_codes in (("int8", 12), ("int4", 6)):
        model, opt, w = _quantised_basis_run(basis)
        # the basis (3 x 12 floats) is held as codes plus one float scale per row (len 12 < block 32)
        assert float_bytes - opt.state_bytes()[0] == 3 * 12 * 4 - 3 * (row_codes + 4)
        q = opt.basis(w)   # decoded: Q = code · scale, rows orthonormal within the format's error
        assert q.shape == (3, 12)
        qmax = 127 if basis == "int8" else 7
        codes = q / (q.abs().amax(dim=1, keepdim=True) / qmax)
        assert (codes - codes.round()).abs().max() <= 1e-3   # every value is on its row's grid
        assert (q @ q.t() - torch.eye(3)).abs().max() <= (0.05 if basis == "int8" else 0.5)
        assert not torch.equal(q, opt_f.basis(w_f))
        # saved with the optimizer; the resumed run is bit-identical and keeps the option
        ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
        assert ckpt["opt"]["param_groups"][1]["basis"] == basis
        resumed = _model(seed=9)
        resumed.load_state_dict(ckpt["model"])
        opt2 = vt.AdaRankGradAdamW([{"params": [resumed[0].bias, resumed[2].bias, resumed[2].weight]},
                                    {"params": [resumed[0].weight], "rank": 3, "update_proj_gap": 2, "basis": basis, "basis_block": 32}], lr=1e-2)
        opt2.load_state_dict(ckpt["opt"])
        assert torch.equal(opt2.state_dict()["velora"], ckpt["opt"]["velora"])
        _train(model, opt, 3, seed=2)
        _train(resumed, opt2, 3, seed=2)
        assert all(torch.equal(p, r) for p, r in zip(model.parameters(), resumed.parameters()))
        assert torch.equal(opt.basis(w), opt2.basis(resumed[0].weight))


def test_eight_bit_moments_option():
    _, opt_f, _ = _quantised_basis_run("float32")
    _, opt_8, _ = _quantised_basis_run("float32", state="8bit", state_block=64)
    assert opt_8.state_bytes()[0] < opt_f.state_bytes()[0]


def _dense_8bit_run(state, steps=6, threads=None, dtype=torch.float32, **extra):
    """A dense AdamW group over one 48 x 80 weight (60 blocks of 64 moments) and its bias."""
    torch.manual_seed(6)
    model = nn.Linear(80, 48).to(dtype)
    opt = vt.AdaRankGradAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, state=state, state_block=64, **extra)
    g = torch.Generator().manual_seed(7)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for _ in range(steps):
            opt.zero_grad()
            model(torch.randn(16, 80, generator=g).to(dtype)).float().pow(2).mean().backward()
            opt.step()
    finally:
        torch.set_num_threads(before)
    assert opt.last_step.status == "ok"
    return model, opt


def test_eight_bit_moments_step_like_float_ones_with_the_same_bits_at_any_thread_count():
    m_f, opt_f = _dense_8bit_run("float32")
    m_8, opt_8 = _dense_8bit_run("8bit", threads=1)
    # two moments: 1 byte per element each, plus a float absmax per block of 64 (weight: 60
    # blocks, bias: 1); float moments hold 4 bytes per element each
    n = 48 * 80 + 48
    assert opt_f.state_bytes()[0] == 2 * 4 * n
    assert opt_8.state_bytes()[0] == 2 * n + 2 * 4 * (60 + 1)
    # the quantised moments give another run, close to the float moments' one
    torch.manual_seed(6)
    moved = (m_f.weight - nn.Linear(80, 48).weight).abs().max()   # the float run's largest change
    assert not torch.equal(m_8.weight, m_f.weight)
    assert (m_8.weight - m_f.weight).abs().max() <= 0.1 * moved
    # blocks are independent: 1 and 2 threads give the same bits
    m_8b, _ = _dense_8bit_run("8bit", threads=2)
    assert all(torch.equal(p, q) for p, q in zip(m_8.parameters(), m_8b.parameters()))


def test_eight_bit_moments_round_trip_bit_identically():
    model, opt = _dense_8bit_run("8bit", steps=3)
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    assert ckpt["opt"]["param_groups"][0]["state"] == "8bit" and ckpt["opt"]["param_groups"][0]["state_block"] == 64
    resumed = nn.Linear(80, 48)
    resumed.load_state_dict(ckpt["model"])
    opt2 = vt.AdaRankGradAdamW(resumed.parameters(), lr=1e-2, weight_decay=0.1, state="8bit", state_block=64)
    opt2.load_state_dict(ckpt["opt"])
    assert torch.equal(opt2.state_dict()["velora"], ckpt["opt"]["velora"])
    g = torch.Generator().manual_seed(8)
    for m, o in ((model, opt), (resumed, opt2)):
        g.manual_seed(8)
        for _ in range(3):
            o.zero_grad()
            m(torch.randn(16, 80, generator=g)).pow(2).mean().backward()
            o.step()
    assert torch.equal(model.weight, resumed.weight) and torch.equal(model.bias, resumed.bias)
    assert torch.equal(opt.state_dict()["velora"], opt2.state_dict()["velora"])
    # the checkpoint carries the option, as torch's load_state_dict carries a group's options: an
    # optimizer built with float moments resumes with the 8-bit ones
    other = vt.AdaRankGradAdamW(nn.Linear(80, 48).parameters(), lr=1e-2, weight_decay=0.1)
    other.load_state_dict(ckpt["opt"])
    assert other.param_groups[0]["state"] == "8bit"
    assert torch.equal(other.state_dict()["velora"], ckpt["opt"]["velora"])


def test_eight_bit_moments_for_bfloat16_parameters_not_float64():
    # a bf16 parameter is stepped by the float engine, so its moments may be 8-bit too
    _, opt_f = _dense_8bit_run("float32", steps=2, dtype=torch.bfloat16)
    _, opt_8 = _dense_8bit_run("8bit", steps=2, dtype=torch.bfloat16)
    assert opt_8.state_bytes()[0] < opt_f.state_bytes()[0]
    with pytest.raises(ValueError, match="int8_blockwise needs a backend in float"):
        _dense_8bit_run("8bit", steps=1, dtype=torch.float64)


@pytest.mark.parametrize("block", [32, 96, 8192])
def test_bad_state_block_names_the_value(block):
    # 32 is a valid basis_block but below state_block's range; 96 is in the range, not a power of two
    model = _model()
    with pytest.raises(ValueError, match=f"config.state_block must be (a power of two )?in \\[64, 4096\\], got {block}$"):
        vt.AdaRankGradAdamW(model.parameters(), state="8bit", state_block=block)


def test_bad_state_and_basis_options_are_value_errors():
    model = _model()
    with pytest.raises(ValueError, match="option 'basis' is 'int2'"):
        vt.AdaRankGradAdamW([{"params": model.parameters(), "rank": 2, "basis": "int2"}])
    with pytest.raises(ValueError, match="basis_block must be a power of two in \\[32, 4096\\], got 48"):
        vt.AdaRankGradAdamW([{"params": model.parameters(), "rank": 2, "basis": "int8", "basis_block": 48}])
    with pytest.raises(ValueError, match="option 'state' is 'int4'"):
        vt.AdaRankGradAdamW([{"params": model.parameters(), "rank": 2, "state": "int4"}])
    _, opt, w = _quantised_basis_run("int8", steps=1)
    opt.param_groups[1]["basis"] = "int4"
    with pytest.raises(ValueError, match="option basis changed after the group's first step"):
        opt.step()


def _one_step_pair(rounding):
    """A bfloat16 weight and its float32 copy, each stepped once with the same gradient (the bf16
    one's gradient widened): the float step the bf16 parameter takes before rounding back."""
    torch.manual_seed(3)
    w_b = nn.Parameter(torch.randn(24, 20).to(torch.bfloat16))
    w_f = nn.Parameter(w_b.detach().float())
    g = (torch.randn(24, 3) @ torch.randn(3, 20)).to(torch.bfloat16)
    opts = dict(lr=1e-2, rank=4, update_proj_gap=10, weight_rounding=rounding)
    opt_b, opt_f = vt.AdaRankGradAdamW([{"params": [w_b], **opts}]), vt.AdaRankGradAdamW([{"params": [w_f], **opts}])
    w_b.grad, w_f.grad = g, g.float()
    opt_b.step()
    opt_f.step()
    return w_b, w_f, opt_b


def test_bfloat16_parameters_round_the_float_step():
    p_b, p_f, opt = _one_step_pair("nearest")
    assert p_b.dtype == torch.bfloat16 and opt.layer_state(p_b)["low_rank"]
    w_b, w_f = p_b.detach(), p_f.detach()
    assert torch.equal(w_b, w_f.to(torch.bfloat16))   # round-to-nearest-even, as torch converts
    s_b, s_f = (p.detach() for p in _one_step_pair("stochastic")[:2])
    assert torch.equal(s_f, w_f)
    # each element is one of the two bf16 neighbours of the float result (its bits cut to bf16,
    # or one bf16 ulp further from zero), and not always the nearest one
    cut = s_f.view(torch.int32) & -65536
    bits = s_b.float().view(torch.int32)
    assert ((bits == cut) | (bits == cut + 65536)).all()
    assert not torch.equal(s_b, w_b)
    assert torch.equal(_one_step_pair("stochastic")[0].detach(), s_b)   # the noise is a function of seed, parameter, step and element


def test_bfloat16_weight_rounding_round_trip_and_errors():
    torch.manual_seed(4)
    model = nn.Linear(16, 12).to(torch.bfloat16)
    opt = vt.AdaRankGradAdamW([{"params": [model.weight], "rank": 3, "weight_rounding": "nearest"}, {"params": [model.bias]}], lr=1e-2)
    g = torch.Generator().manual_seed(5)

    def train(m, o, steps):
        for _ in range(steps):
            o.zero_grad()
            m(torch.randn(8, 16, generator=g).to(torch.bfloat16)).float().pow(2).mean().backward()
            o.step()

    train(model, opt, 3)
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    assert ckpt["opt"]["param_groups"][0]["weight_rounding"] == "nearest"
    state = g.get_state()
    train(model, opt, 3)
    resumed = nn.Linear(16, 12).to(torch.bfloat16)
    resumed.load_state_dict(ckpt["model"])
    opt2 = vt.AdaRankGradAdamW([{"params": [resumed.weight], "rank": 3, "weight_rounding": "nearest"}, {"params": [resumed.bias]}], lr=1e-2)
    opt2.load_state_dict(ckpt["opt"])
    g.set_state(state)
    train(resumed, opt2, 3)
    assert torch.equal(model.weight, resumed.weight) and torch.equal(model.bias, resumed.bias)
    opt2.param_groups[0]["weight_rounding"] = "stochastic"
    with pytest.raises(ValueError, match="option weight_rounding changed after the group's first step"):
        opt2.step()
    with pytest.raises(ValueError, match="option 'weight_rounding' is 'up'"):
        vt.AdaRankGradAdamW([{"params": [model.weight], "rank": 3, "weight_rounding": "up"}])
    with pytest.raises(ValueError, match="must be float32, float64 or bfloat16"):
        half = nn.Parameter(torch.randn(4, 4).half())
        half.grad = torch.ones_like(half)
        vt.AdaRankGradAdamW([half]).step()
