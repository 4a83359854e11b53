"""Fine-tuning (--finetune): a new training run that starts from a trained detector, for a dataset
with other classes.

Everything but the class heads is loaded (name and shape must fit, or the error names the flag);
the class heads start as a new model's (SAM-DETR's focal prior bias included), except the rows of
the classes whose names the checkpoint and the new dataset share, which keep their trained values
(COCO's "person" stays a person detector). The optimizer, schedule, epoch and step start afresh,
and the model flags come from the checkpoint (util.resume.adopt_finetune_flags). Which checkpoint
starts the run is decided with the others in util.run_start: once the fine-tuning run has a
checkpoint of its own, --auto_resume continues that.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple

from torch import nn

from datasets.coco_categories import COCO_CATEGORY_NAMES, COCO_CLASS_ROWS
from models.detr import NO_OBJECT_LOGITS
from models.weights import class_head_rows, load_weights_but_class_heads, state_meta_arch

SHOWN_CLASSES = 12  # kept classes named in the summary line; the rest are counted


def _key(name: str) -> str:
    """Names compare without case and repeated spaces ("Traffic  Light" is "traffic light")."""
    return " ".join(str(name).lower().split())


def checkpoint_class_names(ckpt: Mapping[str, Any]) -> Tuple[Dict[int, str], str]:
    """(class id -> name of the checkpoint's head rows, a note on where the names come from).

    This project's checkpoints store the names of their training data; official SAM-DETR and DETR
    checkpoints store none, and a head of COCO's 91 ids is read as COCO 2017's categories."""
    stored = ckpt.get("class_names") or {}
    if stored:
        return {int(k): str(v) for k, v in stored.items()}, ""
    state = ckpt["model"]
    rows = class_head_rows(state) or 0
    classes = rows - (NO_OBJECT_LOGITS if state_meta_arch(state) == "detr" else 0)
    if classes == COCO_CLASS_ROWS:
        return dict(COCO_CATEGORY_NAMES), (f"the checkpoint stores no category names; its {classes} class ids are "
                                           f"read as COCO 2017's")
    return {}, f"the checkpoint stores no category names and its head is not COCO's ({classes} ids): no class is kept"


def shared_classes(theirs: Mapping[int, str], mine: Mapping[int, str], their_rows: int,
                   my_rows: int) -> Dict[int, int]:
    """New class id -> checkpoint class id, for the names both sides have once (ids within both heads)."""
    def unique(names: Mapping[int, str]) -> Dict[str, int]:
        keys = [_key(name) for name in names.values()]
        return {_key(name): cid for cid, name in names.items() if keys.count(_key(name)) == 1}

    old = unique(theirs)
    return {cid: old[name] for name, cid in unique(mine).items()
            if name in old and cid < my_rows and old[name] < their_rows}


def start_from(model: nn.Module, ckpt: Mapping[str, Any], source: str, new_names: Mapping[int, str],
               num_classes: int, keep_shared: bool = True) -> List[str]:
    """Loads `ckpt` into `model` for fine-tuning (see the module docstring); returns the summary
    lines: what was loaded, what starts afresh, which classes were kept."""
    state = ckpt["model"]
    their_names, note = checkpoint_class_names(ckpt)
    their_rows = (class_head_rows(state) or 0) - (NO_OBJECT_LOGITS if state_meta_arch(state) == "detr" else 0)
    kept = shared_classes(their_names, new_names, their_rows, num_classes) if keep_shared else {}
    heads = load_weights_but_class_heads(model, state, source, kept)
    loaded = sum(1 for key in state if key not in heads)
    lines = [f"Fine-tuning from {source}: loaded {loaded} tensors, every one but the class heads",
             f"Fine-tuning: the class heads start as a new model's ({len(heads)} tensors: "
             f"{', '.join(heads[:2])}{', ...' if len(heads) > 2 else ''})" + (
                 "; no-object logit included" if state_meta_arch(state) == "detr" else "")]
    if not keep_shared:
        lines.append("Fine-tuning: no class rows kept (--finetune_fresh_heads)")
    elif kept:
        shown = [f"{new_names[new]} ({old} -> {new})" for new, old in sorted(kept.items())]
        more = f" and {len(shown) - SHOWN_CLASSES} more" if len(shown) > SHOWN_CLASSES else ""
        keep = "class keeps its" if len(kept) == 1 else "classes keep their"
        lines.append(f"Fine-tuning: {len(kept)} {keep} trained rows, by name (checkpoint id -> new id): "
                     f"{', '.join(shown[:SHOWN_CLASSES])}{more} (--finetune_fresh_heads keeps none)")
    else:
        lines.append("Fine-tuning: no class of the data has a name of the checkpoint's classes: no row kept"
                     + (f" ({note})" if note else ""))
    if note and kept:
        lines[-1] += f" ({note})"
    return lines
