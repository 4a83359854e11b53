"""The SAM-DETR decoder: Semantics Aligner, conditional cross-attention, optional SMCA prior."""
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from util.box_ops import box_cxcywh_to_xyxy

from .attention import ProjectedAttention, split_heads
from .mlp import MLP, FeedForward
from .position_encoding import sine_embed_points
from .roi import roi_align_boxes

ROI_SIZE = 7                        # RoIAlign output side inside each reference box
POINT_CHANNEL_REDUCTION = 4         # point1 maps d_model -> d_model // 4 channels
POINT_MLP_HIDDEN = (256, 512, 512)  # widths of point2's hidden layers (fixed, not d_model)
SMCA_BANDWIDTH = 8.0                # divisor of the Gaussian log-prior, the value SMCA-DETR uses
XY = 2                              # coordinates per point


class FeatureMap(NamedTuple):
    """One encoded feature level as the decoder reads it (batch first).

    memory, pos: (B, H*W, C); memory_2d: (B, C, H, W);
    attn_bias: (B, 1, 1, H*W), 0 on pixels and -inf on padding;
    valid_ratio: (B, 2) as (w, h), the unpadded fraction of the map.
    """
    memory: Tensor
    memory_2d: Tensor
    pos: Tensor
    attn_bias: Tensor
    valid_ratio: Tensor

    @property
    def height(self) -> int:
        return self.memory_2d.shape[-2]

    @property
    def width(self) -> int:
        return self.memory_2d.shape[-1]


def valid_ratio(mask: Tensor) -> Tensor:
    """(B, H, W) padding mask -> (B, 2): valid fraction of width and height."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1)
    valid_w = (~mask[:, 0, :]).sum(1)
    return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)


def make_feature_map(memory: Tensor, pos: Tensor, mask: Tensor) -> FeatureMap:
    """memory, pos (B, H*W, C) and mask (B, H, W) -> FeatureMap (the 2-D view is built once)."""
    b, h, w = mask.shape
    memory_2d = memory.transpose(1, 2).reshape(b, -1, h, w).contiguous()
    flat_mask = mask.flatten(1)
    attn_bias = torch.zeros_like(flat_mask, dtype=memory.dtype).masked_fill_(flat_mask, float("-inf"))
    return FeatureMap(memory, memory_2d, pos, attn_bias[:, None, None], valid_ratio(mask))


def smca_log_prior(points_px: Tensor, scales: Tensor, height: int, width: int) -> Tensor:
    """SMCA's Gaussian log-prior around each head's point, added to the attention logits.

    points_px (B, Q, heads, 2) in feature pixels; scales (B, Q, heads, 2) -> (B, heads, Q, H*W):
    -(sx^2 (px - cx)^2 + sy^2 (py - cy)^2) / 8 over cell centres (cx, cy). The x and y terms are
    separable, so they are built per column and per row and broadcast, never as a
    (Q, H*W, B*heads, 2) tensor.
    """
    points_px = points_px.permute(0, 2, 1, 3)
    scales_sq = scales.permute(0, 2, 1, 3) ** 2
    cx = torch.arange(width, device=points_px.device, dtype=points_px.dtype) + 0.5
    cy = torch.arange(height, device=points_px.device, dtype=points_px.dtype) + 0.5
    dx = (points_px[..., 0, None] - cx) ** 2 * scales_sq[..., 0, None]
    dy = (points_px[..., 1, None] - cy) ** 2 * scales_sq[..., 1, None]
    return ((dx[..., None, :] + dy[..., :, None]) / -SMCA_BANDWIDTH).flatten(-2)


class SAMDecoderLayer(FeedForward):
    """One SAM-DETR decoder layer: self-attention, Semantics Aligner, cross-attention, FFN.

    The Semantics Aligner RoIAligns the encoded map inside each reference box, predicts one
    salient point per head from it, and re-samples the query content there; content and the
    point's position encoding are then reweighted per head by sigmoid gates from the query.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, smca: bool):
        super().__init__()
        if d_model % nhead or d_model % POINT_CHANNEL_REDUCTION or d_model % XY:
            raise ValueError(f"hidden_dim {d_model} must be divisible by nheads ({nhead}), "
                             f"by {POINT_CHANNEL_REDUCTION} and by 2")
        self.d_model, self.nhead, self.smca = d_model, nhead, smca
        # self-attention over content + position projections of the queries
        self.sa_qcontent_proj = nn.Linear(d_model, d_model)
        self.sa_qpos_proj = nn.Linear(d_model, d_model)
        self.sa_kcontent_proj = nn.Linear(d_model, d_model)
        self.sa_kpos_proj = nn.Linear(d_model, d_model)
        self.sa_v_proj = nn.Linear(d_model, d_model)
        self.self_attn = ProjectedAttention(d_model, dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        # cross-attention with one full-width query per head
        self.ca_qcontent_proj = nn.Linear(d_model, d_model)
        self.ca_kcontent_proj = nn.Linear(d_model, d_model)
        self.ca_v_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_sine_proj = MLP(d_model, d_model, d_model, 2)
        self.ca_kpos_sine_proj = MLP(d_model, d_model, d_model, 2)
        self.cross_attn = ProjectedAttention(d_model, dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        # Semantics Aligner: salient points from the RoI features (with SMCA also a scale per point)
        point_channels = d_model // POINT_CHANNEL_REDUCTION
        self.point1 = nn.Sequential(nn.Conv2d(d_model, point_channels, kernel_size=1), nn.ReLU())
        point_outputs = nhead * XY * (2 if smca else 1)
        dims = (point_channels * ROI_SIZE * ROI_SIZE,) + POINT_MLP_HIDDEN
        mlp: List[nn.Module] = []
        for i, o in zip(dims[:-1], dims[1:]):
            mlp += [nn.Linear(i, o), nn.ReLU()]
        self.point2 = nn.Sequential(*mlp, nn.Linear(dims[-1], point_outputs))
        nn.init.zeros_(self.point2[-1].weight)
        nn.init.zeros_(self.point2[-1].bias)
        self.attn1 = nn.Linear(d_model, d_model * nhead)
        self.attn2 = nn.Linear(d_model, d_model * nhead)
        self._init_ffn(d_model, dim_feedforward, dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def _self_attention(self, tgt: Tensor, query_pos: Tensor) -> Tensor:
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        v = self.sa_v_proj(tgt)
        h = self.nhead
        out = self.self_attn(split_heads(q, h), split_heads(k, h), split_heads(v, h))
        return self.norm1(tgt + self.dropout1(out))

    def _align(self, level: FeatureMap, boxes: Tensor) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """Salient points inside each reference box.

        boxes (B, Q, 4) normalised cxcywh -> features (B, Q, heads, C) sampled at one point per
        head, points (B, Q, heads, 2) normalised to the image, and SMCA scales (B, Q, heads, 2).
        """
        b, q, _ = boxes.shape
        size = torch.tensor([level.width, level.height] * 2, dtype=boxes.dtype, device=boxes.device)
        boxes_px = box_cxcywh_to_xyxy(boxes) * size * level.valid_ratio.repeat(1, 2)[:, None]
        rois = roi_align_boxes(level.memory_2d, boxes_px, ROI_SIZE)  # (B*Q, C, 7, 7)
        raw = self.point2(self.point1(rois).flatten(1))
        offsets = raw[:, : self.nhead * XY].tanh().view(b * q, 1, self.nhead, XY)
        sampled = F.grid_sample(rois, offsets, padding_mode="zeros", align_corners=False)
        features = sampled.view(b, q, self.d_model, self.nhead).transpose(2, 3)
        offsets = offsets.view(b, q, self.nhead, XY)
        points = boxes[:, :, None, :XY] + boxes[:, :, None, XY:] * 0.5 * offsets
        scales = raw[:, self.nhead * XY:].view(b, q, self.nhead, XY) if self.smca else None
        return features, points, scales

    def _cross_attention(self, tgt: Tensor, level: FeatureMap, content: Tensor, points: Tensor,
                         scales: Optional[Tensor]) -> Tensor:
        b, q, h, c = content.shape
        gate_shape = (b, q, h, c)
        content = content * self.attn1(tgt).view(gate_shape).sigmoid()
        point_pos = sine_embed_points(points, self.d_model) * self.attn2(tgt).view(gate_shape).sigmoid()
        query = self.ca_qcontent_proj(content) + self.ca_qpos_sine_proj(point_pos)
        key = self.ca_kcontent_proj(level.memory) + self.ca_kpos_sine_proj(level.pos)
        value = self.ca_v_proj(level.memory)
        bias = level.attn_bias
        if scales is not None:
            size = torch.tensor([level.width, level.height], dtype=points.dtype, device=points.device)
            points_px = points * size * level.valid_ratio[:, None, None]
            bias = smca_log_prior(points_px, scales, level.height, level.width).add_(bias)
        out = self.cross_attn(query.transpose(1, 2), key[:, None], split_heads(value, h), bias)
        return self.norm2(tgt + self.dropout2(out))

    def forward(self, tgt: Tensor, level: FeatureMap, boxes: Tensor, query_pos: Tensor) -> Tensor:
        """tgt (B, Q, C); boxes (B, Q, 4) reference boxes, normalised cxcywh; query_pos (B, Q, C)
        sine encoding of the box centres -> (B, Q, C)."""
        tgt = self._self_attention(tgt, query_pos)
        content, points, scales = self._align(level, boxes)
        tgt = self._cross_attention(tgt, level, content, points, scales)
        return self._ffn(tgt, self.norm3)


class DecoderOutput(NamedTuple):
    """Per decoder layer (stacked on dim 0): hidden states (L, B, Q, C), the reference boxes it
    used (L, B, Q, 4, sigmoid space) and its predicted box deltas (L, B, Q, 4, logit space)."""
    hidden: Tensor
    references: Tensor
    box_deltas: Tensor


class SAMDecoder(nn.Module):
    """Decoder layers with iterative reference-box refinement.

    Owns `bbox_embed` (one box MLP per layer, shared with the detection head): layer i's box
    delta gives both its output box and, detached, layer i+1's reference.
    """

    def __init__(self, layers: List[SAMDecoderLayer], bbox_embed: nn.ModuleList,
                 level_of_layer: Sequence[int]):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.bbox_embed = bbox_embed
        self.level_of_layer = tuple(level_of_layer)

    def forward(self, levels: List[FeatureMap], query_boxes: Tensor) -> DecoderOutput:
        """levels: encoded maps; query_boxes (Q, 4) learnt reference boxes, pre-sigmoid cxcywh."""
        batch = levels[0].memory.shape[0]
        d_model = levels[0].memory.shape[-1]
        boxes_logit = query_boxes[None].expand(batch, -1, -1)
        tgt = levels[0].memory.new_zeros(batch, query_boxes.shape[0], d_model)
        hidden, references, deltas = [], [], []
        for i, layer in enumerate(self.layers):
            if i > 0:
                # refine from the previous layer's prediction, but let no gradient through it
                boxes_logit = (deltas[-1] + boxes_logit).detach()
            boxes = boxes_logit.sigmoid()
            query_pos = sine_embed_points(boxes[..., :XY], d_model)
            tgt = layer(tgt, levels[self.level_of_layer[i]], boxes, query_pos)
            hidden.append(tgt)
            references.append(boxes)
            deltas.append(self.bbox_embed[i](tgt))
        return DecoderOutput(torch.stack(hidden), torch.stack(references), torch.stack(deltas))
