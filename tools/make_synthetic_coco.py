"""Writes a small COCO-format dataset of coloured shapes (see datasets/synthetic.py).

Example:
    python tools/make_synthetic_coco.py --out data/shapes --num_train 64 --num_val 16 --image_size 160 --seed 0
then train with --coco_path data/shapes --num_classes 4. Another task, for fine-tuning:
    python tools/make_synthetic_coco.py --out data/shapes2 --classes ring cross square
"""
import argparse
import sys
import time
from pathlib import Path

# Run as a script, python puts tools/ (not the repository root) on the import path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datasets.synthetic import DEFAULT_CLASSES, SHAPES, categories_of, make_synthetic_coco  # noqa: E402

MIN_IMAGE_SIZE = 32  # below this the smallest objects shrink to a few pixels


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output root (gets train2017/, val2017/, annotations/)")
    parser.add_argument("--num_train", type=int, default=64)
    parser.add_argument("--num_val", type=int, default=16)
    parser.add_argument("--image_size", type=int, default=160, help="typical image side; each side varies by +-25%%")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classes", nargs="+", default=list(DEFAULT_CLASSES), choices=SHAPES, metavar="SHAPE",
                        help=f"the shapes drawn, category ids 1, 2, ... in this order (of {', '.join(SHAPES)})")
    args = parser.parse_args(argv)
    if args.image_size < MIN_IMAGE_SIZE:
        parser.error(f"--image_size must be >= {MIN_IMAGE_SIZE}, got {args.image_size}")
    if args.num_train < 0 or args.num_val < 0:
        parser.error("--num_train and --num_val must be >= 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.time()
    ann_files = make_synthetic_coco(out_dir=args.out, num_train=args.num_train, num_val=args.num_val,
                                    image_size=args.image_size, seed=args.seed, classes=args.classes)
    num_classes = max(c["id"] for c in categories_of(args.classes)) + 1
    print(f"wrote {args.num_train} train + {args.num_val} val images to {args.out} in {time.time() - start:.1f}s")
    for split, path in ann_files.items():
        print(f"  {split}: {path}")
    print(f"use --coco_path {args.out} --num_classes {num_classes}")


if __name__ == "__main__":
    main()
