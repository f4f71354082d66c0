"""The models, data, optimizer and training loop shared by test_distributed.py and its worker
processes (_data_parallel_worker.py, _data_parallel_checkpoint_worker.py,
_data_parallel_shared_v_worker.py)."""
import torch
import torch.distributed as dist
from torch import nn

import velora.torch as vt

STEPS = 6


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8))


def build_velora(**options):
    """Two VeloraLinear layers at G < D; ``options`` go to both (e.g. share_v=True)."""
    torch.manual_seed(0)
    return nn.Sequential(vt.VeloraLinear(16, 24, groups=4, **options), nn.Tanh(), vt.VeloraLinear(24, 8, groups=6, **options))


def integer_batch(rows, seed, features=16):
    """Small integers: every sum of them is exact in float32, whatever its order."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 9, (rows, features), generator=g).float()


def batches(steps, rows=16):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(rows, 16, generator=g), torch.randn(rows, 8, generator=g)) for _ in range(steps)]


def optimizer_for(model, process_group=None):
    weights = [model[0].weight, model[2].weight]
    biases = [model[0].bias, model[2].bias]
    return vt.AdaRankGradAdamW([{"params": biases},
                                {"params": weights, "kind": "low_rank", "adaptive_rank": (0.1, 1, 4), "refresh": ("converged", 0.5, 2, 3)}],
                               lr=1e-2, process_group=process_group)


def join(argv):
    """A worker's start: argv is [script, RANK, WORLD, RENDEZVOUS_FILE, OUT_FILE]; joins the Gloo
    group with one thread per rank (the ranks share the test machine's cores). Returns (rank,
    world, out)."""
    rank, world, rendezvous, out = int(argv[1]), int(argv[2]), argv[3], argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    return rank, world, out


def share_of(t, rank, world):
    """This rank's contiguous share of the rows of t."""
    share = t.shape[0] // world
    return t[rank * share:(rank + 1) * share]


def train(model, opt, data, rank, world):
    """One step per batch on this rank's contiguous share of its rows; every step must be ok."""
    for x, y in data:
        xs, ys = share_of(x, rank, world), share_of(y, rank, world)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(xs), ys).backward()
        opt.step()
        assert opt.last_step.status == "ok", opt.last_step


def params(model):
    """Copies of the model's parameters, for the test to compare."""
    return [p.detach().clone() for p in model.parameters()]
