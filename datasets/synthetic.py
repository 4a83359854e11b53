"""A tiny COCO-format dataset of coloured shapes, for smoke tests and CPU quick starts.

Layout (the official COCO one, so ``--coco_path`` works unchanged)::

    out_dir/train2017/*.jpg, out_dir/val2017/*.jpg,
    out_dir/annotations/instances_train2017.json, instances_val2017.json

Each image has 1-4 circles / squares / triangles (category ids 1, 2, 3) of any colour, so only
the shape tells the class. Other tasks draw other shapes of SHAPES (crosses, rings): ``classes``
names them, ids 1, 2, ... in that order (a fine-tuning task with some classes shared). They are 25-55% of the shorter image side, anywhere in the image,
and may overlap a little (up to MAX_OVERLAP of the smaller box), the later one drawn on top.
The background is cluttered with things that are not objects: smooth colour blotches, pixel
noise, thin lines and small blobs of the same saturated colours as the shapes (the detector has
to tell a shape from a speck by its form and size, not its colour). Image sizes vary around
``image_size`` to exercise padding. Output is a deterministic function of the seed.
"""
import colorsys
import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = (
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
)
SHAPES = ("circle", "square", "triangle", "cross", "ring")
DEFAULT_CLASSES = tuple(c["name"] for c in CATEGORIES)
CROSS_BAR_FRACTION = 1 / 3  # a cross's bars are this fraction of its side thick
RING_WIDTH_FRACTION = 0.2  # a ring's width, of its side
SPLITS = ("train", "val")
SIZE_JITTER = 0.25  # each image side is image_size * U(1 - jitter, 1 + jitter)
MIN_OBJECTS, MAX_OBJECTS = 1, 4
MIN_OBJECT_FRACTION, MAX_OBJECT_FRACTION = 0.25, 0.55  # of the shorter image side
TRIANGLE_ASPECT_JITTER = 0.3  # triangles get independent width/height within this ratio
MAX_OVERLAP = 0.25  # of the smaller box; keeps objects mostly visible
PLACEMENT_TRIES = 30
BACKGROUND_GRID = 4  # coarse random colour grid, upsampled smoothly
BACKGROUND_LEVEL, BACKGROUND_SPREAD = 110.0, 40.0
PIXEL_NOISE_STD = 12.0
MAX_LINES = 3  # clutter: 0..MAX_LINES straight lines across the image
LINE_WIDTH_FRACTION = 0.02  # of the shorter side (at least 1 pixel)
MAX_BLOBS = 4  # clutter: 0..MAX_BLOBS small ellipses, well below the smallest object
BLOB_FRACTION = (0.03, 0.08)  # blob diameter, of the shorter side
SHAPE_SATURATION = (0.7, 1.0)
SHAPE_VALUE = (0.75, 1.0)
JPEG_QUALITY = 90

Box = Tuple[int, int, int, int]  # x, y, width, height in pixels


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """(H, W, 3) float background: smooth colour blotches plus pixel noise."""
    coarse = BACKGROUND_LEVEL + BACKGROUND_SPREAD * rng.uniform(-1, 1, (BACKGROUND_GRID, BACKGROUND_GRID, 3))
    smooth = Image.fromarray(coarse.clip(0, 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    return np.asarray(smooth, dtype=np.float32)


def _clutter(rng: np.random.Generator, draw: ImageDraw.ImageDraw, width: int, height: int) -> None:
    """Draws the distractors: thin lines and small blobs, in the colours objects have."""
    short_side = min(width, height)
    line_width = max(1, round(LINE_WIDTH_FRACTION * short_side))
    for _ in range(int(rng.integers(0, MAX_LINES + 1))):
        ends = [(float(rng.uniform(0, width)), float(rng.uniform(0, height))) for _ in range(2)]
        draw.line(ends, fill=_colour(rng), width=line_width)
    for _ in range(int(rng.integers(0, MAX_BLOBS + 1))):
        w, h = (max(2, int(short_side * rng.uniform(*BLOB_FRACTION))) for _ in range(2))
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        draw.ellipse([x, y, x + w - 1, y + h - 1], fill=_colour(rng))


def _overlaps(box: Box, others: List[Box]) -> bool:
    """True if ``box`` covers more than MAX_OVERLAP of itself or of any box in ``others``."""
    x, y, w, h = box
    for ox, oy, ow, oh in others:
        inter_w = min(x + w, ox + ow) - max(x, ox)
        inter_h = min(y + h, oy + oh) - max(y, oy)
        if inter_w > 0 and inter_h > 0 and inter_w * inter_h > MAX_OVERLAP * min(w * h, ow * oh):
            return True
    return False


def _object_size(rng: np.random.Generator, shape: str, short_side: int) -> Tuple[int, int]:
    side = int(short_side * rng.uniform(MIN_OBJECT_FRACTION, MAX_OBJECT_FRACTION))
    if shape != "triangle":
        return side, side
    aspect = rng.uniform(1 - TRIANGLE_ASPECT_JITTER, 1 + TRIANGLE_ASPECT_JITTER)
    return side, max(2, min(int(side * aspect), short_side))


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: Box, colour: Tuple[int, int, int]) -> float:
    """Draws one shape of SHAPES filling ``box`` exactly; returns its area in pixels."""
    x, y, w, h = box
    right, bottom = x + w - 1, y + h - 1  # PIL coordinates are inclusive
    if shape == "circle":
        draw.ellipse([x, y, right, bottom], fill=colour)
        return float(np.pi * w * h / 4)
    if shape == "square":
        draw.rectangle([x, y, right, bottom], fill=colour)
        return float(w * h)
    if shape == "triangle":
        draw.polygon([(x, bottom), (right, bottom), (x + (w - 1) / 2, y)], fill=colour)
        return float(w * h / 2)
    if shape == "cross":
        bar = max(1, round(CROSS_BAR_FRACTION * min(w, h)))
        left, top = x + (w - bar) // 2, y + (h - bar) // 2
        draw.rectangle([left, y, left + bar - 1, bottom], fill=colour)
        draw.rectangle([x, top, right, top + bar - 1], fill=colour)
        return float(bar * (w + h - bar))
    if shape == "ring":
        width = max(1, round(RING_WIDTH_FRACTION * min(w, h)))
        draw.ellipse([x, y, right, bottom], outline=colour, width=width)
        return float(np.pi / 4 * (w * h - max(0, w - 2 * width) * max(0, h - 2 * width)))
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def _colour(rng: np.random.Generator) -> Tuple[int, int, int]:
    rgb = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(*SHAPE_SATURATION), rng.uniform(*SHAPE_VALUE))
    return tuple(int(255 * c) for c in rgb)


def make_image(rng: np.random.Generator, *, image_size: int,
               classes: Sequence[str] = DEFAULT_CLASSES) -> Tuple[Image.Image, List[Dict]]:
    """One RGB image and its objects as [{'category_id', 'bbox' (xywh), 'area'}]; the shape
    classes[i] has category id i + 1."""
    width, height = (int(round(image_size * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER))) for _ in range(2))
    image = Image.fromarray(_background(rng, width, height).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    _clutter(rng, draw, width, height)
    objects: List[Dict] = []
    for _ in range(int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))):
        category = int(rng.integers(0, len(classes))) + 1
        shape = classes[category - 1]
        w, h = _object_size(rng, shape, min(width, height))
        for _ in range(PLACEMENT_TRIES):
            box = (int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h)
            if not _overlaps(box, [o["bbox"] for o in objects]):
                area = _draw(draw, shape, box, _colour(rng))
                objects.append({"category_id": category, "bbox": box, "area": area})
                break
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, PIXEL_NOISE_STD, (height, width, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8)), objects


def categories_of(classes: Sequence[str]) -> List[Dict]:
    """The COCO categories of a task that draws `classes` (ids 1, 2, ... in order)."""
    unknown = [name for name in classes if name not in SHAPES]
    if unknown or len(set(classes)) != len(classes) or not classes:
        raise ValueError(f"classes must be distinct shapes of {', '.join(SHAPES)}; got {', '.join(classes) or 'none'}")
    return [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(classes)]


def make_split(*, img_dir: Path, num_images: int, image_size: int, seed: int, split_index: int,
               classes: Sequence[str] = DEFAULT_CLASSES) -> Dict:
    """Writes ``num_images`` JPEGs into ``img_dir`` and returns the COCO json dict."""
    rng = np.random.default_rng([seed, split_index])
    img_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        image, objects = make_image(rng, image_size=image_size, classes=classes)
        file_name = f"{image_id:012d}.jpg"
        image.save(img_dir / file_name, quality=JPEG_QUALITY)
        images.append({"id": image_id, "file_name": file_name, "width": image.width, "height": image.height})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": obj["category_id"],
                                "bbox": [float(v) for v in obj["bbox"]], "area": round(obj["area"], 2),
                                "iscrowd": 0})
    return {"info": {"description": "synthetic shapes", "version": "1.0"}, "licenses": [],
            "images": images, "annotations": annotations, "categories": categories_of(classes)}


def make_synthetic_coco(*, out_dir: Path, num_train: int, num_val: int, image_size: int,
                        seed: int, classes: Sequence[str] = DEFAULT_CLASSES) -> Dict[str, Path]:
    """Generates train and val splits under ``out_dir``; returns the annotation file paths."""
    categories_of(classes)  # unknown or repeated shapes stop before anything is written
    out_dir = Path(out_dir)
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    ann_files = {}
    for split_index, (split, count) in enumerate(zip(SPLITS, (num_train, num_val))):
        coco = make_split(img_dir=out_dir / f"{split}2017", num_images=count, image_size=image_size,
                          seed=seed, split_index=split_index, classes=classes)
        ann_files[split] = out_dir / "annotations" / f"instances_{split}2017.json"
        ann_files[split].write_text(json.dumps(coco))
    return ann_files
