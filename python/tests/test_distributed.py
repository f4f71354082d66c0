"""Two processes over Gloo, each with half of every batch, against one process with the whole batch."""
import os
import subprocess
import sys

import torch
import torch.distributed as dist
import pytest

import velora.torch as vt
from _data_parallel_model import batches, build, build_velora, integer_batch, optimizer_for, STEPS

HERE = os.path.dirname(os.path.abspath(__file__))
GLOO = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with Gloo is not available")


def run_workers(script, tmp_path, world=2):
    """Runs `script` as `world` Gloo ranks (RANK WORLD RENDEZVOUS OUT) and returns what each saved."""
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, script), str(r), str(world), str(tmp_path / "rendezvous"),
                               str(tmp_path / f"rank{r}.pt")], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(world)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out.decode()
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


@GLOO
def test_two_gloo_ranks_match_one_process_with_the_whole_batch(tmp_path):
    ranks = run_workers("_data_parallel_worker.py", tmp_path)

    model = build()
    opt = optimizer_for(model)
    for x, y in batches(STEPS):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    single = [p.detach() for p in model.parameters()]

    # Every rank ends with the same bits (the library's data-parallel guarantee) ...
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["params"], ranks[1]["params"]))
    assert ranks[0]["info"]["low_rank"] and ranks[0]["info"]["refreshes"] >= 2
    assert ranks[0]["info"]["rank"] == opt.layer_state(model[0].weight)["rank"]
    # ... and the mean of the two halves' gradients is the whole batch's: the same training to rounding.
    for a, b in zip(ranks[0]["params"], single):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()


@GLOO
def test_data_parallel_checkpoint_with_velora_linear(tmp_path):
    """docs/python.md's recipe without share_v: each rank saves its module state_dict (its
    VeloraLinear v and velora_state buffers) and the optimizer's state_dict; loading both
    resumes bit-identically."""
    ranks = run_workers("_data_parallel_checkpoint_worker.py", tmp_path)
    equal = lambda xs, ys: all(torch.equal(a, b) for a, b in zip(xs, ys))
    for r in ranks:
        assert equal(r["resumed"], r["uninterrupted"])            # bit-identical resume
        assert not equal(r["without_compressor"], r["uninterrupted"])   # a new v: another run
    assert equal(ranks[0]["uninterrupted"], ranks[1]["uninterrupted"])   # every rank the same bits
    assert equal(ranks[0]["resumed"], ranks[1]["resumed"])
    assert torch.equal(ranks[0]["velora_state"], ranks[1]["velora_state"])   # one optimizer state for all ranks
    assert not torch.equal(ranks[0]["v"], ranks[1]["v"])   # but each rank's v is its own share's


def one_process_state(x):
    """velora_state of a VeloraLinear(16, 4, groups=4) after one recorded forward of x, and its last_status."""
    layer = vt.VeloraLinear(16, 4, groups=4)
    layer(x)
    return layer.velora_state, layer.last_status


@GLOO
def test_shared_v_is_the_whole_batch_v_on_every_rank(tmp_path):
    """share_v=True over two Gloo ranks, each forwarding half of every batch: after the first step
    every rank holds the same v, that of one process with the whole batch; the module state_dict
    is the same on both ranks, so one rank's checkpoint resumes both bit-identically; training
    matches one process. Under DDP + SGD, share_v gives one process's training, each rank's own
    v does not. Edge batches and a group a rank is not in."""
    world = 2
    ranks = run_workers("_data_parallel_shared_v_worker.py", tmp_path, world)
    equal = lambda xs, ys: len(xs) == len(ys) and all(torch.equal(a, b) for a, b in zip(xs, ys))
    data = batches(STEPS)

    # One process, the whole batches: v after the first step, and the whole run.
    model = build_velora()
    opt = optimizer_for(model)
    for step, (x, y) in enumerate(data):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if step == 0:
            single_v = [model[0].v.clone(), model[2].v.clone()]
    single = [p.detach() for p in model.parameters()]

    c0, c1 = ranks[0]["checkpoint"], ranks[1]["checkpoint"]
    assert equal(c0["first_v"], c1["first_v"])   # bit-identical on the ranks after the first step
    for shared, whole in zip(c0["first_v"], single_v):
        # The ranks' sums added, against one sum over the whole batch: float32 summation order only.
        assert shared.abs().sum() > 0 and torch.allclose(shared, whole, rtol=0, atol=1e-6), (shared - whole).abs().max()
    assert c0["module_state"].keys() == c1["module_state"].keys()
    assert all(torch.equal(c0["module_state"][k], c1["module_state"][k]) for k in c0["module_state"])
    for c in (c0, c1):
        assert equal(c["resumed"], c["uninterrupted"])   # both ranks resumed from rank 0's file
    assert equal(c0["uninterrupted"], c1["uninterrupted"])
    for a, b in zip(c0["uninterrupted"], single):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()

    # DDP (gradients averaged by DDP, torch.optim.SGD) against one process with the whole batches.
    model = build_velora()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in data[:2]:
        sgd.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        sgd.step()
    single = [p.detach() for p in model.parameters()]
    assert ranks[0]["ddp_shared"]["names"] == ["0", "2"]
    assert equal(ranks[0]["ddp_shared"]["v"], ranks[1]["ddp_shared"]["v"])
    for a, b in zip(ranks[0]["ddp_shared"]["params"], single):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()
    assert not equal(ranks[0]["ddp_own"]["v"], ranks[1]["ddp_own"]["v"])
    assert not all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(ranks[0]["ddp_own"]["params"], single))

    # Integer data (exact sums in any order): the state is one process's bit for bit.
    e0, e1 = ranks[0]["edge"], ranks[1]["edge"]
    whole = integer_batch(16, 5)
    for key in ("exact", "after_nan"):
        assert torch.equal(e0[key][0], one_process_state(whole)[0]) and torch.equal(e1[key][0], e0[key][0]), key
        assert e0[key][1] == e1[key][1] == "ok"
    a = integer_batch(8, 6)
    state, status = one_process_state(torch.cat([a, -a]))   # the whole batch's sum is zero: the fallback v
    assert status == "degenerate_input"
    assert torch.equal(e0["cancelling"][0], state) and torch.equal(e1["cancelling"][0], state)
    assert e0["cancelling"][1] == e1["cancelling"][1] == "degenerate_input"
    # A NaN on rank 1: both ranks report it, take no v and give a NaN weight gradient (the step is skipped everywhere).
    assert e0["nan"] == e1["nan"] == ("non_finite_input", False, True)
    state, _ = one_process_state(integer_batch(8, 8))   # rank 0 holds no row of this batch
    assert torch.equal(e0["empty_share"][0], state) and torch.equal(e1["empty_share"][0], state)

    # A group of rank 0 alone: rank 0's v is its own share's; rank 1 is refused with the reason.
    assert torch.equal(ranks[0]["groups"]["group_of_one"], one_process_state(integer_batch(16, 5)[:8])[0])
    assert "velora.torch.VeloraLinear" in ranks[1]["groups"]["non_member"]
    assert "not a member" in ranks[1]["groups"]["non_member"]
