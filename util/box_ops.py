"""Box helpers. Thin names over torchvision.ops so that the rest of the code reads like DETR."""
import torch
from torchvision.ops import box_area, box_convert, generalized_box_iou

__all__ = ["box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh", "generalized_box_iou", "paired_giou_loss"]


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) centre/size boxes -> (..., 4) corner boxes.

    The same arithmetic as torchvision's box_convert (centre -/+ 0.5 * size) in three ops
    instead of nine: it runs on every decoder layer and in every loss.
    """
    centre, size = boxes.split(2, dim=-1)
    half = 0.5 * size
    return torch.cat([centre - half, centre + half], dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) corner boxes -> (..., 4) centre/size boxes."""
    return box_convert(boxes, in_fmt="xyxy", out_fmt="cxcywh")


def paired_giou_loss(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """1 - GIoU of matched pairs: (N, 4) xyxy x (N, 4) xyxy -> (N,).

    DETR takes the diagonal of the full N x N GIoU matrix; this gives the same values without
    building the matrix. (torchvision's generalized_box_iou_loss adds 1e-7 to its denominators,
    which moves the loss of small normalised boxes by up to ~0.1%, so it is not used.)
    """
    inter_wh = (torch.min(boxes1[:, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    inter = inter_wh[:, 0] * inter_wh[:, 1]
    union = box_area(boxes1) + box_area(boxes2) - inter
    hull_wh = (torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    hull = hull_wh[:, 0] * hull_wh[:, 1]
    return 1 - (inter / union - (hull - union) / hull)
