"""A ResNet whose features already mean something, made on the CPU in minutes: the stand-in for
ImageNet weights in small-scale experiments (see the convergence benchmark).

It trains a torchvision ResNet from random weights to tell which shapes an image of the generated
shapes task holds (multi-label: one sigmoid per shape of datasets.synthetic.SHAPES, all five, so
that the features know every shape any task draws), with ordinary BatchNorm, then writes its state
dict in torchvision's format, the classifier included:

    python tools/pretrain_backbone.py --out output/backbones/resnet18_shapes.pth
    python main.py ... --backbone resnet18 --backbone_weights output/backbones/resnet18_shapes.pth

The detector then loads it as it loads ImageNet weights, with the official frozen BatchNorm (its
running statistics are the ones learnt here). The images are drawn afresh for every step (no
file is written); a held-out set, drawn from another seed, measures the per-shape accuracy at
the end, so that "means something" is a number.
"""
import argparse
import sys
import time
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import torch
import torchvision
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from datasets.synthetic import SHAPES, make_image  # noqa: E402
from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from util.checkpoint import save_checkpoint  # noqa: E402

HELD_OUT_SEED_OFFSET = 1_000_003  # the held-out images come from another stream than the training ones
DECISION_THRESHOLD = 0.5  # a shape is "present" when its sigmoid reaches this


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the state dict (torchvision's format) to write")
    parser.add_argument("--backbone", default="resnet18", choices=["resnet18", "resnet34", "resnet50", "resnet101"])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--image_size", type=int, default=128, help="typical image side, as tools/make_synthetic_coco.py")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--held_out", type=int, default=256, help="images that measure the accuracy at the end")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--print_freq", type=int, default=50)
    args = parser.parse_args(argv)
    if min(args.steps, args.batch_size, args.held_out) < 1:
        parser.error("--steps, --batch_size and --held_out must be >= 1")
    return args


def to_tensor(image) -> Tensor:
    """A PIL image -> (3, H, W) float, normalised as the detector normalises its input."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (pixels - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def draw_batch(rng: np.random.Generator, count: int, image_size: int) -> Tuple[Tensor, Tensor]:
    """`count` images of all shapes, cropped to one size -> images (N, 3, S, S), presence (N, len(SHAPES))."""
    images, present = [], torch.zeros(count, len(SHAPES))
    for i in range(count):
        image, objects = make_image(rng, image_size=image_size, classes=SHAPES)
        side = min(image.size)
        # the centre square: every object is at least MIN_OBJECT_FRACTION of the short side, but may
        # lie outside the crop; presence counts the objects whose centre the crop holds
        left, top = (image.width - side) // 2, (image.height - side) // 2
        images.append(to_tensor(image.crop((left, top, left + side, top + side)).resize((image_size, image_size))))
        for obj in objects:
            x, y, w, h = obj["bbox"]
            if left <= x + w / 2 < left + side and top <= y + h / 2 < top + side:
                present[i, obj["category_id"] - 1] = 1
    return torch.stack(images), present


def build(backbone: str) -> nn.Module:
    model = torchvision.models.get_model(backbone, weights=None)
    model.fc = nn.Linear(model.fc.in_features, len(SHAPES))
    return model


def accuracy(model: nn.Module, images: Tensor, present: Tensor) -> List[float]:
    """Per shape, the fraction of held-out images whose presence the model tells right."""
    model.eval()
    with torch.no_grad():
        predicted = model(images).sigmoid() >= DECISION_THRESHOLD
    return (predicted == present.bool()).float().mean(0).tolist()


def train(args: argparse.Namespace) -> Tuple[nn.Module, List[float], float]:
    """-> (the trained ResNet, per-shape held-out accuracy, seconds)."""
    torch.manual_seed(args.seed)
    model = build(args.backbone)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    rng = np.random.default_rng(args.seed)
    start = time.time()
    for step in range(args.steps):
        model.train()
        images, present = draw_batch(rng, args.batch_size, args.image_size)
        loss = nn.functional.binary_cross_entropy_with_logits(model(images), present)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % args.print_freq == 0 or step == args.steps - 1:
            print(f"step {step}/{args.steps}  loss {loss.item():.4f}  {time.time() - start:.0f} s", flush=True)
    held_out = draw_batch(np.random.default_rng(args.seed + HELD_OUT_SEED_OFFSET), args.held_out, args.image_size)
    return model, accuracy(model, *held_out), time.time() - start


def chance(present_rates: Sequence[float]) -> List[float]:
    """The accuracy of always answering the more frequent of present / absent, per shape."""
    return [max(rate, 1 - rate) for rate in present_rates]


def main(argv=None) -> List[float]:
    args = parse_args(argv)
    model, per_shape, seconds = train(args)
    _, present = draw_batch(np.random.default_rng(args.seed + HELD_OUT_SEED_OFFSET), args.held_out, args.image_size)
    baseline = chance(present.mean(0).tolist())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model.state_dict(), args.out)
    print(f"{args.backbone}: {args.steps} steps of {args.batch_size} images in {seconds / 60:.1f} min; held-out "
          f"accuracy per shape (always-the-majority in brackets): "
          + ", ".join(f"{name} {acc:.2f} ({base:.2f})" for name, acc, base in zip(SHAPES, per_shape, baseline)))
    print(f"wrote {args.out}: use it with --backbone {args.backbone} --backbone_weights {args.out}")
    return per_shape


if __name__ == "__main__":
    main()
