"""SAM-DETR models. `build_model(args)` returns (model, criterion, postprocessors) as in DETR."""
from .sam_detr import SAMDETR, PostProcess, build
from .weights import CheckpointMismatchError, load_weights


def build_model(args):
    return build(args)


__all__ = ["SAMDETR", "PostProcess", "build_model", "load_weights", "CheckpointMismatchError"]
