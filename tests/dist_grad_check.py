"""Gradients of one training step on a fixed batch of 4 equal-size images.

Run alone, it uses the whole batch; under `torchrun --nproc_per_node 2` each process takes half
and DistributedDataParallel averages the gradients. Both must give the same gradients: the loss
is normalised by the number of boxes averaged over processes. Writes {name: grad} to --out.
"""
import argparse

import torch

import util.misc as utils
from main import get_args_parser
from models import build_model

BATCH = 4
IMAGE_HW = (96, 128)


def fixed_batch():
    gen = torch.Generator().manual_seed(0)
    images = [torch.randn(3, *IMAGE_HW, generator=gen) for _ in range(BATCH)]
    targets = []
    for i in range(BATCH):
        n = 1 + i % 3
        centres = torch.rand(n, 2, generator=gen) * 0.5 + 0.25
        sizes = torch.rand(n, 2, generator=gen) * 0.3 + 0.1
        targets.append({"labels": torch.randint(1, 4, (n,), generator=gen), "boxes": torch.cat([centres, sizes], 1)})
    return images, targets


def main():
    parser = argparse.ArgumentParser(parents=[get_args_parser()])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    utils.init_distributed_mode(args)
    torch.manual_seed(0)  # the same initial weights on every process
    model, criterion, _ = build_model(args)
    images, targets = fixed_batch()
    rank, world = utils.get_rank(), utils.get_world_size()
    share = BATCH // world
    images, targets = images[rank * share:(rank + 1) * share], targets[rank * share:(rank + 1) * share]
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    model.train()
    losses = criterion(model(images), targets)
    sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict).backward()
    if utils.is_main_process():
        named = model.module.named_parameters() if args.distributed else model.named_parameters()
        torch.save({n: p.grad for n, p in named if p.grad is not None}, args.out)


if __name__ == "__main__":
    main()
