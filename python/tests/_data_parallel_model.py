"""The model, data and optimizer shared by test_distributed.py and its worker processes."""
import torch
from torch import nn

import velora.torch as vt

STEPS = 6


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8))


def batches(steps, rows=16):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(rows, 16, generator=g), torch.randn(rows, 8, generator=g)) for _ in range(steps)]


def optimizer_for(model, process_group=None):
    weights = [model[0].weight, model[2].weight]
    biases = [model[0].bias, model[2].bias]
    return vt.AdaRankGradAdamW([{"params": biases},
                                {"params": weights, "kind": "low_rank", "adaptive_rank": (0.1, 1, 4), "refresh": ("converged", 0.5, 2, 3)}],
                               lr=1e-2, process_group=process_group)
