"""COCO-format detection dataset returning (image (3, H, W), target dict) pairs.

Targets are prepared like DETR's: crowd objects are dropped, xywh boxes become xyxy clipped to
the image, boxes with no width or height are removed; after the transforms the boxes are
normalised cxcywh (see ``datasets.transforms``).

The annotations are parsed once into a few flat numpy arrays (``FlatCocoAnnotations``): boxes,
labels, area, iscrowd, per-image offsets and the file names as one byte buffer. DataLoader
workers are forked from the process that built the dataset; a worker that reads Python objects
writes their reference counts (and its garbage collector writes their headers), which copies
the shared pages into every worker over an epoch. A handful of arrays has no such per-object
state, so worker memory stays flat at any dataset size. Segmentations are never loaded. The
pycocotools ``COCO`` object that COCO evaluation needs is built only on request (``.coco``).

Images are read with PIL as the official loader reads them: the stored bitmap, whatever its EXIF
orientation tag says, converted to RGB and fully decoded, so that a corrupt file fails here with
its path in the message instead of deep inside a worker. Datasets annotated on photos turned
upright by their orientation tag (as phone galleries show them) need ``apply_exif=True``
(``--apply_exif``). Either way, an image whose size differs from the one its json entry gives is
an error naming the file and that flag: its boxes would not fit it.

Differences from the official preparation: ``area`` is always float32 (the official gives int64
when the json holds integer areas), and segmentation masks / keypoints are not produced.
"""
import contextlib
import ctypes
import functools
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from datasets.sampling import SampleKey, augmentation_draws
from datasets.transforms import DEFAULT_MAX_SIZE, DEFAULT_TRAIN_SCALES, DEFAULT_VAL_SIZE, make_coco_transforms

Target = Dict[str, torch.Tensor]

# COCO's category ids run from 1 to 90; DETR keeps one logit per id, hence 91 classes.
COCO_NUM_CLASSES = 91

# Official directory layout under --coco_path.
COCO_LAYOUT = {
    "train": ("train2017", "annotations/instances_train2017.json"),
    "val": ("val2017", "annotations/instances_val2017.json"),
    # COCO test-dev: image entries and categories only, no annotations (main.py --test)
    "test": ("test2017", "annotations/image_info_test-dev2017.json"),
}
UNKNOWN_SIZE = -1  # width/height of an image entry that does not give them
XYWH = 4


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------
def load_image(path: Path, apply_exif: bool = False) -> Image.Image:
    """Opens an image as a fully decoded RGB PIL image.

    apply_exif: turn the bitmap upright as its EXIF orientation tag says (False: the stored
    bitmap, as torchvision's and the official loader read it).
    Raises RuntimeError naming ``path`` when the file is missing, truncated or not an image.
    """
    try:
        with Image.open(path) as opened:
            # load() forces the full decode here; PIL is lazy and would otherwise fail later.
            opened.load()
            image = ImageOps.exif_transpose(opened) if apply_exif else opened
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise RuntimeError(f"cannot read image {path}: {error}") from error


class ImageSizeMismatchError(ValueError):
    """An image decodes to another size than its annotation entry gives."""


def target_from_arrays(*, boxes_xywh: np.ndarray, labels: np.ndarray, area: np.ndarray,
                       iscrowd: np.ndarray, image_id: int, width: int, height: int) -> Target:
    """The objects of one image -> DETR target with xyxy pixel boxes.

    boxes_xywh (N, 4) float32, labels (N,) int64, area (N,) float32, iscrowd (N,) int64.
    Returns boxes (M, 4) float32, labels (M,) int64, area (M,) float32, iscrowd (M,) int64,
    image_id (1,), orig_size and size (2,) = [height, width]. Crowd objects and boxes that end
    up with zero width or height after clipping to the image are dropped.
    """
    single = iscrowd == 0
    boxes = torch.from_numpy(boxes_xywh[single])  # boolean indexing copies: the store stays intact
    boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
    boxes[:, 0::2].clamp_(min=0, max=width)
    boxes[:, 1::2].clamp_(min=0, max=height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    size = torch.as_tensor([int(height), int(width)])
    return {
        "boxes": boxes[keep],
        "labels": torch.from_numpy(labels[single])[keep],
        "image_id": torch.tensor([int(image_id)]),
        "area": torch.from_numpy(area[single])[keep],
        "iscrowd": torch.from_numpy(iscrowd[single])[keep],
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


# --------------------------------------------------------------------------------------
# Flat annotation store
# --------------------------------------------------------------------------------------
def _without_segmentation(obj: dict) -> dict:
    # Called by the json parser on each object as soon as it is complete, so that the polygons
    # (most of COCO's json) are freed one annotation at a time instead of all held at once.
    obj.pop("segmentation", None)
    return obj


def _return_freed_memory() -> None:
    """Hands the heap that json parsing freed back to the OS (glibc only; elsewhere a no-op).

    Otherwise every forked worker maps those dead pages too, and they count in its memory.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _size_entry(image: dict, key: str) -> int:
    value = image.get(key)
    return UNKNOWN_SIZE if value is None else value


def _int_array(values: Iterable, what: str) -> np.ndarray:
    values = list(values)
    bad = sorted({repr(v) for v in values if not isinstance(v, int)})
    if bad:
        raise ValueError(f"{what} must be integers, got {', '.join(bad[:10])}")
    return np.array(values, dtype=np.int64).reshape(-1)


@dataclass(frozen=True)
class FlatCocoAnnotations:
    """A COCO annotation file as flat arrays; image ``i`` is the i-th smallest image id.

    image_ids (I,) int64 ascending; image_sizes (I, 2) int64 (width, height), UNKNOWN_SIZE where
    the json gives none; names (B,) uint8 holding the utf-8 file names back to back, name i at
    [name_offsets[i], name_offsets[i+1]); object_offsets (I+1,) int64: the objects of image i
    are rows [object_offsets[i], object_offsets[i+1]) of boxes_xywh (A, 4) float32,
    labels (A,) int64, area (A,) float32, iscrowd (A,) int64, in the json's order;
    category_ids (C,) int64 from the json's "categories"; annotation_category_ids (K,) int64:
    the distinct ids of all its annotations (those of unlisted images too); category_names (C,)
    str: the names of the "categories" entries, aligned with category_ids.
    """

    image_ids: np.ndarray
    image_sizes: np.ndarray
    names: np.ndarray
    name_offsets: np.ndarray
    object_offsets: np.ndarray
    boxes_xywh: np.ndarray
    labels: np.ndarray
    area: np.ndarray
    iscrowd: np.ndarray
    category_ids: np.ndarray
    annotation_category_ids: np.ndarray
    category_names: np.ndarray

    @classmethod
    def from_json(cls, ann_file: Path) -> "FlatCocoAnnotations":
        """Parses ``ann_file`` once; raises FileNotFoundError / ValueError naming the file."""
        ann_file = Path(ann_file)
        if not ann_file.is_file():
            raise FileNotFoundError(f"annotation file not found: {ann_file}")
        try:
            with open(ann_file, "rb") as handle:
                content = json.load(handle, object_hook=_without_segmentation)
            if not isinstance(content, dict):
                raise ValueError(f"top level is a {type(content).__name__}, not an object")
            flat = cls._from_dicts(content.get("images", []), content.get("annotations", []),
                                   content.get("categories", []))
        except (ValueError, KeyError, TypeError, UnicodeError) as error:
            raise ValueError(f"cannot parse COCO annotation file {ann_file}: {error!r}") from error
        del content
        _return_freed_memory()
        return flat

    @classmethod
    def _from_dicts(cls, images: List[dict], annotations: List[dict],
                    categories: List[dict]) -> "FlatCocoAnnotations":
        unsorted_ids = _int_array((image["id"] for image in images), "image ids")
        order = np.argsort(unsorted_ids, kind="stable")
        image_ids = unsorted_ids[order]
        repeated = image_ids[1:][image_ids[1:] == image_ids[:-1]]
        if repeated.size:
            raise ValueError(f"image id(s) {sorted(set(repeated.tolist()))[:10]} appear more than once")
        sorted_images = [images[i] for i in order]
        image_sizes = np.array([[_size_entry(image, "width"), _size_entry(image, "height")]
                                for image in sorted_images], dtype=np.int64).reshape(-1, 2)
        encoded = [str(image["file_name"]).encode("utf-8") for image in sorted_images]
        name_offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(name) for name in encoded], dtype=np.int64, out=name_offsets[1:])
        names = np.frombuffer(b"".join(encoded), dtype=np.uint8)

        owner_ids = _int_array((ann["image_id"] for ann in annotations), "annotation image ids")
        labels = _int_array((ann["category_id"] for ann in annotations), "category ids")
        # Objects of images the json does not list can never be loaded: they are left out.
        owner = np.searchsorted(image_ids, owner_ids)
        listed = owner < len(image_ids)
        listed[listed] = image_ids[owner[listed]] == owner_ids[listed]
        by_image = np.flatnonzero(listed)[np.argsort(owner[listed], kind="stable")]
        object_offsets = np.zeros(len(image_ids) + 1, dtype=np.int64)
        np.cumsum(np.bincount(owner[listed], minlength=len(image_ids)), dtype=np.int64, out=object_offsets[1:])
        boxes = np.array([ann["bbox"] for ann in annotations], dtype=np.float64).reshape(-1, XYWH)
        area = np.array([float(ann["area"]) for ann in annotations], dtype=np.float64)
        iscrowd = _int_array((ann.get("iscrowd", 0) for ann in annotations), "iscrowd flags")
        return cls(
            image_ids=image_ids, image_sizes=image_sizes, names=names, name_offsets=name_offsets,
            object_offsets=object_offsets,
            boxes_xywh=boxes[by_image].astype(np.float32),  # rounded like torch.as_tensor(float32)
            labels=labels[by_image], area=area[by_image].astype(np.float32),
            iscrowd=iscrowd[by_image],
            category_ids=_int_array((category["id"] for category in categories), "category ids"),
            annotation_category_ids=np.unique(labels),
            category_names=np.array([str(c.get("name", c["id"])) for c in categories], dtype=np.str_))

    def __len__(self) -> int:
        return len(self.image_ids)

    def file_name(self, index: int) -> str:
        start, end = self.name_offsets[index], self.name_offsets[index + 1]
        return self.names[start:end].tobytes().decode("utf-8")

    def annotated_size(self, index: int) -> Optional[Tuple[int, int]]:
        """(width, height) the json gives for image ``index``, None if it gives none."""
        width, height = self.image_sizes[index].tolist()
        return None if UNKNOWN_SIZE in (width, height) else (width, height)

    def target(self, index: int, *, width: int, height: int) -> Target:
        """DETR target of image ``index`` decoded at ``width`` x ``height`` (``target_from_arrays``)."""
        objects = slice(self.object_offsets[index], self.object_offsets[index + 1])
        return target_from_arrays(boxes_xywh=self.boxes_xywh[objects], labels=self.labels[objects],
                                  area=self.area[objects], iscrowd=self.iscrowd[objects],
                                  image_id=self.image_ids[index], width=width, height=height)

    def used_category_ids(self) -> np.ndarray:
        """Sorted distinct ids of the "categories" entries and of all annotations."""
        return np.union1d(self.category_ids, self.annotation_category_ids)


# --------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------
class CocoDetection(torch.utils.data.Dataset):
    """COCO-format detection dataset; item = (image tensor (3, H, W), target dict).

    img_folder: folder the ``file_name`` entries are relative to; ann_file: COCO json;
    transforms: joint (PIL image, target) transform, or None to get the PIL image back;
    apply_exif: see ``load_image``. Items are ordered by image id.
    """

    def __init__(self, *, img_folder: Path, ann_file: Path, transforms: Optional[Callable],
                 apply_exif: bool = False):
        img_folder = Path(img_folder)
        if not img_folder.is_dir():
            raise FileNotFoundError(f"image folder not found: {img_folder}")
        self.img_folder = img_folder
        self.ann_file = Path(ann_file)
        self.annotations = FlatCocoAnnotations.from_json(self.ann_file)
        self._transforms = transforms
        self.apply_exif = apply_exif

    @property
    def ids(self) -> np.ndarray:
        """(len,) int64 image ids in item order."""
        return self.annotations.image_ids

    @functools.cached_property
    def coco(self):
        """The pycocotools COCO object of ``ann_file`` (evaluation ground truth), built on first use."""
        return load_coco_api(self.ann_file)

    def __getstate__(self) -> dict:
        # Workers started by pickling (spawn) never need the evaluation ground truth.
        state = dict(self.__dict__)
        state.pop("coco", None)
        return state

    def __len__(self) -> int:
        return len(self.annotations)

    def _load_image(self, index: int) -> Image.Image:
        path = self.img_folder / self.annotations.file_name(index)
        image = load_image(path, self.apply_exif)
        expected = self.annotations.annotated_size(index)
        if expected is not None and image.size != expected:
            # boxes are clipped to the decoded size: a mismatch would cut or misplace objects silently
            how = ("turned upright per its EXIF orientation tag (--apply_exif; without it the stored bitmap is read)"
                   if self.apply_exif else
                   "read as stored, as the official loader reads it; if the dataset was annotated on photos "
                   "turned upright by their EXIF orientation tag, pass --apply_exif")
            raise ImageSizeMismatchError(
                f"{path} (image id {self.ids[index]}) is {image.width} x {image.height} (width x height), but "
                f"{self.ann_file} says {expected[0]} x {expected[1]}. The image was {how}")
        return image

    def __getitem__(self, key: Union[int, SampleKey]) -> Tuple[Any, Target]:
        """key: an index (the transforms draw from python's global ``random``), or the training
        sampler's ``SampleKey`` (they draw from a stream seeded by its seed, epoch and index)."""
        if isinstance(key, SampleKey):
            with augmentation_draws(key):
                return self[key.index]
        image = self._load_image(key)
        target = self.annotations.target(key, width=image.width, height=image.height)
        if self._transforms is not None:
            image, target = self._transforms(image, target)
        return image, target


# --------------------------------------------------------------------------------------
# Checks and build
# --------------------------------------------------------------------------------------
def check_category_ids(category_ids: Iterable[int], *, num_classes: int, ann_file: str) -> None:
    """Checks that every category id fits the classifier (one logit per id, 0..num_classes-1).

    category_ids: all ids of the file (its categories and its annotations).
    Raises ValueError naming the bad ids and ``ann_file`` if any id is negative or
    >= num_classes. Warns when num_classes != max id + 1 (wasted logits), except for COCO's
    convention of 91 classes when at least half of them can be used (COCO's ids have gaps).
    """
    all_ids = {int(i) for i in category_ids}
    bad = sorted(i for i in all_ids if not 0 <= i < num_classes)
    if bad:
        raise ValueError(f"category id(s) {bad} in {ann_file} are outside [0, {num_classes - 1}] "
                         f"(num_classes={num_classes}); set --num_classes to max id + 1")
    if not all_ids:
        warnings.warn(f"{ann_file} defines no categories and no annotations")
        return
    needed = max(all_ids) + 1
    coco_like = num_classes == COCO_NUM_CLASSES and 2 * needed > COCO_NUM_CLASSES
    if num_classes != needed and not coco_like:
        warnings.warn(f"num_classes={num_classes} but the largest category id in {ann_file} is "
                      f"{needed - 1}: {num_classes - needed} logits will never be trained; pass "
                      f"--num_classes {needed}")


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
    """COCO-format dataset for 'train', 'val' or 'test' (test-dev: images only, read as 'val').

    Reads args.coco_path, args.{train,val}_img_dir, args.{train,val}_ann, args.scales,
    args.max_size, args.val_size, args.apply_exif, args.masks and args.num_classes (missing ones take defaults;
    num_classes None skips the category check).
    """
    if getattr(args, "masks", False):
        raise NotImplementedError("segmentation (--masks) is not supported by this codebase")
    img_folder, ann_file = dataset_paths(image_set, args)
    for path, is_ok in ((img_folder, img_folder.is_dir()), (ann_file, ann_file.is_file())):
        if not is_ok:
            raise FileNotFoundError(f"{image_set} data: missing {path}")
    transforms = make_coco_transforms(
        "val" if image_set == "test" else image_set,
        scales=getattr(args, "scales", None) or DEFAULT_TRAIN_SCALES,
        max_size=getattr(args, "max_size", None) or DEFAULT_MAX_SIZE,
        val_size=getattr(args, "val_size", None) or DEFAULT_VAL_SIZE,
    )
    dataset = CocoDetection(img_folder=img_folder, ann_file=ann_file, transforms=transforms,
                            apply_exif=getattr(args, "apply_exif", False))
    num_classes = getattr(args, "num_classes", None)
    if num_classes is not None:
        check_category_ids(dataset.annotations.used_category_ids(), num_classes=num_classes,
                           ann_file=str(ann_file))
    return dataset
