"""COCO-format detection dataset returning (image (3, H, W), target dict) pairs.

Targets are prepared like DETR's: crowd objects are dropped, xywh boxes become xyxy clipped to
the image, boxes with no width or height are removed; after the transforms the boxes are
normalised cxcywh (see ``datasets.transforms``).

Images are read with PIL, rotated upright according to their EXIF orientation (unless the
annotation file's width/height show that the boxes were drawn on the stored, unrotated bitmap),
converted to RGB and fully decoded, so that a corrupt file fails here with its path in the
message instead of deep inside a worker.

Differences from the official preparation: EXIF orientation is applied (torchvision's loader
ignores it), ``area`` is always float32 (the official gives int64 when the json holds integer
areas), and segmentation masks / keypoints are not produced.
"""
import contextlib
import io
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torchvision
from PIL import Image, ImageOps

from datasets.transforms import DEFAULT_MAX_SIZE, DEFAULT_TRAIN_SCALES, DEFAULT_VAL_SIZE, make_coco_transforms

Target = Dict[str, torch.Tensor]

# COCO's category ids run from 1 to 90; DETR keeps one logit per id, hence 91 classes.
COCO_NUM_CLASSES = 91
COCO_MAX_CATEGORY_ID = 90

# Official directory layout under --coco_path.
COCO_LAYOUT = {
    "train": ("train2017", "annotations/instances_train2017.json"),
    "val": ("val2017", "annotations/instances_val2017.json"),
}


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------
def load_image(path: Path, annotated_size: Optional[Tuple[int, int]] = None) -> Image.Image:
    """Opens an image as a fully decoded RGB PIL image, upright per its EXIF orientation.

    annotated_size: the (width, height) its annotations were made on. When only the stored,
    unrotated bitmap has that size (a 90-degree orientation tag that the annotation tool
    ignored, as tools of COCO's era did), the stored bitmap is kept so that the boxes still fit.
    Raises RuntimeError naming ``path`` when the file is missing, truncated or not an image.
    """
    try:
        with Image.open(path) as opened:
            # load() forces the full decode here; PIL is lazy and would otherwise fail later.
            opened.load()
            upright = ImageOps.exif_transpose(opened)
            if annotated_size is not None and opened.size == annotated_size != upright.size:
                return opened.convert("RGB")
            return upright.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise RuntimeError(f"cannot read image {path}: {error}") from error


def prepare_target(annotations: List[Dict[str, Any]], *, image_id: int, width: int,
                   height: int) -> Target:
    """COCO annotations of one image -> DETR target with xyxy pixel boxes.

    Returns boxes (N, 4) float32, labels (N,) int64, area (N,) float32, iscrowd (N,) int64,
    image_id (1,), orig_size and size (2,) = [height, width]. Crowd objects and boxes that end
    up with zero width or height after clipping to the image are dropped.
    """
    objects = [obj for obj in annotations if obj.get("iscrowd", 0) == 0]
    boxes = torch.as_tensor([obj["bbox"] for obj in objects], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
    boxes[:, 0::2].clamp_(min=0, max=width)
    boxes[:, 1::2].clamp_(min=0, max=height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    labels = torch.tensor([obj["category_id"] for obj in objects], dtype=torch.int64)
    area = torch.tensor([float(obj["area"]) for obj in objects], dtype=torch.float32)
    iscrowd = torch.tensor([obj.get("iscrowd", 0) for obj in objects], dtype=torch.int64)
    size = torch.as_tensor([int(height), int(width)])
    return {
        "boxes": boxes[keep],
        "labels": labels[keep],
        "image_id": torch.tensor([image_id]),
        "area": area[keep],
        "iscrowd": iscrowd[keep],
        "orig_size": size,
        "size": size.clone(),
    }


def load_coco_api(ann_file: Path):
    """pycocotools COCO object for ``ann_file``, quietly, with errors naming the file."""
    from pycocotools.coco import COCO

    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(f"annotation file not found: {ann_file}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(ann_file))
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"cannot parse COCO annotation file {ann_file}: {error!r}") from error


class CocoDetection(torchvision.datasets.CocoDetection):
    """COCO-format detection dataset; item = (image tensor (3, H, W), target dict).

    img_folder: folder the ``file_name`` entries are relative to; ann_file: COCO json;
    transforms: joint (PIL image, target) transform, or None to get the PIL image back.
    """

    def __init__(self, *, img_folder: Path, ann_file: Path, transforms: Optional[Callable]):
        img_folder = Path(img_folder)
        if not img_folder.is_dir():
            raise FileNotFoundError(f"image folder not found: {img_folder}")
        # Not calling the parent __init__: it would load the json a second time, loudly.
        torchvision.datasets.VisionDataset.__init__(self, str(img_folder))
        self.ann_file = Path(ann_file)
        self.coco = load_coco_api(self.ann_file)
        self.ids = sorted(self.coco.imgs.keys())
        self._transforms = transforms

    def _load_image(self, id: int) -> Image.Image:
        info = self.coco.imgs[id]
        path = Path(self.root) / info["file_name"]
        expected = (info.get("width"), info.get("height"))
        image = load_image(path, None if None in expected else expected)
        if None not in expected and image.size != expected:
            # Boxes are clipped to the decoded size, so a mismatch would silently cut objects.
            warnings.warn(f"{path} (image id {id}) decodes (after EXIF rotation) to width x height "
                          f"{image.size}, but {self.ann_file} says {expected}")
        return image

    def __getitem__(self, index: int) -> Tuple[Any, Target]:
        image_id = self.ids[index]
        image = self._load_image(image_id)
        target = prepare_target(self._load_target(image_id), image_id=image_id,
                                width=image.width, height=image.height)
        if self._transforms is not None:
            image, target = self._transforms(image, target)
        return image, target


# --------------------------------------------------------------------------------------
# Checks and build
# --------------------------------------------------------------------------------------
def check_category_ids(coco_api, num_classes: int, ann_file: str) -> None:
    """Checks that every category id fits the classifier (one logit per id, 0..num_classes-1).

    Raises ValueError naming the bad ids and ``ann_file`` if any id is negative or
    >= num_classes. Warns when num_classes != max id + 1 (wasted logits), except for the COCO
    convention (91 classes with ids <= 90).
    """
    category_ids = set(coco_api.cats.keys())
    annotation_ids = {ann["category_id"] for ann in coco_api.anns.values()}
    all_ids = category_ids | annotation_ids
    bad = [i for i in all_ids if not (isinstance(i, int) and 0 <= i < num_classes)]
    bad.sort(key=lambda i: (type(i).__name__, i))  # a broken file may mix types
    if bad:
        raise ValueError(f"category id(s) {bad} in {ann_file} are outside [0, {num_classes - 1}] "
                         f"(num_classes={num_classes}); set --num_classes to max id + 1")
    if not all_ids:
        warnings.warn(f"{ann_file} defines no categories and no annotations")
        return
    max_id = max(all_ids)
    is_coco_default = num_classes == COCO_NUM_CLASSES and max_id <= COCO_MAX_CATEGORY_ID
    if num_classes != max_id + 1 and not is_coco_default:
        warnings.warn(f"num_classes={num_classes} but the largest category id in {ann_file} is "
                      f"{max_id}: {num_classes - max_id - 1} logits will never be trained")


def _resolve(override: Optional[str], default: Path) -> Path:
    return Path(override) if override else default


def dataset_paths(image_set: str, args) -> Tuple[Path, Path]:
    """(image folder, annotation file) for ``image_set`` from args.coco_path or the overrides
    args.{train,val}_img_dir / args.{train,val}_ann."""
    if image_set not in COCO_LAYOUT:
        raise ValueError(f"unknown image_set {image_set!r}; expected one of {sorted(COCO_LAYOUT)}")
    img_override = getattr(args, f"{image_set}_img_dir", None)
    ann_override = getattr(args, f"{image_set}_ann", None)
    coco_path = getattr(args, "coco_path", None)
    if coco_path is None and not (img_override and ann_override):
        raise ValueError(f"no data for {image_set!r}: give --coco_path or both "
                         f"--{image_set}_img_dir and --{image_set}_ann")
    folder_name, ann_name = COCO_LAYOUT[image_set]
    root = Path(coco_path) if coco_path is not None else Path()
    return _resolve(img_override, root / folder_name), _resolve(ann_override, root / ann_name)


def build(image_set: str, args) -> CocoDetection:
    """COCO-format dataset for 'train' or 'val'.

    Reads args.coco_path, args.{train,val}_img_dir, args.{train,val}_ann, args.scales,
    args.max_size, args.val_size, args.masks and args.num_classes (missing ones take defaults;
    num_classes None skips the category check).
    """
    if getattr(args, "masks", False):
        raise NotImplementedError("segmentation (--masks) is not supported by this codebase")
    img_folder, ann_file = dataset_paths(image_set, args)
    for path, is_ok in ((img_folder, img_folder.is_dir()), (ann_file, ann_file.is_file())):
        if not is_ok:
            raise FileNotFoundError(f"{image_set} data: missing {path}")
    transforms = make_coco_transforms(
        image_set,
        scales=getattr(args, "scales", None) or DEFAULT_TRAIN_SCALES,
        max_size=getattr(args, "max_size", None) or DEFAULT_MAX_SIZE,
        val_size=getattr(args, "val_size", None) or DEFAULT_VAL_SIZE,
    )
    dataset = CocoDetection(img_folder=img_folder, ann_file=ann_file, transforms=transforms)
    num_classes = getattr(args, "num_classes", None)
    if num_classes is not None:
        check_category_ids(dataset.coco, num_classes=num_classes, ann_file=str(ann_file))
    return dataset
