"""Data pipeline: COCO-format loading, target preparation, DETR augmentation, synthetic data."""
import json
import random
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import datasets.transforms as T
from datasets import build_dataset, get_coco_api_from_dataset
from datasets import synthetic
from datasets.coco import CocoDetection, FlatCocoAnnotations, ImageSizeMismatchError, build, check_category_ids
from datasets.synthetic import make_synthetic_coco

IMAGE_SIZE = 64
VAL_SIZE = 48
NUM_CLASSES = 4  # synthetic ids 1..3
EXPECTED_KEYS = {"boxes", "labels", "area", "iscrowd", "image_id", "orig_size", "size"}
RED, BLUE = (255, 0, 0), (0, 0, 255)
EXIF_ORIENTATION_TAG = 0x0112
EXIF_ROTATE_90_CW = 6  # "rotate the stored pixels 90 degrees clockwise to display"
EXIF_ROTATE_180 = 3
EXIF_MIRROR = 2  # "mirror left to right to display"


@pytest.fixture(scope="module")
def shapes_root(module_tmp) -> Path:
    root = module_tmp("shapes")
    make_synthetic_coco(out_dir=root, num_train=6, num_val=4, image_size=IMAGE_SIZE, seed=0)
    return root


def make_args(**overrides) -> SimpleNamespace:
    args = dict(dataset_file="coco", coco_path=None, masks=False, num_classes=NUM_CLASSES,
                scales=[40, 48, 56], max_size=100, val_size=VAL_SIZE, train_img_dir=None,
                train_ann=None, val_img_dir=None, val_ann=None)
    args.update(overrides)
    return SimpleNamespace(**args)


def write_coco(root: Path, images, annotations, categories=None) -> SimpleNamespace:
    """Writes a one-split dataset: images = [(file_name, PIL image)], annotations as COCO dicts.

    Returns args pointing the 'val' split at it.
    """
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for image_id, (file_name, image) in enumerate(images, start=1):
        image.save(img_dir / file_name)
        entries.append({"id": image_id, "file_name": file_name, "width": image.width, "height": image.height})
    if categories is None:
        categories = [{"id": 1, "name": "thing", "supercategory": "thing"}]
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps({"images": entries, "annotations": annotations, "categories": categories}))
    return make_args(val_img_dir=str(img_dir), val_ann=str(ann_file), num_classes=2)


def annotation(ann_id: int, image_id: int, bbox, category_id: int = 1, iscrowd: int = 0) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": list(bbox),
            "area": float(bbox[2] * bbox[3]), "iscrowd": iscrowd}


def raw_target(boxes, size_hw) -> dict:
    boxes = torch.tensor(boxes, dtype=torch.float32)
    count = boxes.shape[0]
    return {"boxes": boxes, "labels": torch.arange(1, count + 1), "area": torch.ones(count),
            "iscrowd": torch.zeros(count, dtype=torch.int64), "image_id": torch.tensor([1]),
            "orig_size": torch.tensor(size_hw), "size": torch.tensor(size_hw)}


# --------------------------------------------------------------------------------------
# Dataset items
# --------------------------------------------------------------------------------------
def test_val_items_have_normalised_targets(shapes_root):
    dataset = build("val", make_args(coco_path=str(shapes_root)))
    ann = json.loads((shapes_root / "annotations" / "instances_val2017.json").read_text())
    assert len(dataset) == len(ann["images"]) == 4
    for index in range(len(dataset)):
        image, target = dataset[index]
        info = dataset.coco.imgs[dataset.ids[index]]
        assert set(target) == EXPECTED_KEYS
        assert image.ndim == 3 and image.shape[0] == 3 and image.dtype == torch.float32
        assert target["size"].tolist() == list(image.shape[1:])
        assert target["orig_size"].tolist() == [info["height"], info["width"]]
        assert min(image.shape[1:]) == VAL_SIZE  # shorter side goes to val_size
        boxes = target["boxes"]
        num_objects = len(dataset.coco.getAnnIds(imgIds=info["id"]))
        assert boxes.shape == (num_objects, 4) and target["labels"].shape == (num_objects,)
        assert ((boxes >= 0) & (boxes <= 1)).all() and (boxes[:, 2:] > 0).all()
        assert target["image_id"].tolist() == [info["id"]]


def test_val_boxes_match_annotations(shapes_root):
    """cxcywh * size recovers the json xywh box scaled by the resize ratio."""
    dataset = build("val", make_args(coco_path=str(shapes_root)))
    image, target = dataset[0]
    info = dataset.coco.imgs[dataset.ids[0]]
    anns = dataset.coco.loadAnns(dataset.coco.getAnnIds(imgIds=info["id"]))
    height, width = image.shape[1:]
    cx, cy, w, h = target["boxes"][0].tolist()
    x, y, bw, bh = anns[0]["bbox"]
    assert cx * width == pytest.approx((x + bw / 2) * width / info["width"], abs=1e-3)
    assert cy * height == pytest.approx((y + bh / 2) * height / info["height"], abs=1e-3)
    assert w * width == pytest.approx(bw * width / info["width"], abs=1e-3)
    assert h * height == pytest.approx(bh * height / info["height"], abs=1e-3)


def test_train_transforms_reproducible_under_python_seed(shapes_root):
    dataset = build("train", make_args(coco_path=str(shapes_root)))
    draws = []
    for _ in range(2):
        random.seed(1234)
        draws.append([dataset[i] for i in range(len(dataset))])
    for (image_a, target_a), (image_b, target_b) in zip(*draws):
        assert torch.equal(image_a, image_b)
        for key in EXPECTED_KEYS:
            assert torch.equal(target_a[key], target_b[key])


def test_train_targets_stay_valid_over_many_draws(shapes_root):
    dataset = build("train", make_args(coco_path=str(shapes_root)))
    random.seed(0)
    for _ in range(3):
        for index in range(len(dataset)):
            image, target = dataset[index]
            boxes = target["boxes"]
            assert target["size"].tolist() == list(image.shape[1:])
            assert ((boxes >= 0) & (boxes <= 1 + 1e-6)).all() and (boxes[:, 2:] > 0).all()
            assert len(boxes) == len(target["labels"]) == len(target["area"]) == len(target["iscrowd"])


def test_get_coco_api_unwraps_subsets(shapes_root):
    dataset = build_dataset("val", make_args(coco_path=str(shapes_root)))
    nested = torch.utils.data.Subset(torch.utils.data.Subset(dataset, [0, 1]), [1])
    assert get_coco_api_from_dataset(nested) is dataset.coco


# --------------------------------------------------------------------------------------
# Target preparation and image reading
# --------------------------------------------------------------------------------------
def test_image_without_annotations_gives_empty_target(tmp_path):
    args = write_coco(tmp_path, [("a.png", Image.new("RGB", (30, 20)))], [])
    image, target = build("val", args)[0]
    assert target["boxes"].shape == (0, 4)
    assert target["labels"].shape == target["area"].shape == target["iscrowd"].shape == (0,)
    assert image.shape[1:] == (VAL_SIZE, int(VAL_SIZE * 30 / 20))


def test_zero_width_and_crowd_boxes_dropped_and_boxes_clipped(tmp_path):
    anns = [annotation(1, 1, [5, 5, 0, 10]),       # zero width
            annotation(2, 1, [2, 3, 10, 8]),        # kept
            annotation(3, 1, [1, 1, 5, 5], iscrowd=1),
            annotation(4, 1, [25, 15, 20, 20])]     # runs past the 30 x 20 image: clipped
    args = write_coco(tmp_path, [("a.png", Image.new("RGB", (30, 20)))], anns)
    dataset = CocoDetection(img_folder=Path(args.val_img_dir), ann_file=Path(args.val_ann), transforms=None)
    _, target = dataset[0]
    assert target["boxes"].tolist() == [[2, 3, 12, 11], [25, 15, 30, 20]]
    assert target["iscrowd"].tolist() == [0, 0]


def test_truncated_jpeg_error_names_the_file(tmp_path):
    args = write_coco(tmp_path, [("broken.jpg", Image.new("RGB", (64, 64), RED))], [])
    path = Path(args.val_img_dir) / "broken.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match="broken.jpg"):
        build("val", args)[0]


def tagged_jpeg_dataset(tmp_path, annotated_size, orientation=EXIF_ROTATE_90_CW, apply_exif=False):
    """A 40 x 20 bitmap, red left half, with an EXIF orientation tag, a box on the red square and
    the json's width/height set to `annotated_size`."""
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    stored.save(img_dir / "rotated.jpg", exif=exif.tobytes(), quality=95)
    ann_file = tmp_path / "ann.json"
    width, height = annotated_size
    ann_file.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "rotated.jpg", "width": width, "height": height}],
        "annotations": [annotation(1, 1, [0, 0, 20, 20])],
        "categories": [{"id": 1, "name": "red", "supercategory": "x"}]}))
    return CocoDetection(img_folder=img_dir, ann_file=ann_file, transforms=None, apply_exif=apply_exif)


def is_red(pixel) -> bool:
    return pixel[0] > 200 and pixel[2] < 60


@pytest.mark.parametrize("orientation", [EXIF_ROTATE_90_CW, EXIF_ROTATE_180, EXIF_MIRROR])
def test_exif_tag_ignored_by_default_as_the_official_loader(tmp_path, orientation):
    # torchvision's loader (the official one) reads the stored bitmap, whatever the tag says
    image, target = tagged_jpeg_dataset(tmp_path, (40, 20), orientation)[0]
    assert image.size == (40, 20)
    assert is_red(image.getpixel((10, 10))) and not is_red(image.getpixel((30, 10)))
    assert target["boxes"].tolist() == [[0, 0, 20, 20]]


def test_exif_rotated_jpeg_is_read_upright_with_apply_exif(tmp_path):
    # Displayed upright it is 20 wide x 40 tall with red on top; the json says so.
    dataset = tagged_jpeg_dataset(tmp_path, (20, 40), apply_exif=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image, target = dataset[0]
    assert image.size == (20, 40)
    assert is_red(image.getpixel((10, 8))) and not is_red(image.getpixel((10, 32)))
    assert target["orig_size"].tolist() == [40, 20]
    assert target["boxes"].tolist() == [[0, 0, 20, 20]]


def test_exif_mirror_applied_with_apply_exif(tmp_path):
    image, _ = tagged_jpeg_dataset(tmp_path, (40, 20), EXIF_MIRROR, apply_exif=True)[0]
    assert not is_red(image.getpixel((10, 10))) and is_red(image.getpixel((30, 10)))


@pytest.mark.parametrize("apply_exif", [False, True])
def test_size_mismatch_with_the_json_names_file_and_flag(tmp_path, apply_exif):
    # annotated upright (20 x 40) but read as stored, or the other way round
    annotated = (40, 20) if apply_exif else (20, 40)
    with pytest.raises(ImageSizeMismatchError, match=r"rotated\.jpg.*--apply_exif"):
        tagged_jpeg_dataset(tmp_path, annotated, apply_exif=apply_exif)[0]


def test_apply_exif_flag_reaches_the_dataset(tmp_path):
    tagged_jpeg_dataset(tmp_path, (20, 40))
    args = make_args(val_img_dir=str(tmp_path / "images"), val_ann=str(tmp_path / "ann.json"), num_classes=2)
    assert not build("val", args).apply_exif
    assert build("val", make_args(**{**vars(args), "apply_exif": True})).apply_exif


# --------------------------------------------------------------------------------------
# Configuration errors
# --------------------------------------------------------------------------------------
def test_out_of_range_category_id_is_named(tmp_path):
    anns = [annotation(1, 1, [2, 2, 10, 10], category_id=7)]
    args = write_coco(tmp_path, [("a.png", Image.new("RGB", (30, 20)))], anns)
    with pytest.raises(ValueError, match=r"\[7\].*ann\.json"):
        build("val", args)


def test_category_id_warnings(tmp_path):
    anns = [annotation(1, 1, [2, 2, 10, 10], category_id=1)]
    args = write_coco(tmp_path, [("a.png", Image.new("RGB", (30, 20)))], anns)
    ids = FlatCocoAnnotations.from_json(Path(args.val_ann)).used_category_ids()
    with pytest.warns(UserWarning, match="never be trained"):
        check_category_ids(ids, num_classes=5, ann_file=args.val_ann)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_category_ids(ids, num_classes=2, ann_file=args.val_ann)
        check_category_ids(list(range(1, 91)), num_classes=91, ann_file=args.val_ann)  # COCO's ids
        check_category_ids([1, 50], num_classes=91, ann_file=args.val_ann)  # a COCO subset using most logits
    # custom data left at the COCO default: most of the 91 logits would never be trained
    with pytest.warns(UserWarning, match="89 logits will never be trained; pass --num_classes 2"):
        check_category_ids(ids, num_classes=91, ann_file=args.val_ann)
    with pytest.raises(ValueError, match=r"\[1\]"):
        check_category_ids(ids, num_classes=1, ann_file=args.val_ann)


def test_missing_annotation_file_is_named(shapes_root, tmp_path):
    (tmp_path / "val2017").mkdir()
    with pytest.raises(FileNotFoundError, match="instances_val2017.json"):
        build("val", make_args(coco_path=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="train2017"):
        build("train", make_args(coco_path=str(tmp_path)))
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        build("val", make_args(coco_path=str(shapes_root), val_ann=str(missing)))


def test_unsupported_options_fail_clearly(shapes_root):
    with pytest.raises(NotImplementedError, match="--masks"):
        build("val", make_args(coco_path=str(shapes_root), masks=True))
    with pytest.raises(ValueError, match="coco"):
        build_dataset("val", make_args(coco_path=str(shapes_root), dataset_file="voc"))


# --------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------
def test_resize_rule():
    assert T.resized_hw(width=640, height=480, size=800, max_size=1333) == (800, 1066)
    # Longer side would exceed max_size: the shorter side shrinks to round(1333 * 500 / 2000).
    assert T.resized_hw(width=2000, height=500, size=800, max_size=1333) == (333, 1332)
    assert T.resized_hw(width=300, height=700, size=300, max_size=None) == (700, 300)  # no-op
    assert T.resized_hw(width=300, height=700, size=100, max_size=None) == (233, 100)


def test_resize_scales_boxes_and_area():
    image = Image.new("RGB", (40, 20))
    target = raw_target([[4, 2, 20, 10]], [20, 40])
    target["area"] = torch.tensor([128.0])
    out_image, out = T.resize(image, target, size=10)
    assert out_image.size == (20, 10)
    assert out["boxes"].tolist() == [[2, 1, 10, 5]]
    assert out["area"].tolist() == [32.0]
    assert out["size"].tolist() == [10, 20]
    assert target["boxes"].tolist() == [[4, 2, 20, 10]]  # input untouched


def test_flip_mirrors_boxes_and_pixels():
    image = Image.new("RGB", (40, 20), BLUE)
    image.paste(RED, (0, 0, 10, 20))
    out_image, out = T.hflip(image, raw_target([[0, 0, 10, 20], [15, 5, 25, 8]], [20, 40]))
    assert out["boxes"].tolist() == [[30, 0, 40, 20], [15, 5, 25, 8]]
    assert out_image.getpixel((35, 10)) == RED and out_image.getpixel((5, 10)) == BLUE


def test_crop_clips_and_drops_boxes():
    image = Image.new("RGB", (40, 40))
    target = raw_target([[0, 0, 10, 10], [15, 15, 35, 30], [30, 30, 40, 40]], [40, 40])
    out_image, out = T.crop(image, target, top=12, left=10, height=16, width=20)
    assert out_image.size == (20, 16)
    assert out["boxes"].tolist() == [[5, 3, 20, 16]]  # first and last fall outside
    assert out["labels"].tolist() == [2] and out["iscrowd"].tolist() == [0]
    assert out["area"].tolist() == [15 * 13]
    assert out["size"].tolist() == [16, 20]


def test_normalize_gives_cxcywh_in_unit_range():
    image = torch.zeros(3, 20, 40)
    _, out = T.Normalize()(image, raw_target([[0, 0, 40, 20], [10, 5, 20, 15]], [20, 40]))
    assert torch.allclose(out["boxes"], torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.375, 0.5, 0.25, 0.5]]))


def test_random_size_crop_handles_small_images():
    random.seed(0)
    image, target = T.RandomSizeCrop(30, 50)(Image.new("RGB", (20, 60)), raw_target([[0, 0, 5, 5]], [60, 20]))
    assert image.width == 20 and 30 <= image.height <= 50


def test_crop_branch_scales_with_val_size():
    def crop_branch(transforms):
        select, = [t for t in transforms.transforms if isinstance(t, T.RandomSelect)]
        return select.second.transforms

    official = crop_branch(T.make_coco_transforms("train"))
    assert official[0].sizes == [400, 500, 600]
    assert (official[1].min_size, official[1].max_size) == (384, 600)
    assert official[2].sizes == list(T.DEFAULT_TRAIN_SCALES) and official[2].max_size == 1333
    small = crop_branch(T.make_coco_transforms("train", scales=[128, 160], max_size=267, val_size=160))
    assert small[0].sizes == [80, 100, 120]
    assert (small[1].min_size, small[1].max_size) == (77, 120)
    with pytest.raises(ValueError, match="test"):
        T.make_coco_transforms("test")


def test_synthetic_generation_is_deterministic(tmp_path):
    for name in ("a", "b"):
        make_synthetic_coco(out_dir=tmp_path / name, num_train=3, num_val=1, image_size=IMAGE_SIZE, seed=5)
    for rel in ("annotations/instances_train2017.json", "train2017/000000000002.jpg", "val2017/000000000001.jpg"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    coco = json.loads((tmp_path / "a" / "annotations/instances_train2017.json").read_text())
    assert {c["id"] for c in coco["categories"]} == {1, 2, 3}
    per_image = [sum(a["image_id"] == img["id"] for a in coco["annotations"]) for img in coco["images"]]
    assert all(synthetic.MIN_OBJECTS <= n <= synthetic.MAX_OBJECTS for n in per_image)
    for ann in coco["annotations"]:
        img = coco["images"][ann["image_id"] - 1]
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= img["width"] and y + h <= img["height"]
        short_side = min(img["width"], img["height"])
        assert int(synthetic.MIN_OBJECT_FRACTION * short_side) <= w <= synthetic.MAX_OBJECT_FRACTION * short_side
        assert ann["iscrowd"] == 0
