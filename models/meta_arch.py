"""`--meta_arch`: which detector `build_model` builds, and the flags whose defaults or meaning
depend on it.

Flags whose default differs between the architectures default to None on the command line, and
`apply_meta_arch_defaults` fills in the chosen architecture's value unless the flag was given.
Flags that mean nothing for an architecture are refused when given, with their names.
"""
from typing import Any, Dict

META_ARCHS = ("sam_detr", "detr")
DEFAULT_META_ARCH = "sam_detr"

# flag -> {architecture: default}; an architecture missing from a flag's dict has no use for it
ARCH_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "num_queries": {"sam_detr": 300, "detr": 100},
    "set_cost_class": {"sam_detr": 2.0, "detr": 1.0},
    "cls_loss_coef": {"sam_detr": 2.0, "detr": 1.0},
    "focal_alpha": {"sam_detr": 0.25},  # SAM-DETR's sigmoid focal loss
    "eos_coef": {"detr": 0.1},          # DETR's weight of the "no object" class
}
# Flags of SAM-DETR's architecture only -> the value that means "not given".
SAM_DETR_ONLY_FLAGS: Dict[str, Any] = {"smca": False, "multiscale": False, "roi_align": "auto",
                                       "lr_linear_proj_names": [],
                                       # the Semantics Aligner's ablation switches (models/decoder.py)
                                       "no_sam": False, "sam_resample": "salient", "sam_points": None,
                                       "no_sam_reweight": False, "sam_search": "box"}


def meta_arch(args) -> str:
    """args.meta_arch, the default for argument sets that predate the flag (official checkpoints)."""
    return getattr(args, "meta_arch", None) or DEFAULT_META_ARCH


def refused_flags(args) -> list:
    """The given flags that mean nothing for args' architecture, as `--flag` names."""
    arch = meta_arch(args)
    refused = [flag for flag, defaults in ARCH_DEFAULTS.items()
               if arch not in defaults and getattr(args, flag, None) is not None]
    if arch != DEFAULT_META_ARCH:
        refused += [flag for flag, unset in SAM_DETR_ONLY_FLAGS.items() if getattr(args, flag, unset) != unset]
    return [f"--{flag}" for flag in refused]


def apply_meta_arch_defaults(args) -> None:
    """Checks the architecture's flags and fills those left unset with its defaults (in place,
    idempotent). Raises ValueError naming an unknown --meta_arch or the flags it cannot use."""
    arch = meta_arch(args)
    if arch not in META_ARCHS:
        raise ValueError(f"--meta_arch {arch!r}: expected one of {', '.join(META_ARCHS)}")
    refused = refused_flags(args)
    if refused:
        raise ValueError(f"{', '.join(refused)} mean nothing for --meta_arch {arch}; leave them out")
    args.meta_arch = arch
    for flag, defaults in ARCH_DEFAULTS.items():
        if getattr(args, flag, None) is None and arch in defaults:
            setattr(args, flag, defaults[arch])
