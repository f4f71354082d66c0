"""One rank of test_distributed.py's shared-v test: VeloraLinear layers with share_v=True over
Gloo, every rank forwarding its own share of each batch. Saves what the test compares with one
process over the whole batches. Run as: python _data_parallel_shared_v_worker.py RANK WORLD
RENDEZVOUS_FILE OUT_FILE."""
import copy
import math
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import velora.torch as vt
from _data_parallel_model import batches, build_velora, integer_batch, join, optimizer_for, params, share_of, train, STEPS

CUT = 3
DDP_STEPS = 2


def recorded_forward(layer, x):
    """A forward that records (grad mode on, the weight requiring grad), as training runs it."""
    with torch.enable_grad():
        return layer(x)


def checkpoint_by_one_rank(rank, world, folder, data):
    """share_v=True with AdaRankGradAdamW: v after the first step, the module state after CUT
    steps (written by rank 0 alone), the run continued, and the run resumed from rank 0's file."""
    model = build_velora(share_v=True)
    opt = optimizer_for(model, process_group=dist.group.WORLD)
    train(model, opt, data[:1], rank, world)
    first_v = [model[0].v.clone(), model[2].v.clone()]
    train(model, opt, data[1:CUT], rank, world)
    module_state = {k: t.clone() for k, t in model.state_dict().items()}
    path = os.path.join(folder, "checkpoint.pt")
    if rank == 0:
        torch.save({"model": module_state, "optimizer": copy.deepcopy(opt.state_dict())}, path)
    dist.barrier()
    train(model, opt, data[CUT:], rank, world)
    uninterrupted = params(model)

    model = build_velora(share_v=True)
    opt = optimizer_for(model, process_group=dist.group.WORLD)
    checkpoint = torch.load(path)
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optimizer"])
    train(model, opt, data[CUT:], rank, world)
    return {"first_v": first_v, "module_state": module_state, "uninterrupted": uninterrupted, "resumed": params(model)}


def ddp_sgd(rank, world, data, shared):
    """DistributedDataParallel with torch.optim.SGD (DDP averages the gradients), v shared by
    velora.torch.share_v or each rank's own."""
    model = build_velora()
    names = vt.share_v(model) if shared else []
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for x, y in data[:DDP_STEPS]:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(ddp(share_of(x, rank, world)), share_of(y, rank, world)).backward()
        opt.step()
    return {"names": names, "params": params(model), "v": [model[0]._core.v(), model[2]._core.v()]}


def edge_batches(rank, world):
    """Integer data (exact sums): the shared v and state of a layer after one recorded forward of
    this rank's share, for an ordinary batch, a batch whose ranks' sums cancel, a batch with a NaN
    on the last rank (then an ordinary one), and a batch of which this rank holds no row."""
    out = {}
    layer = vt.VeloraLinear(16, 4, groups=4, share_v=True)
    recorded_forward(layer, share_of(integer_batch(16, 5), rank, world))
    out["exact"] = (layer.velora_state.clone(), layer.last_status)

    # Rank r holds (-1)^r · A: the ranks' sum is zero although each rank's own is not.
    layer = vt.VeloraLinear(16, 4, groups=4, share_v=True)
    recorded_forward(layer, integer_batch(8, 6) * (1 if rank % 2 == 0 else -1))
    out["cancelling"] = (layer.velora_state.clone(), layer.last_status)

    layer = vt.VeloraLinear(16, 4, groups=4, share_v=True)
    x = share_of(integer_batch(16, 7), rank, world).clone()
    if rank == world - 1:
        x[1, 3] = math.nan
    recorded_forward(layer, x).sum().backward()
    out["nan"] = (layer.last_status, layer.v_initialised, bool(torch.isnan(layer.weight.grad).all()))
    recorded_forward(layer, share_of(integer_batch(16, 5), rank, world))
    out["after_nan"] = (layer.velora_state.clone(), layer.last_status)

    layer = vt.VeloraLinear(16, 4, groups=4, share_v=True)
    x = integer_batch(8, 8)
    recorded_forward(layer, x if rank == world - 1 else x[:0])
    out["empty_share"] = (layer.velora_state.clone(), layer.last_status)
    return out


def groups(rank, world):
    """A group of rank 0 alone: on rank 0 a layer shares over it (a group of one: its own batch's
    v); on the others it is not a group they can use."""
    sub = dist.new_group([0])   # every rank calls new_group
    x = share_of(integer_batch(16, 5), rank, world)
    if rank == 0:
        layer = vt.VeloraLinear(16, 4, groups=4, share_v=True, process_group=sub)
        recorded_forward(layer, x)
        return {"group_of_one": layer.velora_state.clone()}
    try:
        vt.VeloraLinear(16, 4, groups=4, share_v=True, process_group=sub)
    except ValueError as e:
        return {"non_member": str(e)}
    return {"non_member": None}


def main():
    rank, world, out = join(sys.argv)
    data = batches(STEPS)
    result = {"checkpoint": checkpoint_by_one_rank(rank, world, os.path.dirname(out), data),
              "ddp_shared": ddp_sgd(rank, world, data, shared=True),
              "ddp_own": ddp_sgd(rank, world, data, shared=False),
              "edge": edge_batches(rank, world),
              "groups": groups(rank, world)}
    torch.save(result, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
