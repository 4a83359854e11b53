"""Loading weights into a model built from flags, with errors that name the flag to fix."""
from typing import Callable, Iterable, List, Mapping, Optional, Set

import torch
from torch import nn

_RESNET_BY_BLOCKS = {(True, 6): "resnet50", (True, 23): "resnet101", (False, 2): "resnet18", (False, 6): "resnet34"}
# The key that tells the architectures apart: SAM-DETR has one class head per decoder layer, DETR one shared.
_ARCH_BY_CLASS_HEAD = {"class_embed.0.weight": "sam_detr", "class_embed.weight": "detr"}
_ARCH_NAMES = {"sam_detr": "SAM-DETR", "detr": "DETR"}


CLASS_HEAD_PREFIX = "class_embed."  # SAM-DETR's per-layer heads (class_embed.<i>.*) and DETR's one head
FINETUNE_HINT = (" to load it as it is; to train it on a dataset with other classes instead, start a new run "
                 "from it with --finetune CKPT")


class CheckpointMismatchError(RuntimeError):
    """A state dict whose names or shapes do not fit the model built from the flags."""


def state_meta_arch(state: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The --meta_arch whose model has these state-dict keys (None when neither)."""
    return next((arch for key, arch in _ARCH_BY_CLASS_HEAD.items() if key in state), None)


def _layer_count(keys: Iterable[str], prefix: str) -> int:
    """Number of indexed sub-modules `prefix.<i>.*` among `keys`."""
    parts = (k[len(prefix):].split(".")[0] for k in keys if k.startswith(prefix))
    indices = {int(part) for part in parts if part.isdigit()}
    return max(indices) + 1 if indices else 0


def resnet_name(state: Mapping[str, torch.Tensor], body: str = "backbone.0.body.") -> Optional[str]:
    """The torchvision ResNet a state dict holds under `body` (a detector's, by default; "" for a
    bare ResNet), from its block type and layer3 depth; None when no known ResNet is there."""
    prefix = f"{body}layer3."
    blocks = _layer_count(state, prefix)
    return _RESNET_BY_BLOCKS.get((f"{prefix}0.conv3.weight" in state, blocks)) if blocks else None


def _rows(state: Mapping[str, torch.Tensor], key: str) -> Optional[int]:
    return state[key].shape[0] if key in state else None


def _input_proj_hints(mine: Set[str], theirs: Set[str]) -> List[str]:
    levels_mine, levels_theirs = _layer_count(mine, "input_proj."), _layer_count(theirs, "input_proj.")
    if levels_mine != levels_theirs:
        return ["--multiscale (the checkpoint has 3 feature levels)" if levels_theirs > levels_mine
                else "no --multiscale (the checkpoint is single-scale)"]
    norm = "input_proj.0.1.weight"
    if (norm in theirs) == (norm in mine):
        return []
    # official rule: single-scale models have a GroupNorm in input_proj only when --epochs < 25
    return ["--epochs 12 (any value < 25): the checkpoint has a GroupNorm in input_proj (input_proj.0.1.*), "
            "so it comes from a run shorter than 25 epochs" if norm in theirs else
            "--epochs 50 (any value >= 25): the checkpoint has no GroupNorm in input_proj (input_proj.0.1.*), "
            "so it comes from a run of 25 epochs or more"]


def _aligner_hints(mine: Set[str], theirs: Set[str]) -> List[str]:
    """The Semantics Aligner's ablation switches that tell the decoder layers' module sets apart."""
    layer = "transformer.decoder.layers.0."
    has = {side: {m for m in ("point2", "attn1") if any(k.startswith(f"{layer}{m}.") for k in keys)}
           for side, keys in (("mine", mine), ("theirs", theirs))}
    if not any(k.startswith(layer) for k in theirs) or has["mine"] == has["theirs"]:
        return []
    if not has["theirs"]:
        return ["--no_sam (the checkpoint's decoder has no Semantics Aligner: no point1/point2/attn1/attn2)"]
    hints = []
    if ("point2" in has["theirs"]) != ("point2" in has["mine"]):
        hints.append("--sam_resample salient (the default: the checkpoint has point1/point2)" if "point2" in has["theirs"]
                     else "--sam_resample avgpool or maxpool (the checkpoint has no point1/point2)")
    if ("attn1" in has["theirs"]) != ("attn1" in has["mine"]):
        hints.append("no --no_sam_reweight (the checkpoint has attn1/attn2)" if "attn1" in has["theirs"]
                     else "--no_sam_reweight (the checkpoint has no attn1/attn2)")
    if not has["mine"]:
        hints.append("no --no_sam (the checkpoint has a Semantics Aligner)")
    return hints


def _point_head_hint(model_state, ckpt_state) -> List[str]:
    keys = [k for k in ckpt_state if k.startswith("transformer.decoder.layers.0.point2.") and k.endswith(".weight")]
    if not keys:
        return []
    last = max(keys, key=lambda k: int(k.split(".")[-2]))
    mine, theirs = _rows(model_state, last), _rows(ckpt_state, last)
    if not mine or not theirs or mine == theirs:
        return []
    # point2 predicts (x, y) per head, and with SMCA also a scale per head: twice the rows
    if theirs == 2 * mine:
        return ["--smca (the checkpoint's point2 also predicts SMCA scales)"]
    if 2 * theirs == mine:
        return ["no --smca (the checkpoint's point2 predicts no SMCA scales)"]
    return [f"--sam_points / --nheads / --smca (point2 outputs {theirs} values, the model {mine}: "
            f"2 per salient point, 4 with SMCA)"]


def mismatch_hints(model_state: Mapping[str, torch.Tensor], ckpt_state: Mapping[str, torch.Tensor]) -> List[str]:
    """The flags that most likely differ between the checkpoint's run and the current one."""
    mine, theirs = set(model_state), set(ckpt_state)
    hints = []
    backbone_mine, backbone_theirs = resnet_name(model_state), resnet_name(ckpt_state)
    if backbone_theirs and backbone_theirs != backbone_mine:
        hints.append(f"--backbone {backbone_theirs} (the checkpoint has a {backbone_theirs}, the model a {backbone_mine})")
    hints += _input_proj_hints(mine, theirs)
    for flag, prefix in (("--enc_layers", "transformer.encoder.layers."), ("--dec_layers", "transformer.decoder.layers.")):
        if _layer_count(mine, prefix) != _layer_count(theirs, prefix):
            hints.append(f"{flag} {_layer_count(theirs, prefix)}")
    detr_classes_mine, detr_classes_theirs = _rows(model_state, "class_embed.weight"), _rows(ckpt_state, "class_embed.weight")
    if detr_classes_mine and detr_classes_theirs and detr_classes_mine != detr_classes_theirs:
        hints.append(f"--num_classes {detr_classes_theirs - 1} (DETR's head has one more logit, for no object)"
                     f"{FINETUNE_HINT}")
    for key, flag in (("query_embed.weight", "--num_queries"), ("class_embed.0.weight", "--num_classes"),
                      ("input_proj.0.0.weight", "--hidden_dim"),
                      ("transformer.encoder.layers.0.linear1.weight", "--dim_feedforward")):
        rows_mine, rows_theirs = _rows(model_state, key), _rows(ckpt_state, key)
        if rows_mine and rows_theirs and rows_mine != rows_theirs:
            hints.append(f"{flag} {rows_theirs}" + (FINETUNE_HINT if flag == "--num_classes" else ""))
    return hints + _aligner_hints(mine, theirs) + _point_head_hint(model_state, ckpt_state)


def _key_diff(model_state, ckpt_state, limit: int = 5) -> str:
    """A few missing / unexpected / mis-shaped keys, for the error message."""
    missing = sorted(set(model_state) - set(ckpt_state))
    unexpected = sorted(set(ckpt_state) - set(model_state))
    shapes = [f"{k} {tuple(ckpt_state[k].shape)} vs model {tuple(model_state[k].shape)}"
              for k in sorted(set(model_state) & set(ckpt_state)) if ckpt_state[k].shape != model_state[k].shape]
    parts = [f"{title} ({len(items)}): {', '.join(items[:limit])}{', ...' if len(items) > limit else ''}"
             for title, items in (("missing in checkpoint", missing), ("unexpected in checkpoint", unexpected),
                                  ("shape mismatch (checkpoint vs model)", shapes)) if items]
    return "; ".join(parts)


def check_fit(model_state: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor], source: str,
              skip: Callable[[str], bool] = lambda key: False) -> None:
    """CheckpointMismatchError naming the flags that most likely differ, unless every tensor of both
    (but those whose key `skip` accepts) has its name and shape in the other."""
    theirs, mine = state_meta_arch(state_dict), state_meta_arch(model_state)
    if theirs and mine and theirs != mine:
        raise CheckpointMismatchError(f"Checkpoint {source} holds a {_ARCH_NAMES[theirs]} model, but the flags build "
                                      f"a {_ARCH_NAMES[mine]} one: pass --meta_arch {theirs}")
    diff = _key_diff({k: v for k, v in model_state.items() if not skip(k)},
                     {k: v for k, v in state_dict.items() if not skip(k)})
    if diff:
        hints = mismatch_hints(model_state, state_dict)
        advice = ("Likely fix: " + "; ".join(hints)) if hints else "Check the model flags (--backbone, --hidden_dim, ...)"
        raise CheckpointMismatchError(f"Checkpoint {source} does not fit the model built from the flags. {advice}.\n"
                                      f"Details: {diff}")


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "the checkpoint") -> None:
    """`load_state_dict(strict=True)`, or CheckpointMismatchError naming the flags that most likely differ."""
    check_fit(model.state_dict(), state_dict, source)
    model.load_state_dict(state_dict, strict=True)


def is_class_head(key: str) -> bool:
    return key.startswith(CLASS_HEAD_PREFIX)


def class_head_rows(state: Mapping[str, torch.Tensor]) -> Optional[int]:
    """The class logits of a state dict's head (SAM-DETR: one per class id; DETR: one more, for no object)."""
    key = next((k for k in _ARCH_BY_CLASS_HEAD if k in state), None)
    return state[key].shape[0] if key else None


def load_weights_but_class_heads(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
                                 kept_rows: Mapping[int, int]) -> List[str]:
    """Loads every tensor of `state_dict` but the class heads, which keep the model's own (newly
    initialised) values except rows `kept_rows` (model row -> checkpoint row), copied from the
    checkpoint's head of the same name. Every other tensor must fit by name and shape, or
    CheckpointMismatchError names the flag. Returns the class-head keys of the model.

    A class head's weight is (rows, hidden_dim) and its bias (rows,), in each layer's head alike."""
    model_state = model.state_dict()
    check_fit(model_state, state_dict, source, skip=is_class_head)
    merged = {k: v for k, v in state_dict.items() if not is_class_head(k)}
    heads = sorted(k for k in model_state if is_class_head(k))
    for key in heads:
        mine, theirs = model_state[key].clone(), state_dict.get(key)
        if theirs is not None and theirs.shape[1:] == mine.shape[1:]:
            for row, their_row in kept_rows.items():
                mine[row] = theirs[their_row]
        merged[key] = mine
    model.load_state_dict(merged, strict=True)
    return heads
