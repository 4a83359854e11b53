"""Writes a COCO-scale annotation file for loader benchmarks: instances_train2017's size and shape.

The default is COCO train2017: 118,287 images, 860,001 objects with polygon segmentations
(about 1% crowd objects with RLE masks), 80 of the ids 1..90, about 450 MB of json, images in
the json in shuffled id order. The images are symlinks to a handful of real JPEGs of COCO's
typical sizes, written by this tool, so the folder takes a few MB.

Example:
    python tools/make_coco_scale.py --out /tmp/coco_scale
gives /tmp/coco_scale/train2017/*.jpg and /tmp/coco_scale/annotations/instances_train2017.json.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image

COCO_TRAIN_IMAGES = 118_287
COCO_TRAIN_OBJECTS = 860_001
COCO_MAX_IMAGE_ID = 581_929
MISSING_CATEGORY_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)  # COCO skips these of 1..90
COCO_CATEGORY_IDS = tuple(i for i in range(1, 91) if i not in MISSING_CATEGORY_IDS)
# (width, height) of COCO's most common image sizes, with rough frequencies.
IMAGE_SIZES = ((640, 480), (480, 640), (640, 427), (427, 640), (500, 375), (640, 360))
SIZE_WEIGHTS = (0.35, 0.15, 0.2, 0.1, 0.1, 0.1)
OBJECTS_PER_IMAGE_SHAPE = 1.2  # gamma-distributed image weights: a long tail like COCO's
POLYGON_POINTS = (8, 44)  # points per polygon, uniform: about 26 on average, like COCO
CROWD_FRACTION = 0.01
RLE_RUNS = (20, 200)  # run lengths per crowd mask
MIN_BOX_SIDE = 2.0
POLYGON_FILL = 0.6  # polygon area / box area
JPEG_QUALITY = 90
CHUNK = 20_000  # objects formatted per write
IMAGE_NAME_DIGITS = 12


def _write_jpegs(folder: Path, rng: np.random.Generator) -> Dict[Tuple[int, int], str]:
    """One textured JPEG per size in IMAGE_SIZES (photo-like file sizes); returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = {}
    for width, height in IMAGE_SIZES:
        coarse = rng.uniform(0, 255, (height // 32 + 1, width // 32 + 1, 3)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
        noisy = smooth + rng.normal(0, 18, smooth.shape)
        name = f"{width}x{height}.jpg"
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / name, quality=JPEG_QUALITY)
        names[(width, height)] = name
    return names


def _objects_per_image(rng: np.random.Generator, num_images: int, num_objects: int) -> np.ndarray:
    """(num_images,) counts summing to num_objects; some images get none, a few get dozens."""
    weights = rng.gamma(OBJECTS_PER_IMAGE_SHAPE, size=num_images)
    return rng.multinomial(num_objects, weights / weights.sum())


def _polygon(rng: np.random.Generator, x: float, y: float, w: float, h: float) -> str:
    """A star-shaped polygon inside the box, as COCO writes it: [[x1,y1,x2,y2,...]]."""
    count = int(rng.integers(*POLYGON_POINTS))
    angles = np.sort(rng.uniform(0, 2 * np.pi, count))
    radius = rng.uniform(0.6, 1.0, count)
    xs = x + w / 2 * (1 + radius * np.cos(angles))
    ys = y + h / 2 * (1 + radius * np.sin(angles))
    coords = np.stack([xs, ys], axis=1).ravel().round(2).tolist()
    return "[[" + ",".join(map(repr, coords)) + "]]"


def _rle(rng: np.random.Generator, width: int, height: int) -> str:
    runs = rng.integers(*RLE_RUNS, size=int(rng.integers(20, 120))).tolist()
    return json.dumps({"counts": runs, "size": [height, width]}, separators=(",", ":"))


def _annotation_lines(rng: np.random.Generator, image_ids: np.ndarray, sizes: List[Tuple[int, int]],
                      counts: np.ndarray):
    """Yields chunks of comma-joined annotation objects, images in shuffled order."""
    owners = np.repeat(np.arange(len(image_ids)), counts)
    rng.shuffle(owners)
    lines = []
    for ann_id, owner in enumerate(owners.tolist(), start=1):
        width, height = sizes[owner]
        w = float(np.exp(rng.uniform(np.log(MIN_BOX_SIDE), np.log(width))))
        h = float(np.exp(rng.uniform(np.log(MIN_BOX_SIDE), np.log(height))))
        x, y = float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h))
        crowd = rng.random() < CROWD_FRACTION
        segmentation = _rle(rng, width, height) if crowd else _polygon(rng, x, y, w, h)
        bbox = ",".join(repr(round(v, 2)) for v in (x, y, w, h))
        lines.append(f'{{"segmentation":{segmentation},"area":{round(POLYGON_FILL * w * h, 4)!r},'
                     f'"iscrowd":{int(crowd)},"image_id":{int(image_ids[owner])},"bbox":[{bbox}],'
                     f'"category_id":{int(rng.choice(COCO_CATEGORY_IDS))},"id":{ann_id}}}')
        if len(lines) == CHUNK:
            yield ",".join(lines)
            lines = []
    if lines:
        yield ",".join(lines)


def write_coco_scale(out: Path, *, num_images: int = COCO_TRAIN_IMAGES, num_objects: int = COCO_TRAIN_OBJECTS,
                     seed: int = 0) -> Tuple[Path, Path]:
    """Writes out/train2017/ (symlinks) and out/annotations/instances_train2017.json.

    Returns (image folder, annotation file). The json is written to a temporary name and renamed.
    """
    if num_images < 1 or num_objects < 0 or num_images > COCO_MAX_IMAGE_ID:
        raise ValueError(f"need 1 <= num_images <= {COCO_MAX_IMAGE_ID} and num_objects >= 0, "
                         f"got {num_images}, {num_objects}")
    rng = np.random.default_rng(seed)
    out = Path(out)
    jpegs = _write_jpegs(out / "jpegs", rng)
    img_dir, ann_dir = out / "train2017", out / "annotations"
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    image_ids = rng.choice(np.arange(1, COCO_MAX_IMAGE_ID + 1), size=num_images, replace=False)
    size_index = rng.choice(len(IMAGE_SIZES), size=num_images, p=SIZE_WEIGHTS)
    sizes = [IMAGE_SIZES[i] for i in size_index.tolist()]
    images = []
    for image_id, (width, height) in zip(image_ids.tolist(), sizes):
        file_name = f"{image_id:0{IMAGE_NAME_DIGITS}d}.jpg"
        link = img_dir / file_name
        if not link.is_symlink():
            link.symlink_to(Path("..") / "jpegs" / jpegs[(width, height)])
        images.append(json.dumps({
            "license": 1, "file_name": file_name,
            "coco_url": f"http://images.cocodataset.org/train2017/{file_name}",
            "height": height, "width": width, "date_captured": "2013-11-14 11:18:45",
            "flickr_url": f"http://farm4.staticflickr.com/0000/{image_id}_0000000000_z.jpg", "id": image_id,
        }, separators=(",", ":")))
    categories = [{"supercategory": "thing", "id": i, "name": f"category{i}"} for i in COCO_CATEGORY_IDS]
    ann_file = ann_dir / "instances_train2017.json"
    partial = ann_file.with_name(ann_file.name + ".partial")
    counts = _objects_per_image(rng, num_images, num_objects)
    with open(partial, "w") as handle:
        handle.write('{"info":{"description":"COCO-scale benchmark data"},"licenses":[],"images":[')
        handle.write(",".join(images))
        handle.write('],"annotations":[')
        for index, chunk in enumerate(_annotation_lines(rng, image_ids, sizes, counts)):
            handle.write(("," if index else "") + chunk)
        handle.write('],"categories":' + json.dumps(categories, separators=(",", ":")) + "}")
    os.replace(partial, ann_file)
    return img_dir, ann_file


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder (outside the repository)")
    parser.add_argument("--num_images", type=int, default=COCO_TRAIN_IMAGES)
    parser.add_argument("--num_objects", type=int, default=COCO_TRAIN_OBJECTS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    img_dir, ann_file = write_coco_scale(args.out, num_images=args.num_images, num_objects=args.num_objects,
                                         seed=args.seed)
    print(f"wrote {ann_file} ({ann_file.stat().st_size / 2**20:.0f} MiB) and {args.num_images} image links "
          f"in {img_dir} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
