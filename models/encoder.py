"""Transformer encoders: standard (single scale) and deformable (multi-scale)."""
from typing import List, Optional

import torch
from torch import Tensor, nn

from .mlp import FeedForward
from .ops import MSDeformAttn
from .ops.shapes import SpatialShapes, level_shapes

PIXEL_CENTRE = 0.5


class TransformerEncoderLayer(FeedForward):
    """DETR's post-norm encoder layer on batch-first tokens (B, HW, d_model)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self._init_ffn(d_model, dim_feedforward, dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor, key_padding_mask: Tensor) -> Tensor:
        q = k = src + pos
        attn = self.self_attn(q, k, src, key_padding_mask=key_padding_mask, need_weights=False)[0]
        src = self.norm1(src + self.dropout1(attn))
        return self._ffn(src, self.norm2)


class TransformerEncoder(nn.Module):
    def __init__(self, layers: List[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, src: Tensor, pos: Tensor, key_padding_mask: Tensor) -> Tensor:
        """src, pos (B, HW, d_model); key_padding_mask (B, HW) True on padding -> (B, HW, d_model)."""
        for layer in self.layers:
            src = layer(src, pos, key_padding_mask)
        return src


class DeformableTransformerEncoderLayer(FeedForward):
    """Deformable-DETR encoder layer: multi-scale deformable self-attention, then FFN."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float,
                 n_levels: int, n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model=d_model, n_levels=n_levels, n_heads=nhead, n_points=n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self._init_ffn(d_model, dim_feedforward, dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: SpatialShapes,
                level_start_index: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index,
                              padding_mask)
        src = self.norm1(src + self.dropout1(attn))
        return self._ffn(src, self.norm2)


class DeformableTransformerEncoder(nn.Module):
    def __init__(self, layers: List[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    @staticmethod
    def reference_points(spatial_shapes: SpatialShapes, valid_ratios: Tensor) -> Tensor:
        """Pixel centres of every level, normalised by the valid region of each image.

        spatial_shapes (L, 2) of (H, W); valid_ratios (B, L, 2) of (w, h) -> (B, S, L, 2) as (x, y).
        """
        refs = []
        for lvl, (h, w) in enumerate(level_shapes(spatial_shapes)):
            # exactly linspace(0.5, n - 0.5, n) (half-integers), in a form torch.export keeps symbolic
            ys = torch.arange(h, dtype=torch.float32, device=valid_ratios.device) + PIXEL_CENTRE
            xs = torch.arange(w, dtype=torch.float32, device=valid_ratios.device) + PIXEL_CENTRE
            ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            refs.append(torch.stack((ref_x, ref_y), -1))
        return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]

    def forward(self, src: Tensor, pos: Tensor, spatial_shapes: SpatialShapes, level_start_index: Tensor,
                valid_ratios: Tensor, padding_mask: Tensor) -> Tensor:
        """src, pos (B, S, d_model) over all levels; padding_mask (B, S) -> (B, S, d_model)."""
        reference_points = self.reference_points(spatial_shapes, valid_ratios)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return src
