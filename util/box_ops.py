"""Box helpers. Thin names over torchvision.ops so that the rest of the code reads like DETR."""
import torch
from torchvision.ops import box_convert, generalized_box_iou, generalized_box_iou_loss

__all__ = ["box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh", "generalized_box_iou", "paired_giou_loss"]


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) centre/size boxes -> (..., 4) corner boxes."""
    return box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) corner boxes -> (..., 4) centre/size boxes."""
    return box_convert(boxes, in_fmt="xyxy", out_fmt="cxcywh")


def paired_giou_loss(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """1 - GIoU of matched pairs: (N, 4) xyxy x (N, 4) xyxy -> (N,).

    DETR takes the diagonal of the full N x N GIoU matrix; the paired form gives the same
    values without building the matrix.
    """
    return generalized_box_iou_loss(boxes1, boxes2, reduction="none")
