"""SetCriterion: Hungarian-matched focal, L1 and GIoU losses, with auxiliary decoder losses."""
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from util.box_ops import box_cxcywh_to_xyxy, paired_giou_loss
from util.misc import accuracy, get_world_size, is_dist_avail_and_initialized

FOCAL_GAMMA = 2.0
Indices = List[Tuple[Tensor, Tensor]]


def _matched(indices: Indices) -> Tuple[Tensor, Tensor]:
    """(batch index, query index) of every matched prediction."""
    batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    return batch, torch.cat([src for src, _ in indices])


class SetCriterion(nn.Module):
    """Matches the outputs of every decoder layer to the targets and computes:

    loss_ce (sigmoid focal), class_error (logged), loss_bbox (L1), loss_giou, and
    cardinality_error (logged); auxiliary layers get the suffix `_i`.
    """

    def __init__(self, num_classes: int, matcher: nn.Module, weight_dict: Dict[str, float],
                 focal_alpha: float, losses: Sequence[str] = ("labels", "boxes", "cardinality")):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.focal_alpha = focal_alpha
        self.losses = tuple(losses)
        unknown = set(self.losses) - {"labels", "boxes", "cardinality"}
        if unknown:
            raise ValueError(f"unknown losses {sorted(unknown)}")

    def loss_labels(self, outputs, targets, indices: Indices, num_boxes: float, log: bool = True) -> Dict[str, Tensor]:
        logits = outputs["pred_logits"]
        idx = _matched(indices)
        matched_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        onehot = torch.zeros_like(logits)
        onehot[idx[0], idx[1], matched_labels] = 1
        focal = sigmoid_focal_loss(logits, onehot, alpha=self.focal_alpha, gamma=FOCAL_GAMMA, reduction="none")
        # official normalisation: mean over queries, sum over batch and classes, / num_boxes, x queries
        losses = {"loss_ce": focal.mean(1).sum() / num_boxes * logits.shape[1]}
        if log:
            losses["class_error"] = 100 - accuracy(logits[idx], matched_labels)
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets, indices: Indices, num_boxes: float) -> Dict[str, Tensor]:
        """Logged only. Counts predictions whose argmax is not the last class: a softmax-DETR
        leftover that the official model keeps, reproduced for log parity."""
        logits = outputs["pred_logits"]
        target_lengths = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device)
        predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(predicted.float(), target_lengths.float())}

    def loss_boxes(self, outputs, targets, indices: Indices, num_boxes: float) -> Dict[str, Tensor]:
        src = outputs["pred_boxes"][_matched(indices)]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], dim=0)
        giou = paired_giou_loss(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt))
        return {"loss_bbox": F.l1_loss(src, tgt, reduction="none").sum() / num_boxes,
                "loss_giou": giou.sum() / num_boxes}

    def _layer_losses(self, outputs, targets, num_boxes: float, log: bool) -> Dict[str, Tensor]:
        indices = self.matcher(outputs, targets)
        losses = {}
        for name in self.losses:
            if name == "labels":
                losses.update(self.loss_labels(outputs, targets, indices, num_boxes, log=log))
            else:
                losses.update(getattr(self, f"loss_{name}")(outputs, targets, indices, num_boxes))
        return losses

    def num_boxes(self, targets, device) -> float:
        """Targets per process, averaged over processes, at least 1."""
        n = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        if is_dist_avail_and_initialized():
            torch.distributed.all_reduce(n)
        return torch.clamp(n / get_world_size(), min=1).item()

    def forward(self, outputs: Dict, targets: Sequence[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        num_boxes = self.num_boxes(targets, outputs["pred_logits"].device)
        losses = self._layer_losses(outputs, targets, num_boxes, log=True)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            aux_losses = self._layer_losses(aux, targets, num_boxes, log=False)
            losses.update({f"{k}_{i}": v for k, v in aux_losses.items()})
        return losses
