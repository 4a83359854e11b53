"""Set criteria: Hungarian-matched class, L1 and GIoU losses, with auxiliary decoder losses.

SetCriterion is SAM-DETR's (sigmoid focal class loss), SoftmaxSetCriterion DETR's (softmax
cross-entropy with a "no object" class); both share MatchedSetCriterion.

All decoder layers are matched and scored together: their outputs are stacked to (L, B, Q, ...)
and every loss is computed once for the stack, giving one value per layer. The official code
loops over the layers; the numbers are the same.
"""
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from util.box_ops import box_cxcywh_to_xyxy, paired_giou_loss
from util.misc import accuracy, get_world_size, is_dist_avail_and_initialized, to_device_async, unbind

from .matcher import Matches, PackedTargets, pack_targets

FOCAL_GAMMA = 2.0
LOSSES = ("labels", "boxes", "cardinality")
PER_LAYER_TERMS = {"labels": ("loss_ce",), "boxes": ("loss_bbox", "loss_giou"), "cardinality": ("cardinality_error",)}
NumBoxes = Union[float, Tensor]


def layer_key(name: str, layer: int, num_layers: int) -> str:
    """Loss-dict key of `name` for a layer: the last layer has no suffix, earlier ones `_i`."""
    return name if layer == num_layers - 1 else f"{name}_{layer}"


class MatchedSetCriterion(nn.Module):
    """What SAM-DETR's and DETR's criteria share: Hungarian matching of every decoder layer, the
    box losses, the logged cardinality error and the weighting. Subclasses give `loss_labels`.
    """

    def __init__(self, num_classes: int, matcher: nn.Module, weight_dict: Dict[str, float],
                 losses: Sequence[str] = LOSSES):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.losses = tuple(losses)
        unknown = set(self.losses) - set(LOSSES)
        if unknown:
            raise ValueError(f"unknown losses {sorted(unknown)}")

    def loss_labels(self, logits: Tensor, targets: PackedTargets, matches: Matches, num_boxes: NumBoxes,
                    layer_index: Tensor) -> Dict[str, Tensor]:
        """The class loss of every layer (L,) as "loss_ce", and "class_error" (see `class_error`)."""
        raise NotImplementedError

    @staticmethod
    def class_error(logits: Tensor, matches: Matches, matched_labels: Tensor) -> Tensor:
        """Logged: percent of the last layer's matched predictions whose top logit is not their label."""
        last = logits[-1, matches.image[-1], matches.query[-1]]
        return 100 - accuracy(last.detach(), matched_labels[-1])

    def loss_boxes(self, boxes: Tensor, targets: PackedTargets, matches: Matches, num_boxes: NumBoxes,
                   layer_index: Tensor) -> Dict[str, Tensor]:
        """L1 and GIoU losses of the matched boxes, per layer (L,)."""
        src = boxes[layer_index, matches.image, matches.query]  # (L, M, 4)
        tgt = targets.boxes[matches.image, matches.target]
        giou = paired_giou_loss(box_cxcywh_to_xyxy(src).flatten(0, 1), box_cxcywh_to_xyxy(tgt).flatten(0, 1))
        return {"loss_bbox": (src - tgt).abs().sum((1, 2)) / num_boxes,
                "loss_giou": giou.view(src.shape[:2]).sum(1) / num_boxes}

    @torch.no_grad()
    def loss_cardinality(self, logits: Tensor, targets: PackedTargets) -> Dict[str, Tensor]:
        """Logged only, per layer (L,). Counts predictions whose argmax is not the last class: a
        softmax-DETR leftover that the official model keeps, reproduced for log parity."""
        lengths = to_device_async(np.asarray(targets.lengths, dtype=np.float32), logits.device)
        predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(-1)  # (L, B)
        return {"cardinality_error": (predicted - lengths).abs().mean(-1)}

    def num_boxes(self, targets: Sequence[Dict[str, Tensor]], device: torch.device,
                  micro_batches: int = 1) -> NumBoxes:
        """The loss normaliser: targets per process, averaged over processes, at least 1 (a device
        tensor when distributed, so that no process waits for the value).

        targets: every target of this process's optimizer step. With gradient accumulation they
        come from `micro_batches` micro-batches, each standing for a process of its own (engine.
        train_step), so the average is over world size x micro_batches: the value that many
        processes would each compute for the same global batch.
        """
        count = float(sum(len(t["labels"]) for t in targets))
        if not is_dist_avail_and_initialized():
            return max(count / micro_batches, 1.0)
        n = torch.full((), count, device=device)
        torch.distributed.all_reduce(n)
        return torch.clamp(n / (get_world_size() * micro_batches), min=1)

    def layer_losses(self, outputs: Dict, targets: Sequence[Dict[str, Tensor]],
                     num_boxes: Optional[NumBoxes] = None) -> Dict[str, Tensor]:
        """Every loss term as an (L,) tensor over the decoder layers, the auxiliary ones first and
        the last layer at index -1; class_error (last layer only) as a scalar.

        num_boxes: the normaliser of the box and focal losses (see `num_boxes`); None: counted
        from `targets`. A micro-batch of gradient accumulation is given its step's, counted over
        all of the step's micro-batches before the first one runs.
        """
        layers = list(outputs.get("aux_outputs", [])) + [outputs]
        logits = torch.stack([o["pred_logits"] for o in layers])
        boxes = torch.stack([o["pred_boxes"] for o in layers])
        packed = pack_targets(targets)
        matches = self.matcher.match(logits, boxes, packed)
        if num_boxes is None:
            num_boxes = self.num_boxes(targets, logits.device)
        layer_index = torch.arange(len(layers), device=logits.device)[:, None]
        losses = {}
        if "labels" in self.losses:
            losses.update(self.loss_labels(logits, packed, matches, num_boxes, layer_index))
        if "boxes" in self.losses:
            losses.update(self.loss_boxes(boxes, packed, matches, num_boxes, layer_index))
        if "cardinality" in self.losses:
            losses.update(self.loss_cardinality(logits, packed))
        return losses

    def weighted_total(self, layer_losses: Dict[str, Tensor]) -> Tensor:
        """sum over terms and layers of weight_dict[key] * loss, from `layer_losses`' output."""
        total = []
        for name, values in layer_losses.items():
            if values.dim() == 0:
                continue
            num_layers = len(values)
            weights = [self.weight_dict.get(layer_key(name, i, num_layers), 0.0) for i in range(num_layers)]
            if all(w == weights[0] for w in weights):
                if weights[0]:
                    total.append(values.sum() * weights[0])
            else:
                total.extend(values[i] * w for i, w in enumerate(weights) if w)
        if not total:
            raise ValueError("weight_dict gives every loss term a weight of 0")
        return torch.stack(total).sum() if len(total) > 1 else total[0]

    @staticmethod
    def unstack(layer_losses: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """(L,) per-layer terms -> the DETR loss dict: `name` for the last layer, `name_i` for aux i."""
        out = {}
        for name, values in layer_losses.items():
            if values.dim() == 0:
                out[name] = values
                continue
            out.update({layer_key(name, i, len(values)): v for i, v in enumerate(unbind(values))})
        return out

    def forward(self, outputs: Dict, targets: Sequence[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        return self.unstack(self.layer_losses(outputs, targets))


class SetCriterion(MatchedSetCriterion):
    """SAM-DETR's criterion: Hungarian-matched sigmoid focal loss_ce, class_error (logged), L1
    loss_bbox, loss_giou and cardinality_error (logged); auxiliary layers get the suffix `_i`.
    """

    def __init__(self, num_classes: int, matcher: nn.Module, weight_dict: Dict[str, float],
                 focal_alpha: float, losses: Sequence[str] = LOSSES):
        super().__init__(num_classes, matcher, weight_dict, losses)
        self.focal_alpha = focal_alpha

    def loss_labels(self, logits: Tensor, targets: PackedTargets, matches: Matches, num_boxes: NumBoxes,
                    layer_index: Tensor) -> Dict[str, Tensor]:
        """Focal loss of every layer (L,), and class_error of the last layer (logged)."""
        matched_labels = targets.labels[matches.image, matches.target]  # (L, M)
        onehot = torch.zeros_like(logits)
        # the 1 made on the device: a Python 1 would be a host tensor copied in
        onehot.index_put_((layer_index, matches.image, matches.query, matched_labels), onehot.new_ones(()))
        focal = sigmoid_focal_loss(logits, onehot, alpha=self.focal_alpha, gamma=FOCAL_GAMMA, reduction="none")
        # official normalisation: mean over queries, sum over batch and classes, / num_boxes, x queries
        loss_ce = focal.mean(2).sum((1, 2)) / num_boxes * logits.shape[2]
        return {"loss_ce": loss_ce, "class_error": self.class_error(logits, matches, matched_labels)}


class SoftmaxSetCriterion(MatchedSetCriterion):
    """DETR's criterion: as SetCriterion, but loss_ce is the softmax cross-entropy over
    num_classes + 1 logits, the last one "no object", whose term weighs `eos_coef`.
    """

    def __init__(self, num_classes: int, matcher: nn.Module, weight_dict: Dict[str, float],
                 eos_coef: float, losses: Sequence[str] = LOSSES):
        super().__init__(num_classes, matcher, weight_dict, losses)
        self.eos_coef = eos_coef
        class_weight = torch.ones(num_classes + 1)
        class_weight[-1] = eos_coef
        self.register_buffer("empty_weight", class_weight)

    def loss_labels(self, logits: Tensor, targets: PackedTargets, matches: Matches, num_boxes: NumBoxes,
                    layer_index: Tensor) -> Dict[str, Tensor]:
        """Weighted cross-entropy of every layer (L,): the unmatched queries' target is "no
        object"; each layer's mean is weighted as F.cross_entropy(weight=...) weighs it."""
        matched_labels = targets.labels[matches.image, matches.target]  # (L, M)
        target = torch.full(logits.shape[:3], self.num_classes, dtype=torch.int64, device=logits.device)
        target.index_put_((layer_index, matches.image, matches.query), matched_labels)
        weight = self.empty_weight[target]
        nll = F.cross_entropy(logits.flatten(0, 2), target.flatten(), reduction="none").view_as(weight)
        loss_ce = (nll * weight).sum((1, 2)) / weight.sum((1, 2))
        return {"loss_ce": loss_ce, "class_error": self.class_error(logits, matches, matched_labels)}


def logged_names(layer_losses: Dict[str, Tensor]) -> List[str]:
    """Keys of `SetCriterion.unstack(layer_losses)`, in the same order, without computing it."""
    names = []
    for name, values in layer_losses.items():
        names.extend([name] if values.dim() == 0 else [layer_key(name, i, len(values)) for i in range(len(values))])
    return names
