"""Training samples drawn deterministically: the order from (seed, epoch), each item's augmentation
from (seed, epoch, index).

The official code shuffles with the global torch generator (one process) or ``DistributedSampler``
(several), and each data worker augments from its own stream, seeded when the workers start. An
item's crop and flip then depend on which worker read it and on everything that worker read
before; a run resumed mid-epoch, or with another worker count, sees other images.

Here the training sampler yields ``SampleKey`` s instead of bare indices, and the dataset seeds the
augmentation of each item from its key (``CocoDetection.__getitem__``). An item is the same
whichever process or data worker reads it, after any resume, with any ``--num_workers``; the main
process's generators (dropout) draw nothing for the data.
"""
import contextlib
import math
import random
from typing import Iterator, List, NamedTuple

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler


class SampleKey(NamedTuple):
    """Which item to read, and the (seed, epoch) its augmentation is drawn for."""
    index: int
    epoch: int
    seed: int


@contextlib.contextmanager
def augmentation_draws(key: SampleKey):
    """Python's ``random`` (which every training transform draws from) seeded by the key, for the
    duration of the block; the process's own stream is put back afterwards, untouched."""
    outer = random.getstate()
    # a string seed is hashed with SHA-512: the same in every process, whatever PYTHONHASHSEED says
    random.seed(f"sam-detr/{key.seed}/{key.epoch}/{key.index}")
    try:
        yield
    finally:
        random.setstate(outer)


class TrainingSampler(DistributedSampler):
    """``DistributedSampler`` 's order (a permutation drawn from seed + epoch, padded to a multiple of
    the process count, every num_replicas-th item for this rank), as keys. Used with one process too
    (num_replicas=1, rank=0), so that the order never depends on the global generator. Call
    ``set_epoch`` before each epoch.

    ``start_at(n)`` continues an epoch of which the first n items of that order were already
    trained on (a mid-epoch checkpoint): the rest of the order, cut to a multiple of the process
    count, is dealt out as before. With the batch plan of the checkpoint (batch size, process count
    and micro-batches per step) these are exactly the batches an uninterrupted run trains on; with
    another plan the same remaining items are grouped into other batches.

    accum_steps: micro-batches per optimizer step (``MicroBatchSampler``). The order is padded as
    DistributedSampler pads it for num_replicas x accum_steps processes, the processes that the
    micro-batches stand for, so that an epoch has the items and steps of a run with that many.
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, seed: int, accum_steps: int = 1):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        virtual_processes = num_replicas * accum_steps
        self.total_size = math.ceil(len(dataset) / virtual_processes) * virtual_processes
        self.num_samples = self.total_size // num_replicas
        self.start = 0

    def start_at(self, items_done: int) -> None:
        """The next epoch iterated begins after `items_done` items of its order (0: from the start)."""
        if not 0 <= items_done < self.total_size:
            raise ValueError(f"an epoch of {self.total_size} items cannot start after item {items_done}")
        self.start = items_done

    def epoch_order(self) -> List[int]:
        """The whole epoch's order over every process, as DistributedSampler draws and pads it."""
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        padding = self.total_size - len(order)
        return order + (order * math.ceil(padding / len(order)))[:padding]

    def __iter__(self) -> Iterator[SampleKey]:
        rest = self.epoch_order()[self.start:]
        rest = rest[:len(rest) - len(rest) % self.num_replicas]  # every process the same number of items
        for index in rest[self.rank::self.num_replicas]:
            yield SampleKey(index, self.epoch, self.seed)

    def __len__(self) -> int:
        return (self.total_size - self.start) // self.num_replicas


class MicroBatchSampler(Sampler[List[SampleKey]]):
    """This process's batches, ``accum_steps`` micro-batches of ``batch_size`` per optimizer step,
    such that one step of W processes trains on exactly the batches of one step of W x accum_steps
    processes (with accum_steps 1: torch's BatchSampler with drop_last).

    Micro-batch j of process r holds what virtual process v = j * W + r would hold. With W x K
    processes, batch s of process v holds the order's items (s * B + i) * W * K + v, i < B, so a
    step trains on B * W * K consecutive items of the order whatever the plan. With v = j * W + r
    these are process r's items q = s * B * K + i * K + j of its own share (every W-th item of
    the order, as ``TrainingSampler`` deals them for W processes): the step takes the next B * K
    items of the share, and micro-batch j every K-th of them from the j-th. A process's share and
    the items of its step therefore do not depend on K (they are those of --batch_size B * K
    without accumulation); only their grouping into micro-batches does. An incomplete last step is
    dropped, as each of W x K processes would drop its incomplete last batch.
    """

    def __init__(self, sampler: TrainingSampler, batch_size: int, accum_steps: int = 1):
        self.sampler, self.batch_size, self.accum_steps = sampler, batch_size, accum_steps

    def __iter__(self) -> Iterator[List[SampleKey]]:
        keys = list(self.sampler)
        step_items = self.batch_size * self.accum_steps
        for first in range(0, len(keys) - step_items + 1, step_items):
            step = keys[first:first + step_items]
            for micro in range(self.accum_steps):
                yield step[micro::self.accum_steps]

    def __len__(self) -> int:
        """Micro-batches of one pass: accum_steps per complete step."""
        return len(self.sampler) // (self.batch_size * self.accum_steps) * self.accum_steps
