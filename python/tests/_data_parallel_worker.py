"""One rank of test_distributed.py: trains on its half of every batch over Gloo and saves its
parameters. Run as: python _data_parallel_worker.py RANK WORLD RENDEZVOUS_FILE OUT_FILE."""
import sys

import torch
import torch.distributed as dist

from _data_parallel_model import batches, build, optimizer_for, STEPS


def main():
    rank, world, rendezvous, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    model = build()
    opt = optimizer_for(model, process_group=dist.group.WORLD)
    for x, y in batches(STEPS):
        share = x.shape[0] // world
        xs, ys = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(xs), ys).backward()
        opt.step()
        assert opt.last_step.status == "ok", opt.last_step
    torch.save({"params": [p.detach().clone() for p in model.parameters()], "info": opt.layer_state(model[0].weight)}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
