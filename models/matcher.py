"""Hungarian matching of predictions to ground truth (scipy's linear_sum_assignment).

The costs of every decoder layer and image are computed in one batch on the device and cross to
the host in one transfer; the assignments come back to the device in one (non-blocking) upload.
"""
from typing import Dict, List, NamedTuple, Sequence, Tuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from util.misc import NonFiniteLossError, to_device_async, to_host

# Deliberate: the official matcher's focal class cost uses these constants, not --focal_alpha.
MATCHER_FOCAL_ALPHA = 0.25
MATCHER_FOCAL_GAMMA = 2.0
LOG_EPS = 1e-8
# Padded target slots get this cxcywh box (a valid one, so no cost is NaN); their costs are discarded.
PAD_BOX_VALUE = 0.5


class PackedTargets(NamedTuple):
    """The targets of a batch padded to the longest list.

    labels (B, T) int64; boxes (B, T, 4) normalised cxcywh; lengths: T_i per image (host ints).
    """
    labels: Tensor
    boxes: Tensor
    lengths: Tuple[int, ...]


def pack_targets(targets: Sequence[Dict[str, Tensor]]) -> PackedTargets:
    """List of per-image target dicts -> PackedTargets (at least one slot, so shapes stay valid)."""
    lengths = tuple(len(t["labels"]) for t in targets)
    labels = pad_sequence([t["labels"] for t in targets], batch_first=True)
    boxes = pad_sequence([t["boxes"].float() for t in targets], batch_first=True, padding_value=PAD_BOX_VALUE)
    if labels.shape[1] == 0:
        labels = labels.new_zeros(len(targets), 1)
        boxes = boxes.new_full((len(targets), 1, 4), PAD_BOX_VALUE)
    return PackedTargets(labels, boxes, lengths)


class Matches(NamedTuple):
    """Matched (prediction, target) pairs of every layer, grouped by layer.

    Every layer matches the same number of pairs, sum_i min(Q, T_i), so the index tensors are
    (L, M): image, query and target index of each pair on the device. `per_layer` holds the same
    assignment on the host as [layer][image] -> (query indices, target indices).
    """
    image: Tensor
    query: Tensor
    target: Tensor
    per_layer: List[List[Tuple[np.ndarray, np.ndarray]]]


def focal_class_cost(prob: Tensor, alpha: float = MATCHER_FOCAL_ALPHA, gamma: float = MATCHER_FOCAL_GAMMA) -> Tensor:
    """Focal-loss cost of calling each probability positive rather than negative (same shape)."""
    neg = (1 - alpha) * (prob ** gamma) * (-(1 - prob + LOG_EPS).log())
    pos = alpha * ((1 - prob) ** gamma) * (-(prob + LOG_EPS).log())
    return pos - neg


def non_finite_outputs_message(logits: Tensor, boxes: Tensor) -> str:
    """Which of logits (L, B, Q, C) and boxes (L, B, Q, 4) hold NaN or inf, by decoder layer."""
    parts = []
    for name, values in (("pred_logits", logits), ("pred_boxes", boxes)):
        bad = (~torch.isfinite(values)).flatten(1).any(1).nonzero().flatten().tolist()
        if bad:
            parts.append(f"{name} of decoder layer(s) {bad}")
    found = " and ".join(parts) or "the matching costs"
    return (f"the model's outputs are not finite (NaN or inf in {found}): it has diverged, or its weights "
            f"hold NaN, so its predictions cannot be matched to the targets")


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising cost_class * class cost + cost_bbox * L1 + cost_giou * (-GIoU).

    The class cost is SAM-DETR's focal one here; SoftmaxHungarianMatcher has DETR's.
    """

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 1.0, cost_giou: float = 1.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matching costs are 0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou

    @torch.no_grad()
    def cost_matrices(self, logits: Tensor, boxes: Tensor, targets: PackedTargets) -> Tensor:
        """logits (..., B, Q, C), boxes (..., B, Q, 4) -> costs (..., B, Q, T) against padded targets."""
        logits, boxes = logits.float(), boxes.float()
        labels = targets.labels.expand(*logits.shape[:-2], -1)[..., None, :].expand(*logits.shape[:-1], -1)
        cost_bbox = torch.cdist(boxes, targets.boxes.expand(*boxes.shape[:-2], -1, -1), p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(targets.boxes))
        return (self.cost_bbox * cost_bbox + self.cost_class * self.class_cost(logits, labels)
                + self.cost_giou * cost_giou)

    @staticmethod
    def class_cost(logits: Tensor, labels: Tensor) -> Tensor:
        """logits (..., Q, C), labels (..., Q, T) target class ids -> (..., Q, T): SAM-DETR's focal cost."""
        return focal_class_cost(torch.gather(logits.sigmoid(), -1, labels))

    @torch.no_grad()
    def match(self, logits: Tensor, boxes: Tensor, targets: PackedTargets) -> Matches:
        """logits (L, B, Q, C), boxes (L, B, Q, 4) of L decoder layers -> their Matches."""
        costs = to_host(self.cost_matrices(logits, boxes, targets))
        if not np.isfinite(costs).all():  # scipy would stop with its own, less helpful error
            raise NonFiniteLossError(non_finite_outputs_message(logits, boxes))
        per_layer = [[linear_sum_assignment(cost[:, :n]) for cost, n in zip(layer, targets.lengths)]
                     for layer in costs]
        flat = np.stack([np.concatenate([np.stack([np.full_like(q, b), q, t]) for b, (q, t) in enumerate(layer)]
                                        + [np.zeros((3, 0), dtype=np.int64)], axis=1)
                         for layer in per_layer]).astype(np.int64)  # (L, 3, M)
        image, query, target = to_device_async(flat, logits.device).unbind(1)
        return Matches(image, query, target, per_layer)

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], targets: Sequence[Dict[str, Tensor]]) -> List[Tuple[Tensor, Tensor]]:
        """One layer's outputs -> per image (prediction indices, target indices), int64, len = min(Q, T_i)."""
        matches = self.match(outputs["pred_logits"][None], outputs["pred_boxes"][None], pack_targets(targets))
        return [(torch.as_tensor(q, dtype=torch.int64), torch.as_tensor(t, dtype=torch.int64))
                for q, t in matches.per_layer[0]]


class SoftmaxHungarianMatcher(HungarianMatcher):
    """DETR's matcher: the class cost is minus the softmax probability of the target class."""

    @staticmethod
    def class_cost(logits: Tensor, labels: Tensor) -> Tensor:
        return -torch.gather(logits.softmax(-1), -1, labels)


def build_matcher(args, matcher_class: type = HungarianMatcher) -> HungarianMatcher:
    return matcher_class(cost_class=args.set_cost_class, cost_bbox=args.set_cost_bbox, cost_giou=args.set_cost_giou)
