"""One rank of test_distributed.py: trains on its half of every batch over Gloo and saves its
parameters. Run as: python _data_parallel_worker.py RANK WORLD RENDEZVOUS_FILE OUT_FILE."""
import sys

import torch
import torch.distributed as dist

from _data_parallel_model import batches, build, join, optimizer_for, params, train, STEPS


def main():
    rank, world, out = join(sys.argv)
    model = build()
    opt = optimizer_for(model, process_group=dist.group.WORLD)
    train(model, opt, batches(STEPS), rank, world)
    torch.save({"params": params(model), "info": opt.layer_state(model[0].weight)}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
