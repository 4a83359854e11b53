"""Flat annotation store, worker memory, and the uint8-tensor training augmentation.

The reference throughout is built like the official pipeline and like this project before the
flat store: torchvision's CocoDetection holding a pycocotools COCO object, one dict per annotation.
"""
import gc
import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F
from PIL import Image

import datasets.transforms as T
from datasets.coco import CocoDetection, FlatCocoAnnotations
from tools.bench_data import OfficialStyleCocoDetection, dict_based_target
from tools.make_coco_scale import IMAGE_SIZES, write_coco_scale

TARGET_KEYS = ("boxes", "labels", "area", "iscrowd", "image_id", "orig_size", "size")
SMALL_SCALES = dict(scales=[96, 128, 160], max_size=267, val_size=160)
SEED = 7
DRAWS = 3
MEMORY_IMAGES, MEMORY_OBJECTS = 3000, 30_000
MEMORY_ITEMS = 460
MEMORY_WARMUP_ITEMS = 60  # a worker allocates its fixed working memory over its first items
MIB = 2 ** 20
FLAT_GROWTH_LIMIT_MIB = 8.0  # reduced scale; the flat dataset grows ~0.4 MiB alone, ~3 after other tests in the process
FLAT_OBJECT_LIMIT = 100  # gc-tracked objects reachable from a flat dataset, at any size
# One grey level of a PIL vs torch resize, after ImageNet normalisation (smallest std).
GREY_LEVEL = 1 / 255 / min(T.IMAGENET_STD)


@pytest.fixture(scope="module")
def scale_data(module_tmp):
    """(image folder, annotation file) of a generated COCO-like set: shuffled ids, crowds, polygons."""
    return write_coco_scale(module_tmp("scale"), num_images=12, num_objects=150, seed=1)


@pytest.fixture(scope="module")
def edge_case_data(module_tmp):
    """Unsorted ids, crowd / zero-width / out-of-image boxes, integer areas, long decimals, an
    image without objects, one without width/height, and an object of an unlisted image."""
    root = module_tmp("edges")
    sizes = {9: (30, 20), 3: (24, 36), 5: (40, 40), 7: (20, 20)}
    images = []
    for image_id, (width, height) in sizes.items():
        Image.new("RGB", (width, height), (image_id * 20, 90, 160)).save(root / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": width, "height": height})
    del images[-1]["width"], images[-1]["height"]
    anns = [(9, [5, 5, 0, 10], 0), (9, [2.123456789, 3.3333333, 10.1, 8.7], 0), (3, [1, 1, 5, 5], 1),
            (9, [25, 15, 20, 20], 0), (3, [0, 0, 24, 36], 0), (4, [1, 1, 2, 2], 0), (3, [30, 0, 10, 10], 0),
            (9, [-4, 1, 10, 10], 0),
            (7, [1, 2, 3, 4], 0)]
    annotations = [{"id": i, "image_id": image_id, "category_id": 1 + i % 3, "bbox": bbox, "iscrowd": crowd,
                    "area": int(bbox[2] * bbox[3]) if i % 2 else bbox[2] * bbox[3] + 0.1,
                    "segmentation": [[0, 0, 1, 0, 1, 1]]}
                   for i, (image_id, bbox, crowd) in enumerate(anns, start=1)]
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                    "categories": [{"id": i, "name": str(i)} for i in (1, 2, 3)]}))
    return root, ann_file


def assert_items_equal(item_a, item_b):
    (image_a, target_a), (image_b, target_b) = item_a, item_b
    if isinstance(image_a, Image.Image):
        assert image_a.size == image_b.size and np.array_equal(np.asarray(image_a), np.asarray(image_b))
    else:
        assert image_a.dtype == image_b.dtype and torch.equal(image_a, image_b)
    assert set(target_a) == set(target_b) == set(TARGET_KEYS)
    for key in TARGET_KEYS:
        assert target_a[key].dtype == target_b[key].dtype, key
        assert torch.equal(target_a[key], target_b[key]), key


# --------------------------------------------------------------------------------------
# Flat store
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("data", ["scale_data", "edge_case_data"])
@pytest.mark.parametrize("pipeline", ["none", "val", "train_tensor", "train_pil"])
def test_items_bit_identical_to_dict_based_reference(request, data, pipeline):
    img_folder, ann_file = request.getfixturevalue(data)
    transforms = None
    if pipeline != "none":
        image_set, _, backend = pipeline.partition("_")
        transforms = T.make_coco_transforms(image_set, **SMALL_SCALES, train_backend=backend or "tensor")
    flat = CocoDetection(img_folder=img_folder, ann_file=ann_file, transforms=transforms)
    reference = OfficialStyleCocoDetection(img_folder, ann_file, transforms)
    assert flat.ids.tolist() == reference.ids and len(flat) == len(reference)
    for _ in range(DRAWS if pipeline.startswith("train") else 1):
        for index in range(len(flat)):
            random.seed(SEED + index)
            item = flat[index]
            random.seed(SEED + index)
            assert_items_equal(item, reference[index])


def test_edge_case_targets(edge_case_data):
    dataset = CocoDetection(img_folder=edge_case_data[0], ann_file=edge_case_data[1], transforms=None)
    assert dataset.ids.tolist() == [3, 5, 7, 9]
    targets = {int(i): dataset[n][1] for n, i in enumerate(dataset.ids)}
    assert targets[3]["boxes"].tolist() == [[0, 0, 24, 36]]  # crowd and outside-the-image dropped
    assert targets[5]["boxes"].shape == (0, 4)
    # clipped to the 30 x 20 image; the zero-width box is dropped
    x_coordinates = targets[9]["boxes"][:, 0::2].flatten().tolist()
    assert x_coordinates == pytest.approx([2.123456789, 12.223456789, 25, 30, 0, 6])
    assert dataset.annotations.used_category_ids().tolist() == [1, 2, 3]


def reachable_tracked_objects(root, limit):
    """Number of gc-tracked objects reachable from ``root`` (stops counting past ``limit``)."""
    seen, stack = set(), [root]
    while stack and len(seen) <= limit:
        obj = stack.pop()
        if id(obj) in seen or not gc.is_tracked(obj) or isinstance(obj, type):
            continue
        seen.add(id(obj))
        stack.extend(gc.get_referents(obj))
    return len(seen)


def test_flat_store_holds_no_python_object_per_annotation(scale_data):
    img_folder, ann_file = scale_data
    flat = CocoDetection(img_folder=img_folder, ann_file=ann_file, transforms=None)
    arrays = vars(flat.annotations).values()
    assert all(isinstance(a, np.ndarray) and a.dtype != object for a in arrays)
    assert reachable_tracked_objects(flat, FLAT_OBJECT_LIMIT) < FLAT_OBJECT_LIMIT
    # the dict-based dataset: several objects per annotation (the check can fail)
    num_objects = len(flat.annotations.labels)
    reference = OfficialStyleCocoDetection(img_folder, ann_file, None)
    assert reachable_tracked_objects(reference, num_objects) > num_objects


def private_bytes() -> int:
    """Memory of this process that no other process shares (USS)."""
    fields = dict(line.split(":") for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:])
    return sum(int(fields[name].split()[0]) * 1024 for name in ("Private_Clean", "Private_Dirty"))


class TargetMemoryProbe(torch.utils.data.Dataset):
    """Reads the targets of a dataset (flat or reference) in a worker and returns the worker's
    private memory. At the last item a full garbage collection runs first, as the many
    collections of a long epoch would. Images are not decoded: their buffers are noise here."""

    def __init__(self, dataset, num_items):
        self.dataset, self.num_items = dataset, num_items

    def __len__(self):
        return self.num_items

    def _target(self, index):
        dataset = self.dataset
        if isinstance(dataset, CocoDetection):
            return dataset.annotations.target(index, width=1, height=1)
        info = dataset.coco.imgs[dataset.ids[index]]
        return dict_based_target(dataset.coco.imgToAnns[info["id"]], image_id=info["id"], width=1, height=1)

    def __getitem__(self, index):
        self._target(index % len(self.dataset))
        if index == self.num_items - 1:
            gc.collect()
        return private_bytes()


def worker_growth_mib(dataset):
    probe = TargetMemoryProbe(dataset, MEMORY_ITEMS)
    loader = torch.utils.data.DataLoader(probe, batch_size=None, num_workers=1)
    private = list(loader)
    return (private[-1] - private[MEMORY_WARMUP_ITEMS]) / MIB


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux /proc smaps_rollup")
def test_worker_memory_stays_flat(tmp_path):
    img_folder, ann_file = write_coco_scale(tmp_path, num_images=MEMORY_IMAGES, num_objects=MEMORY_OBJECTS)
    gc.collect()
    gc.freeze()  # what the test process itself holds is not what is measured
    try:
        flat_growth = worker_growth_mib(CocoDetection(img_folder=img_folder, ann_file=ann_file, transforms=None))
        reference_growth = worker_growth_mib(OfficialStyleCocoDetection(img_folder, ann_file, None))
    finally:
        gc.unfreeze()
    assert flat_growth < FLAT_GROWTH_LIMIT_MIB, (flat_growth, reference_growth)
    assert reference_growth > 2 * FLAT_GROWTH_LIMIT_MIB, (flat_growth, reference_growth)


# --------------------------------------------------------------------------------------
# Clear errors
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, message", [
    ('{"images": [', "ann.json"),
    ('[1, 2]', "not an object"),
    (json.dumps({"images": [{"id": 1, "file_name": "a"}, {"id": 1, "file_name": "b"}]}), r"\[1\].*more than once"),
    (json.dumps({"images": [{"id": 1, "file_name": "a"}], "annotations": [
        {"id": 1, "image_id": 1, "category_id": "cat", "bbox": [0, 0, 1, 1], "area": 1}]}), "'cat'"),
    (json.dumps({"images": [{"id": 1, "file_name": "a"}], "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}]}), "area"),
])
def test_bad_annotation_file_is_named(tmp_path, content, message):
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        FlatCocoAnnotations.from_json(ann_file)
    assert "ann.json" in str(error.value)


# --------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------
def test_tensor_training_augmentation_has_the_pil_semantics(scale_data):
    """Same draws, sizes, crops, flips and targets; pixels within a grey level or two."""
    img_folder, ann_file = scale_data
    datasets = {backend: CocoDetection(img_folder=img_folder, ann_file=ann_file,
                                       transforms=T.make_coco_transforms("train", train_backend=backend))
                for backend in T.BACKENDS}
    sizes = set()
    for index in range(len(datasets["pil"])):
        for draw in range(DRAWS):
            items, next_draws = {}, set()
            for backend, dataset in datasets.items():
                random.seed(SEED * draw + index)
                items[backend] = dataset[index]
                next_draws.add(random.random())
            assert len(next_draws) == 1  # both used the same number of draws
            (fast, target_fast), (slow, target_slow) = items["tensor"], items["pil"]
            assert fast.shape == slow.shape and fast.dtype == slow.dtype and fast.is_contiguous()
            for key in TARGET_KEYS:
                assert torch.equal(target_fast[key], target_slow[key]), key
            difference = (fast - slow).abs()
            assert difference.mean() < 0.1 * GREY_LEVEL and difference.max() < 3.01 * GREY_LEVEL
            sizes.add(tuple(fast.shape))
    assert len(sizes) > DRAWS  # the draws did vary


def test_val_preprocessing_pixel_identical_to_official(scale_data):
    """PIL bilinear resize to the official size, to_tensor, ImageNet normalisation."""
    expected_wh = {(640, 480): (1066, 800), (480, 640): (800, 1066), (640, 427): (1199, 800),
                   (427, 640): (800, 1199), (500, 375): (1066, 800), (640, 360): (1333, 750)}
    assert set(expected_wh) == set(IMAGE_SIZES)
    img_folder, ann_file = scale_data
    dataset = CocoDetection(img_folder=img_folder, ann_file=ann_file, transforms=T.make_coco_transforms("val"))
    seen = set()
    for index in range(len(dataset)):
        path = img_folder / dataset.annotations.file_name(index)
        original = Image.open(path).convert("RGB")
        if original.size in seen:
            continue
        seen.add(original.size)
        resized = original.resize(expected_wh[original.size], Image.BILINEAR)
        expected = F.normalize(F.to_tensor(resized), list(T.IMAGENET_MEAN), list(T.IMAGENET_STD))
        image, target = dataset[index]
        assert torch.equal(image, expected)
        assert target["size"].tolist() == list(expected.shape[1:])
    assert len(seen) >= 3


# --------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------
def test_loaders_keep_workers_and_pin_for_cuda():
    from main import loader_settings

    cuda = loader_settings(SimpleNamespace(num_workers=2, device="cuda"))
    assert cuda["num_workers"] == 2 and cuda["persistent_workers"] and cuda["pin_memory"]
    cpu = loader_settings(SimpleNamespace(num_workers=0, device="cpu"))
    assert not cpu["pin_memory"] and not cpu.get("persistent_workers", False)  # no workers to keep
