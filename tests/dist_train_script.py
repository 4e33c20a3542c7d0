"""Run by torchrun in tests/test_distributed.py: train adapters on 2 ranks, save from rank 0."""

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from liedeploy import LieConfig, apply_adapters_
from liedeploy.distributed import save_adapter_distributed, wrap_for_training
from tests.dist_common import STEPS, batches, make_model


def main(strategy: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = apply_adapters_(make_model(), LieConfig(r=2, alpha=2, targets=["0", "2"]))
    wrapped = wrap_for_training(model, strategy)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for x, y in batches(STEPS):
        n = len(x) // world
        xs, ys = x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]
        loss = F.cross_entropy(wrapped(xs), ys)  # mean over the shard; DDP/FSDP average over ranks
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_adapter_distributed(model, out, name="dist")
    dist.barrier()
    dist.destroy_process_group()
    # torch 2.13's gloo backend sometimes aborts in its C++ teardown at interpreter exit
    # ("terminate called without an active exception"), after all work is done: leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
