"""SAM-DETR: the detector, its post-processor and `build`."""
import copy
import math
from typing import Dict, List, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from util.box_ops import box_cxcywh_to_xyxy
from util.misc import NestedTensor, inverse_sigmoid, nested_tensor_from_tensor_list, unbind

from .backbone import Joiner, build_backbone, channels_last_1x1_weights
from .code_path import all_plain, step_aside
from .criterion import SetCriterion
from .matcher import build_matcher
from .transformer import Transformer, build_transformer

GROUP_NORM_GROUPS = 32
PRIOR_PROB = 0.01            # initial foreground probability of every class logit (focal loss)
GROUP_NORM_EPOCH_LIMIT = 25  # single-scale input_proj has a GroupNorm only for runs shorter than this
COCO_NUM_CLASSES = 91        # max COCO category id + 1
OTHER_NUM_CLASSES = 20       # the official default for any other --dataset_file
NUM_SELECT = 100             # detections kept per image by PostProcess


class SAMDETR(nn.Module):
    """Backbone -> input projection -> transformer -> per-layer class and box heads."""

    def __init__(self, backbone: Joiner, transformer: Transformer, num_classes: int, num_queries: int,
                 aux_loss: bool, input_proj_norm: bool):
        """input_proj_norm: follow each input 1x1 conv with GroupNorm (see `build`)."""
        super().__init__()
        d_model = transformer.d_model
        if input_proj_norm and d_model % GROUP_NORM_GROUPS:
            raise ValueError(f"hidden_dim {d_model} must be divisible by {GROUP_NORM_GROUPS} (GroupNorm in input_proj)")
        self.aux_loss = aux_loss
        self.backbone = backbone
        self.transformer = transformer
        # learnt reference boxes (pre-sigmoid cxcywh) stand in for DETR's query embeddings
        self.query_embed = nn.Embedding(num_queries, 4)
        self.input_proj = channels_last_1x1_weights(nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, d_model, kernel_size=1),
                          *([nn.GroupNorm(GROUP_NORM_GROUPS, d_model)] if input_proj_norm else []))
            for c in backbone.num_channels))
        class_head = nn.Linear(d_model, num_classes)
        nn.init.constant_(class_head.bias, -math.log((1 - PRIOR_PROB) / PRIOR_PROB))
        num_layers = len(transformer.decoder.layers)
        self.class_embed = nn.ModuleList(copy.deepcopy(class_head) for _ in range(num_layers))
        # the decoder refines its references with these very modules (shared, not copied)
        self.bbox_embed = transformer.decoder.bbox_embed

    def forward(self, samples: Union[NestedTensor, Sequence[Tensor], Tensor]) -> Dict:
        """samples: a NestedTensor, or (C, H, W) images of any sizes.

        Returns pred_logits (B, Q, num_classes), pred_boxes (B, Q, 4) normalised cxcywh, and,
        with aux_loss, aux_outputs: the same pair for every earlier decoder layer.
        """
        if not isinstance(samples, NestedTensor):
            samples = nested_tensor_from_tensor_list(list(samples))
        feats, masks, pos = self.backbone(samples)
        srcs = [proj(f) for proj, f in zip(self.input_proj, feats)]
        dec = self.transformer(srcs, masks, pos, self.query_embed.weight)
        logits = stacked_linear(self.class_embed, dec.hidden)
        boxes = (inverse_sigmoid(dec.references) + dec.box_deltas).sigmoid()
        return layer_outputs(logits, boxes, self.aux_loss)


def layer_outputs(logits: Tensor, boxes: Tensor, aux_loss: bool) -> Dict:
    """Stacked per-layer logits (L, B, Q, C) and boxes (L, B, Q, 4) -> the DETR-family output
    dict: pred_logits, pred_boxes of the last layer and, with aux_loss, aux_outputs of the others."""
    # unbind: one op in the backward pass for all layers
    logits, boxes = unbind(logits), unbind(boxes)
    out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
    if aux_loss:
        out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
    return out


def stacked_linear(linears: Sequence[nn.Linear], x: Tensor) -> Tensor:
    """Layer i of `linears` applied to x[i]: (L, ..., in) -> (L, ..., out), as one batched matmul
    (each layer called as it is when one is not a plain nn.Linear or has hooks)."""
    if not all_plain(linears, nn.Linear):
        step_aside("stacked class heads", "a class_embed layer is not a plain nn.Linear or has hooks")
        return torch.stack([m(x_i) for m, x_i in zip(linears, x)])
    weight = torch.stack([m.weight for m in linears]).transpose(1, 2)
    bias = torch.stack([m.bias for m in linears])[:, None]
    return torch.baddbmm(bias, x.flatten(1, -2), weight).view(*x.shape[:-1], -1)


class DetectionPostProcess(nn.Module):
    """Model outputs -> COCO-style detections per image, from `batched` (given by subclasses)."""

    @torch.no_grad()
    def forward(self, outputs: Dict, target_sizes: Tensor) -> List[Dict[str, Tensor]]:
        """target_sizes (B, 2) of (h, w) -> per image scores (K,), labels (K,), boxes (K, 4) xyxy pixels."""
        logits = outputs["pred_logits"]
        if len(logits) != len(target_sizes) or target_sizes.shape[1] != 2:
            raise ValueError("target_sizes must be (batch, 2) with one (h, w) per image")
        scores, labels, boxes = self.batched(logits, outputs["pred_boxes"], target_sizes)
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]

    def batched(self, logits: Tensor, boxes: Tensor, target_sizes: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """logits (B, Q, C), boxes (B, Q, 4) normalised cxcywh, target_sizes (B, 2) -> scores (B, K),
        labels (B, K), boxes (B, K, 4) xyxy in pixels of target_sizes."""
        raise NotImplementedError


class PostProcess(DetectionPostProcess):
    """SAM-DETR's detections: the top `num_select` (query, class) pairs."""

    def __init__(self, num_select: int = NUM_SELECT):
        super().__init__()
        self.num_select = num_select

    def batched(self, logits: Tensor, boxes: Tensor, target_sizes: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """See top_detections."""
        return top_detections(logits, boxes, target_sizes, self.num_select)


def top_detections(logits: Tensor, boxes: Tensor, target_sizes: Tensor, num_select: int):
    """The top `num_select` (query, class) pairs of every image, batched.

    logits (B, Q, C); boxes (B, Q, 4) normalised cxcywh; target_sizes (B, 2) of (h, w) ->
    scores (B, K), labels (B, K), boxes (B, K, 4) xyxy in pixels of target_sizes, best first,
    with K = min(num_select, Q * C).
    """
    num_classes = logits.shape[2]
    k = min(num_select, logits.shape[1] * num_classes)
    scores, index = logits.sigmoid().flatten(1).topk(k, dim=1)
    query = torch.div(index, num_classes, rounding_mode="floor")
    labels = index % num_classes
    boxes = torch.gather(box_cxcywh_to_xyxy(boxes), 1, query[..., None].expand(-1, -1, 4))
    return scores, labels, to_pixels(boxes, target_sizes)


def to_pixels(boxes: Tensor, target_sizes: Tensor) -> Tensor:
    """Normalised xyxy boxes (B, K, 4) -> pixels of target_sizes (B, 2) of (h, w)."""
    img_h, img_w = target_sizes.unbind(1)
    return boxes * torch.stack([img_w, img_h, img_w, img_h], dim=1)[:, None, :]


def default_num_classes(args) -> int:
    """--num_classes when given, else the official 91 for COCO and 20 otherwise.

    num_classes is max category id + 1: the class head has one sigmoid logit per id.
    """
    if getattr(args, "num_classes", None):
        return args.num_classes
    return COCO_NUM_CLASSES if args.dataset_file == "coco" else OTHER_NUM_CLASSES


INPUT_PROJ_NORM_CHOICES = ("auto", "on", "off")


def input_proj_norm(args) -> bool:
    """Whether each input 1x1 conv is followed by a GroupNorm.

    Deliberate: the official single-scale input_proj has a GroupNorm only in runs shorter than 25
    epochs (its 12-epoch checkpoints have input_proj.0.1.*, its 50-epoch ones do not); every
    multi-scale level has one. --input_proj_norm on/off fixes it regardless of --epochs, as a
    fine-tuning run does from its checkpoint's weights (a 50-epoch model fine-tuned for 12 epochs).
    """
    choice = getattr(args, "input_proj_norm", "auto") or "auto"
    if args.multiscale or choice == "auto":
        return args.multiscale or args.epochs < GROUP_NORM_EPOCH_LIMIT
    return choice == "on"


def build(args):
    if getattr(args, "masks", False):
        raise NotImplementedError("segmentation (--masks) is not supported by this codebase")
    num_classes = default_num_classes(args)
    model = SAMDETR(build_backbone(args), build_transformer(args), num_classes=num_classes,
                    num_queries=args.num_queries, aux_loss=args.aux_loss, input_proj_norm=input_proj_norm(args))
    criterion = SetCriterion(num_classes, matcher=build_matcher(args), weight_dict=loss_weights(args),
                             focal_alpha=args.focal_alpha)
    return model, criterion, {"bbox": PostProcess()}


def loss_weights(args) -> Dict[str, float]:
    """weight_dict of the criterion: the class, L1 and GIoU weights, repeated for the aux layers."""
    weight_dict = {"loss_ce": args.cls_loss_coef, "loss_bbox": args.bbox_loss_coef, "loss_giou": args.giou_loss_coef}
    if args.aux_loss:
        weight_dict.update({f"{k}_{i}": v for i in range(args.dec_layers - 1) for k, v in list(weight_dict.items())})
    return weight_dict

