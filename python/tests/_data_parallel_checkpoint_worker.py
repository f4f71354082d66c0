"""One rank of test_distributed.py's checkpoint test: VeloraLinear layers trained over Gloo, a
checkpoint after CUT steps, and two resumed runs from it. Saves what the test compares.
Run as: python _data_parallel_checkpoint_worker.py RANK WORLD RENDEZVOUS_FILE OUT_FILE."""
import copy
import sys

import torch
import torch.distributed as dist

from _data_parallel_model import batches, build_velora as build, join, optimizer_for, params, train, STEPS

CUT = 3


def main():
    rank, world, out = join(sys.argv)
    data = batches(STEPS)

    model = build()
    opt = optimizer_for(model, process_group=dist.group.WORLD)
    train(model, opt, data[:CUT], rank, world)
    # The checkpoint: this rank's module state (Parameters and the compressors' v and velora_state
    # buffers, which are this rank's own: v is the mean of its own share of the first batch) and
    # the optimizer's state_dict (the same bytes on every rank).
    module_state = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state = copy.deepcopy(opt.state_dict())
    train(model, opt, data[CUT:], rank, world)
    uninterrupted = params(model)

    # Resumed as documented: fresh modules and optimizer, both states loaded.
    model = build()
    opt = optimizer_for(model, process_group=dist.group.WORLD)
    model.load_state_dict(module_state)
    opt.load_state_dict(opt_state)
    train(model, opt, data[CUT:], rank, world)
    resumed = params(model)

    # Resumed from the Parameters alone (the compressors' buffers left out): each VeloraLinear
    # takes a new v from its next batch.
    model = build()
    opt = optimizer_for(model, process_group=dist.group.WORLD)
    model.load_state_dict({k: v for k, v in module_state.items() if not k.endswith((".v", ".velora_state"))}, strict=False)
    opt.load_state_dict(opt_state)
    train(model, opt, data[CUT:], rank, world)
    without_compressor = params(model)

    torch.save({"uninterrupted": uninterrupted, "resumed": resumed, "without_compressor": without_compressor,
                "v": module_state["0.v"], "velora_state": opt_state["velora"]}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
