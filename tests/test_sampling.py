"""Training data drawn per sample: the order from (seed, epoch), each item's augmentation from
(seed, epoch, index), whichever process or data worker reads it; the global generators untouched."""
import functools
import random
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

import util.misc as utils
from datasets.coco import build
from datasets.sampling import SampleKey, TrainingSampler
from tools.make_synthetic_coco import make_synthetic_coco

SEED = 42
ITEMS = 12


@pytest.fixture(scope="module")
def train_set(module_tmp):
    root = module_tmp("sampling")
    make_synthetic_coco(out_dir=root, num_train=ITEMS, num_val=1, image_size=128, seed=0)
    # scales and crops as the training recipe draws them: the flip, the branch, the sizes, the crop
    return build("train", SimpleNamespace(coco_path=root, scales=[64, 80, 96, 112, 128], max_size=160,
                                          val_size=128, num_classes=4))


def _same(a, b) -> bool:
    (image_a, target_a), (image_b, target_b) = a, b
    return (torch.equal(image_a, image_b) and target_a.keys() == target_b.keys()
            and all(torch.equal(target_a[k], target_b[k]) for k in target_a))


def test_an_item_is_drawn_from_its_key_alone(train_set):
    key = SampleKey(3, epoch=1, seed=SEED)
    random.seed(0)
    first = train_set[key]
    random.seed(12345)  # another global state: the item does not follow it
    outer = random.getstate()
    assert _same(train_set[key], first)
    assert random.getstate() == outer  # nothing drawn from the process's own stream
    # another epoch (or seed) draws another augmentation: the sizes differ for some items
    sizes = {epoch: [tuple(train_set[SampleKey(i, epoch, SEED)][0].shape) for i in range(ITEMS)] for epoch in (1, 2)}
    assert sizes[1] != sizes[2]
    assert [tuple(train_set[SampleKey(i, 1, SEED + 1)][0].shape) for i in range(ITEMS)] != sizes[1]


def test_a_plain_index_still_draws_from_the_global_stream(train_set):
    random.seed(7)
    seeded = random.getstate()
    first = train_set[3]
    assert random.getstate() != seeded  # the transforms drew from it
    random.seed(7)
    assert _same(train_set[3], first)


def _batches(dataset, workers: int, epoch: int):
    sampler = TrainingSampler(dataset, num_replicas=1, rank=0, seed=SEED)
    sampler.set_epoch(epoch)
    loader = DataLoader(dataset, batch_sampler=BatchSampler(sampler, 2, drop_last=True), num_workers=workers,
                        collate_fn=functools.partial(utils.collate_fn, size_divisibility=1))
    return [(samples.tensors.clone(), [t["boxes"].clone() for t in targets]) for samples, targets in loader]


def test_batches_are_the_same_with_any_number_of_data_workers(train_set):
    plain, two_workers = _batches(train_set, 0, epoch=3), _batches(train_set, 2, epoch=3)
    assert len(plain) == ITEMS // 2
    for (images, boxes), (images_w, boxes_w) in zip(plain, two_workers):
        assert torch.equal(images, images_w)
        assert all(torch.equal(a, b) for a, b in zip(boxes, boxes_w))


def test_order_comes_from_seed_and_epoch_not_the_global_generator(train_set):
    def order(epoch, rank=0, replicas=1):
        sampler = TrainingSampler(train_set, num_replicas=replicas, rank=rank, seed=SEED)
        sampler.set_epoch(epoch)
        return list(sampler)

    torch.manual_seed(0)
    first = order(5)
    torch.manual_seed(1)
    assert order(5) == first and order(6) != first
    assert all(key.epoch == 5 and key.seed == SEED for key in first)
    # DistributedSampler's order, as the official multi-process runs draw it
    reference = DistributedSampler(train_set, num_replicas=1, rank=0, seed=SEED)
    reference.set_epoch(5)
    assert [key.index for key in first] == list(reference)
    # two processes split the same permutation between them
    halves = [order(5, rank, 2) for rank in (0, 1)]
    assert sorted(k.index for half in halves for k in half) == list(range(ITEMS))
