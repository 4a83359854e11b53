"""SAM-DETR and the original DETR. `build_model(args)` returns (model, criterion, postprocessors)
as in DETR; `--meta_arch` chooses the detector (see models/meta_arch.py)."""
from typing import Callable, NamedTuple

from torch import nn

from . import detr, sam_detr
from .detr import DETR, DETRPostProcess
from .meta_arch import DEFAULT_META_ARCH, META_ARCHS, apply_meta_arch_defaults, meta_arch
from .sam_detr import SAMDETR, PostProcess
from .weights import CheckpointMismatchError, load_weights


class Architecture(NamedTuple):
    """What a --meta_arch is made of: its model class, its post-processor and its builder."""
    model_class: type
    postprocessor: Callable[[], nn.Module]
    build: Callable


ARCHITECTURES = {"sam_detr": Architecture(SAMDETR, PostProcess, sam_detr.build),
                 "detr": Architecture(DETR, DETRPostProcess, detr.build)}


def build_model(args):
    """(model, criterion, {"bbox": postprocessor}) of args.meta_arch; its defaults are applied to
    the flags left unset (in place)."""
    apply_meta_arch_defaults(args)
    return ARCHITECTURES[meta_arch(args)].build(args)


def meta_arch_of(model: nn.Module) -> str:
    """The --meta_arch of a built model (the default for a model of no known class)."""
    return next((name for name, arch in ARCHITECTURES.items() if isinstance(model, arch.model_class)),
                DEFAULT_META_ARCH)


def postprocessor(name: str) -> nn.Module:
    """A new post-processor of --meta_arch `name`, the one build_model pairs with its model."""
    if name not in ARCHITECTURES:
        raise ValueError(f"no post-processor for --meta_arch {name!r}; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name].postprocessor()


__all__ = ["ARCHITECTURES", "DETR", "DETRPostProcess", "META_ARCHS", "SAMDETR", "PostProcess", "build_model",
           "load_weights", "CheckpointMismatchError", "apply_meta_arch_defaults", "meta_arch_of", "postprocessor"]
