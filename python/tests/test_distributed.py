"""Two processes over Gloo, each with half of every batch, against one process with the whole batch."""
import os
import subprocess
import sys

import torch
import torch.distributed as dist
import pytest

from _data_parallel_model import batches, build, optimizer_for, STEPS

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with Gloo is not available")
def test_two_gloo_ranks_match_one_process_with_the_whole_batch(tmp_path):
    world = 2
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "_data_parallel_worker.py"), str(r), str(world), str(tmp_path / "rendezvous"),
                               str(tmp_path / f"rank{r}.pt")], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(world)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out.decode()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

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


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with Gloo is not available")
def test_data_parallel_checkpoint_with_velora_linear(tmp_path):
    """docs/python.md's recipe: each rank saves its module state_dict (its VeloraLinear v and
    velora_state buffers) and the optimizer's state_dict; loading both resumes bit-identically."""
    world = 2
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "_data_parallel_checkpoint_worker.py"), str(r), str(world),
                               str(tmp_path / "rendezvous"), str(tmp_path / f"rank{r}.pt")], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(world)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out.decode()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    equal = lambda xs, ys: all(torch.equal(a, b) for a, b in zip(xs, ys))
    for r in ranks:
        assert equal(r["resumed"], r["uninterrupted"])            # bit-identical resume
        assert not equal(r["without_compressor"], r["uninterrupted"])   # a new v: another run
    assert equal(ranks[0]["uninterrupted"], ranks[1]["uninterrupted"])   # every rank the same bits
    assert equal(ranks[0]["resumed"], ranks[1]["resumed"])
    assert torch.equal(ranks[0]["velora_state"], ranks[1]["velora_state"])   # one optimizer state for all ranks
    assert not torch.equal(ranks[0]["v"], ranks[1]["v"])   # but each rank's v is its own share's
