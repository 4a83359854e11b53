"""Hungarian matching of predictions to ground truth (scipy's linear_sum_assignment)."""
from typing import Dict, List, Sequence, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

# Deliberate: the official matcher's focal class cost uses these constants, not --focal_alpha.
MATCHER_FOCAL_ALPHA = 0.25
MATCHER_FOCAL_GAMMA = 2.0
LOG_EPS = 1e-8
PAD_BOX = (0.5, 0.5, 1.0, 1.0)  # a valid box for padded target slots, whose costs are discarded


def focal_class_cost(prob: Tensor, alpha: float = MATCHER_FOCAL_ALPHA, gamma: float = MATCHER_FOCAL_GAMMA) -> Tensor:
    """Focal-loss cost of calling each probability positive rather than negative (same shape)."""
    neg = (1 - alpha) * (prob ** gamma) * (-(1 - prob + LOG_EPS).log())
    pos = alpha * ((1 - prob) ** gamma) * (-(prob + LOG_EPS).log())
    return pos - neg


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising cost_class * focal + cost_bbox * L1 + cost_giou * (-GIoU)."""

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 1.0, cost_giou: float = 1.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matching costs are 0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou

    @torch.no_grad()
    def cost_matrices(self, outputs: Dict[str, Tensor], targets: Sequence[Dict[str, Tensor]]) -> Tensor:
        """(B, Q, T_max) matching costs; targets are padded to the longest list, in one batch."""
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        b, _, _ = logits.shape
        t_max = max(max((len(t["labels"]) for t in targets), default=0), 1)
        labels = logits.new_zeros((b, t_max), dtype=torch.long)
        tgt_boxes = logits.new_tensor(PAD_BOX).repeat(b, t_max, 1)
        for i, t in enumerate(targets):
            labels[i, : len(t["labels"])] = t["labels"]
            tgt_boxes[i, : len(t["boxes"])] = t["boxes"]
        prob = torch.gather(logits.sigmoid(), 2, labels[:, None, :].expand(-1, logits.shape[1], -1))
        cost_bbox = (boxes[:, :, None] - tgt_boxes[:, None]).abs().sum(-1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
        return self.cost_bbox * cost_bbox + self.cost_class * focal_class_cost(prob) + self.cost_giou * cost_giou

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], targets: Sequence[Dict[str, Tensor]]) -> List[Tuple[Tensor, Tensor]]:
        """-> per image (prediction indices, target indices), int64, len = min(Q, T_i)."""
        costs = self.cost_matrices(outputs, targets).cpu()
        indices = []
        for cost, t in zip(costs, targets):
            rows, cols = linear_sum_assignment(cost[:, : len(t["labels"])].numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices


def build_matcher(args) -> HungarianMatcher:
    return HungarianMatcher(cost_class=args.set_cost_class, cost_bbox=args.set_cost_bbox, cost_giou=args.set_cost_giou)
