"""Joint image + target augmentation for DETR-style detection training.

Every transform is a callable ``(image, target) -> (image, target)``. Until ``ToTensor`` the
image is a PIL image or a (3, H, W) uint8 tensor (``PILToUint8Tensor``; any strides); the
geometric transforms accept both and keep the type. ``target`` is a dict with

* ``boxes``    (N, 4) float, xyxy in absolute pixels (normalised cxcywh after ``Normalize``),
* ``labels``   (N,) int64, ``area`` (N,) float, ``iscrowd`` (N,) int64,
* ``image_id`` (1,), ``orig_size`` (2,) = [h, w] of the file, ``size`` (2,) = [h, w] now.

Per-object fields are filtered together whenever objects are dropped. Transforms never modify
the target they receive; they return an updated shallow copy.

The semantics follow DETR / SAM-DETR (resize rule, box scaling, crop clipping and dropping,
flip, ImageNet normalisation, p=0.5 choices). All randomness is drawn from python's ``random``
module, so ``random.seed(s)`` alone makes a pipeline reproducible; training seeds it for each item
from (seed, epoch, index) (``datasets.sampling``).

The training recipe runs on uint8 tensors: torch's antialiased bilinear resize of a uint8
image (the same filter as PIL's, within one grey level) is several times faster than PIL's, and
converting to float once, at the end, is much cheaper than ``to_tensor`` on a PIL image. The
random draws, sizes, crops and targets are identical to the PIL path. Evaluation stays on PIL,
pixel-identical to the official preprocessing.

Differences from the official code:

* The random crop position is drawn with ``random.randint`` instead of ``torch.randint``
  (the official mixes the two generators; here seeding python ``random`` is sufficient).
  The sequence of crop sizes and the other python-``random`` draws are in the same order.
* ``RandomSizeCrop`` on an image smaller than its ``min_size`` crops the whole side instead
  of raising (the official ``random.randint(min, smaller)`` fails there).
* ``resize`` only takes a scalar target size for the shorter side (the official also accepts
  an explicit (w, h) pair, which the training recipe never uses).
* Segmentation masks are not supported.
* ``make_coco_transforms`` scales the crop-branch sizes with ``val_size / 800`` (identical to
  the official at the default ``val_size=800``).
"""
import random
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as NF
import torchvision.transforms.functional as F
from PIL import Image

from util.box_ops import box_xyxy_to_cxcywh

Target = Dict[str, torch.Tensor]
Picture = Union[Image.Image, torch.Tensor]  # PIL image or (3, H, W) uint8 tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Official DETR training recipe (at an evaluation size of 800 pixels).
DEFAULT_TRAIN_SCALES = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
DEFAULT_MAX_SIZE = 1333
DEFAULT_VAL_SIZE = 800
REFERENCE_VAL_SIZE = 800  # the size the crop-branch numbers below were tuned for
CROP_BRANCH_RESIZE_SIZES = (400, 500, 600)
CROP_BRANCH_MIN_CROP = 384
CROP_BRANCH_MAX_CROP = 600
DEFAULT_FLIP_PROB = 0.5
DEFAULT_SELECT_PROB = 0.5
UINT8_MAX = 255.0
BACKENDS = ("tensor", "pil")  # what the training augmentation runs on

# Fields holding one entry per object; they are filtered together when objects are dropped.
PER_OBJECT_FIELDS = ("boxes", "labels", "area", "iscrowd")


# --------------------------------------------------------------------------------------
# Functional forms
# --------------------------------------------------------------------------------------
def image_wh(image: Picture) -> Tuple[int, int]:
    """(width, height) of a PIL image or of a (..., H, W) tensor."""
    if isinstance(image, torch.Tensor):
        return image.shape[-1], image.shape[-2]
    return image.size


def _keep_objects(target: Target, keep: torch.Tensor) -> Target:
    """Filters every per-object field of ``target`` with the (N,) bool mask ``keep``."""
    for field in PER_OBJECT_FIELDS:
        if field in target:
            target[field] = target[field][keep]
    return target


def crop(image: Picture, target: Target, *, top: int, left: int, height: int,
         width: int) -> Tuple[Picture, Target]:
    """Crops the region [top, top+height) x [left, left+width).

    Boxes are shifted and clipped to the region; boxes left with zero width or height are
    dropped together with their labels/area/iscrowd. ``area`` becomes the clipped box area
    (as in the official code) and ``size`` becomes [height, width].
    """
    cropped = F.crop(image, top, left, height, width)
    target = dict(target)
    target["size"] = torch.tensor([height, width])
    if "boxes" in target:
        corners = target["boxes"].reshape(-1, 2, 2) - torch.tensor([left, top], dtype=torch.float32)
        limit = torch.tensor([width, height], dtype=torch.float32)
        corners = torch.minimum(corners, limit).clamp(min=0)
        extent = corners[:, 1, :] - corners[:, 0, :]  # (N, 2) = width, height
        target["boxes"] = corners.reshape(-1, 4)
        target["area"] = extent.prod(dim=1)
        target = _keep_objects(target, (extent > 0).all(dim=1))
    return cropped, target


def hflip(image: Picture, target: Target) -> Tuple[Picture, Target]:
    """Mirrors the image left-right; box x-coordinates become ``width - x`` (x1/x2 swapped)."""
    flipped = F.hflip(image)
    width, _ = image_wh(image)
    target = dict(target)
    if "boxes" in target:
        x1, y1, x2, y2 = target["boxes"].unbind(-1)
        target["boxes"] = torch.stack([width - x2, y1, width - x1, y2], dim=-1)
    return flipped, target


def resized_hw(*, width: int, height: int, size: int, max_size: Optional[int]) -> Tuple[int, int]:
    """Output (h, w) of the DETR resize rule.

    The shorter side goes to ``size`` unless the longer side would then exceed ``max_size``,
    in which case ``size`` is lowered to ``round(max_size * short / long)``. The longer side is
    truncated (``int``), exactly like the official rule; same-size inputs are left untouched.
    """
    short_side, long_side = float(min(width, height)), float(max(width, height))
    if max_size is not None and long_side / short_side * size > max_size:
        size = int(round(max_size * short_side / long_side))
    if min(width, height) == size:
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def resize_uint8(image: torch.Tensor, *, height: int, width: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, height, width) uint8, antialiased bilinear like PIL's resize.

    Calls torch directly: its uint8 kernel is fast on channels-last memory (how a decoded image
    is laid out); torchvision's tensor resize of the same image measured about 6x slower.
    """
    batch = image.unsqueeze(0)
    if not batch.is_contiguous(memory_format=torch.channels_last):
        batch = batch.contiguous(memory_format=torch.channels_last)
    return NF.interpolate(batch, size=(height, width), mode="bilinear", antialias=True,
                          align_corners=False)[0]


def resize(image: Picture, target: Optional[Target], *, size: int,
           max_size: Optional[int] = None) -> Tuple[Picture, Optional[Target]]:
    """Resizes with ``resized_hw`` and scales boxes and area by the actual per-axis ratios."""
    in_w, in_h = image_wh(image)
    out_h, out_w = resized_hw(width=in_w, height=in_h, size=size, max_size=max_size)
    if (out_h, out_w) == (in_h, in_w):
        resized = image
    elif isinstance(image, torch.Tensor):
        resized = resize_uint8(image, height=out_h, width=out_w)
    else:
        resized = F.resize(image, [out_h, out_w])
    if target is None:
        return resized, None
    ratio_w = float(out_w) / float(in_w)
    ratio_h = float(out_h) / float(in_h)
    target = dict(target)
    if "boxes" in target:
        target["boxes"] = target["boxes"] * torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h])
    if "area" in target:
        target["area"] = target["area"] * (ratio_w * ratio_h)
    target["size"] = torch.tensor([out_h, out_w])
    return resized, target


# --------------------------------------------------------------------------------------
# Transform objects
# --------------------------------------------------------------------------------------
class Compose:
    """Applies transforms in order."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image, target):
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = "".join(f"\n    {t!r}" for t in self.transforms)
        return f"{type(self).__name__}({inner}\n)"


class RandomHorizontalFlip:
    """Flips with probability ``p`` (one ``random.random()`` draw)."""

    def __init__(self, p: float = DEFAULT_FLIP_PROB):
        self.p = p

    def __call__(self, image, target):
        if random.random() < self.p:
            return hflip(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


class RandomResize:
    """Resizes the shorter side to a size picked uniformly from ``sizes`` (``random.choice``)."""

    def __init__(self, sizes: Sequence[int], max_size: Optional[int] = None):
        if not isinstance(sizes, (list, tuple)) or len(sizes) == 0:
            raise ValueError(f"RandomResize needs a non-empty list of sizes, got {sizes!r}")
        self.sizes = list(sizes)
        self.max_size = max_size

    def __call__(self, image, target=None):
        return resize(image, target, size=random.choice(self.sizes), max_size=self.max_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sizes={self.sizes}, max_size={self.max_size})"


class RandomSizeCrop:
    """Crops a random region with sides drawn from [min_size, min(image side, max_size)].

    Draw order (python ``random``): crop width, crop height, then top, left.
    """

    def __init__(self, min_size: int, max_size: int):
        if not 0 < min_size <= max_size:
            raise ValueError(f"RandomSizeCrop needs 0 < min_size <= max_size, got {min_size}, {max_size}")
        self.min_size = min_size
        self.max_size = max_size

    def _side(self, image_side: int) -> int:
        upper = min(image_side, self.max_size)
        # An image smaller than min_size is cropped to its full side rather than failing.
        return random.randint(min(self.min_size, upper), upper)

    def __call__(self, image, target):
        image_width, image_height = image_wh(image)
        width = self._side(image_width)
        height = self._side(image_height)
        top = random.randint(0, image_height - height)
        left = random.randint(0, image_width - width)
        return crop(image, target, top=top, left=left, height=height, width=width)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(min_size={self.min_size}, max_size={self.max_size})"


class RandomSelect:
    """Applies ``first`` with probability ``p``, otherwise ``second`` (one ``random.random()``)."""

    def __init__(self, first: Callable, second: Callable, p: float = DEFAULT_SELECT_PROB):
        self.first = first
        self.second = second
        self.p = p

    def __call__(self, image, target):
        if random.random() < self.p:
            return self.first(image, target)
        return self.second(image, target)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p},\n  {self.first!r},\n  {self.second!r})"


class PILToUint8Tensor:
    """PIL RGB image -> (3, H, W) uint8 tensor over its (H, W, 3) pixels (channels-last strides)."""

    def __call__(self, image, target):
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode!r}")
        # np.array, not np.asarray: torch wants a writable buffer (asarray views PIL's bytes).
        return torch.from_numpy(np.array(image)).permute(2, 0, 1), target

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ToTensor:
    """PIL image or (3, H, W) uint8 tensor -> contiguous (3, H, W) float tensor in [0, 1]."""

    def __call__(self, image, target):
        if not isinstance(image, torch.Tensor):
            return F.to_tensor(image), target
        if image.dtype != torch.uint8:
            raise ValueError(f"ToTensor takes a PIL image or a uint8 tensor, got a {image.dtype} tensor")
        pixels = image.to(torch.float32, memory_format=torch.contiguous_format)
        return pixels.div_(UINT8_MAX), target

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Normalize:
    """Normalises a (3, H, W) tensor and turns xyxy pixel boxes into cxcywh in [0, 1] units."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = list(mean)
        self.std = list(std)

    def __call__(self, image: torch.Tensor, target: Optional[Target] = None):
        image = F.normalize(image, mean=self.mean, std=self.std)
        if target is None:
            return image, None
        target = dict(target)
        if "boxes" in target:
            height, width = image.shape[-2:]
            scale = torch.tensor([width, height, width, height], dtype=torch.float32)
            target["boxes"] = box_xyxy_to_cxcywh(target["boxes"]) / scale
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


# --------------------------------------------------------------------------------------
# The COCO recipe
# --------------------------------------------------------------------------------------
def _scaled(sizes: Sequence[int], factor: float) -> List[int]:
    return [max(1, int(round(s * factor))) for s in sizes]


def make_coco_transforms(image_set: str, scales: Sequence[int] = DEFAULT_TRAIN_SCALES,
                         max_size: int = DEFAULT_MAX_SIZE, val_size: int = DEFAULT_VAL_SIZE,
                         train_backend: str = "tensor") -> Compose:
    """DETR's augmentation for ``image_set`` 'train' or 'val'; takes a PIL image.

    train: flip, then either multi-scale resize or (resize, random crop, multi-scale resize);
    val: resize the shorter side to ``val_size`` (longer side <= ``max_size``). Both end with
    ToTensor + ImageNet Normalize. The crop-branch sizes (400/500/600, crop 384..600) are
    multiplied by ``val_size / 800`` so that small-image configurations keep the proportions.
    train_backend: 'tensor' augments uint8 tensors (fast), 'pil' PIL images like the official.
    """
    if train_backend not in BACKENDS:
        raise ValueError(f"unknown train_backend {train_backend!r}; expected one of {BACKENDS}")
    normalize = Compose([ToTensor(), Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    if image_set == "train":
        factor = val_size / REFERENCE_VAL_SIZE
        min_crop, max_crop = _scaled((CROP_BRANCH_MIN_CROP, CROP_BRANCH_MAX_CROP), factor)
        crop_branch = Compose([
            RandomResize(_scaled(CROP_BRANCH_RESIZE_SIZES, factor)),
            RandomSizeCrop(min_crop, max_crop),
            RandomResize(list(scales), max_size=max_size),
        ])
        return Compose([
            *([PILToUint8Tensor()] if train_backend == "tensor" else []),
            RandomHorizontalFlip(),
            RandomSelect(RandomResize(list(scales), max_size=max_size), crop_branch),
            normalize,
        ])
    if image_set == "val":
        return Compose([RandomResize([val_size], max_size=max_size), normalize])
    raise ValueError(f"unknown image_set {image_set!r}; expected 'train' or 'val'")
