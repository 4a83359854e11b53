"""How much the Semantics Aligner's reweighting has learnt: statistics of its gates on images.

Each SAM-DETR decoder layer scales the re-sampled content and its position embedding, per channel
and head, by sigmoid gates computed from the query (`attn1`, `attn2`; off with --no_sam_reweight).
At initialisation every gate sits near 0.5; a gate that has learnt to select sits near 0 or 1.
For each layer and gate this prints the mean gate, the mean distance from 0.5, and the share of
"decisive" gates (below 0.1 or above 0.9), for the trained checkpoint and, with --init, for the
same model freshly initialised (the checkpoint's flags and seed):

    python tools/aligner_gates.py --resume output/convergence/benchmark/sam_detr_seed42/checkpoint.pth --init
"""
import argparse
import sys
from pathlib import Path
from typing import Dict, List

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from datasets import build_dataset  # noqa: E402
from main import get_args_parser  # noqa: E402
from models import build_model  # noqa: E402
from util.checkpoint import load_checkpoint  # noqa: E402
from util.misc import nested_tensor_from_tensor_list  # noqa: E402

GATES = ("attn1", "attn2")  # content gate, position gate
DECISIVE = 0.1  # a gate below this or above 1 - this has chosen


def gate_values(model: nn.Module, images: List[Tensor]) -> Dict[str, Tensor]:
    """name of each gate layer -> every gate value it produced on `images`, one image at a time."""
    values: Dict[str, List[Tensor]] = {}
    hooks = [module.register_forward_hook(
                 lambda _m, _i, out, name=name: values.setdefault(name, []).append(out.sigmoid().flatten()))
             for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in GATES]
    if not hooks:
        raise SystemExit("the model has no reweighting gates (--no_sam, --no_sam_reweight or DETR)")
    try:
        with torch.no_grad():
            for image in images:
                model(nested_tensor_from_tensor_list([image]))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.cat(v) for name, v in values.items()}


def summary(gates: Tensor) -> Dict[str, float]:
    return {"mean": gates.mean().item(), "distance from 0.5": (gates - 0.5).abs().mean().item(),
            "decisive": ((gates < DECISIVE) | (gates > 1 - DECISIVE)).float().mean().item()}


def checkpoint_flags(checkpoint: dict) -> argparse.Namespace:
    """main.py's defaults with the flags the checkpoint was trained with."""
    args = get_args_parser().parse_args([])
    vars(args).update(checkpoint["args"])
    return args


def model_of(checkpoint: dict, trained: bool) -> nn.Module:
    args = checkpoint_flags(checkpoint)
    torch.manual_seed(args.seed)
    model, _, _ = build_model(args)
    if trained:
        model.load_state_dict(checkpoint["model"])
    return model.eval()


def main(argv=None) -> Dict[str, Dict[str, Dict[str, float]]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resume", required=True, help="a SAM-DETR checkpoint of main.py")
    parser.add_argument("--coco_path", default=None, help="the data (default: the checkpoint's)")
    parser.add_argument("--num_images", type=int, default=40, help="validation images to run")
    parser.add_argument("--init", action="store_true", help="also the same model freshly initialised")
    args = parser.parse_args(argv)
    checkpoint = load_checkpoint(args.resume)
    data_args = checkpoint_flags(checkpoint)
    if args.coco_path:
        data_args.coco_path = args.coco_path
    dataset = build_dataset("val", data_args)
    images = [dataset[i][0] for i in range(min(args.num_images, len(dataset)))]
    report = {}
    for state in (["initialised"] if args.init else []) + ["trained"]:
        report[state] = {name: summary(g) for name, g in
                         gate_values(model_of(checkpoint, state == "trained"), images).items()}
        for name, stats in report[state].items():
            print(f"{state:12s} {name:28s} " + "  ".join(f"{k} {v:.2f}" for k, v in stats.items()))
    return report


if __name__ == "__main__":
    main()
