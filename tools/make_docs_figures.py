"""Regenerates the README's quick-start pictures from the quick start's output.

Example (after the README's quick start and its demo command):
    python tools/make_docs_figures.py --run output/shapes --out docs

Reads RUN/log.txt and RUN/demo/detections.json (written by demo.py); writes
``quickstart_demo.png`` (the first --num_images validation images with the demo's boxes, names
and scores, enlarged so that the labels are readable) and ``quickstart_curves.png`` (the
training curves of tools/plot_logs.py, its default fields). Both are palette PNGs, small enough to commit.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import List, Sequence

from PIL import Image

# Run as a script, python puts tools/ (not the repository root) on the import path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import demo  # noqa: E402
from datasets.coco import load_image  # noqa: E402
from tools import plot_logs  # noqa: E402

DEMO_NAME, CURVES_NAME = "quickstart_demo.png", "quickstart_curves.png"
ENLARGE = 2  # the generated images are ~128 px: too small to read a drawn label
GAP = 4  # pixels between the tiles
PALETTE_COLOURS = 128  # palette PNG: a few times smaller than RGB, with no visible loss here


def demo_mosaic(records: Sequence[dict], num_images: int) -> Image.Image:
    """The first ``num_images`` images of ``records`` (demo.py's detections.json), enlarged by
    ENLARGE, with their detections drawn, side by side."""
    if len(records) < num_images:
        raise ValueError(f"detections.json lists {len(records)} images, fewer than --num_images {num_images}")
    tiles: List[Image.Image] = []
    for record in records[:num_images]:
        image = load_image(Path(record["image"]))
        big = image.resize((image.width * ENLARGE, image.height * ENLARGE), Image.BICUBIC)
        scaled = [{**det, "box_xyxy": [v * ENLARGE for v in det["box_xyxy"]]} for det in record["detections"]]
        tiles.append(demo.draw_detections(big, scaled))
    width = sum(t.width for t in tiles) + GAP * (len(tiles) - 1)
    mosaic = Image.new("RGB", (width, max(t.height for t in tiles)), "white")
    left = 0
    for tile in tiles:
        mosaic.paste(tile, (left, 0))
        left += tile.width + GAP
    return mosaic


def save_small_png(image: Image.Image, path: Path) -> None:
    image.quantize(PALETTE_COLOURS).save(path, optimize=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("output/shapes"),
                        help="the quick start's --output_dir (holds log.txt and demo/detections.json)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="folder for the two PNGs")
    parser.add_argument("--num_images", type=int, default=4, help="validation images in the demo picture")
    return parser.parse_args(argv)


def main(argv=None) -> List[Path]:
    args = parse_args(argv)
    detections = args.run / "demo" / demo.JSON_NAME
    if not detections.is_file():
        raise SystemExit(f"{detections} not found: run the README's demo command first")
    args.out.mkdir(parents=True, exist_ok=True)
    demo_png, curves_png = args.out / DEMO_NAME, args.out / CURVES_NAME
    save_small_png(demo_mosaic(json.loads(detections.read_text()), args.num_images), demo_png)
    plot_logs.plot_logs({args.run.name: plot_logs.read_log(args.run)},
                         plot_logs.DEFAULT_FIELDS, curves_png)
    save_small_png(Image.open(curves_png).convert("RGB"), curves_png)
    for path in (demo_png, curves_png):
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB)")
    return [demo_png, curves_png]


if __name__ == "__main__":
    main()
