"""Transformer encoders: standard (single scale) and deformable (multi-scale)."""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import attention
from .mlp import Dropout, FeedForward
from .ops import MSDeformAttn
from .ops.shapes import SpatialShapes
from .record import Recordable

PIXEL_CENTRE = 0.5


class PackedSelfAttention(Recordable, nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameters (`in_proj_weight`,
    `in_proj_bias`, `out_proj`) and numbers, calling scaled_dot_product_attention (`attention`) directly.

    Queries and keys share their input (content + position), so both come from one matmul. The
    attention bias is built once per forward by the encoder (`key_padding_bias`), not by every
    layer, and has one fixed layout.

    Record point (models/record.py): "weights" (B, heads, Lq, S); with a recorder attached the
    written-out attention runs instead of the fused kernel (see `attention`).
    """

    def __init__(self, d_model: int, nhead: int, dropout: float):
        super().__init__()
        self.nhead, self.dropout = nhead, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query_key: Tensor, value: Tensor, attn_bias: Optional[Tensor]) -> Tensor:
        """query_key, value (B, S, d_model); attn_bias (B, 1, 1, S) or None -> (B, S, d_model)."""
        d_model = value.shape[-1]
        # split, not two slices: its backward is one concatenation instead of two padded copies
        w_qk, w_v = self.in_proj_weight.split([2 * d_model, d_model])
        b_qk, b_v = self.in_proj_bias.split([2 * d_model, d_model])
        qk = F.linear(query_key, w_qk, b_qk)
        v = F.linear(value, w_v, b_v)
        q, k = qk.unflatten(-1, (2, self.nhead, -1)).permute(2, 0, 3, 1, 4)  # each (B, heads, S, D)
        v = v.unflatten(-1, (self.nhead, -1)).transpose(1, 2)
        return self.attend(q, k, v, attn_bias)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, attn_bias: Optional[Tensor]) -> Tensor:
        """q (B, heads, Lq, D), k and v (B, heads, S, D) already projected -> (B, Lq, d_model)."""
        out = attention(q, k, v, attn_bias, self.dropout if self.training else 0.0, self.recorder)
        return self.out_proj(out.transpose(1, 2).flatten(2))


def key_padding_bias(key_padding_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, S) True on padding -> additive attention bias (B, 1, 1, S): 0, or -inf on padding.

    Made contiguous here, once: the memory-efficient attention kernels require the bias's last
    dimension to be dense (tests/test_compile.py checks every bias that reaches them).
    """
    # built in its final shape rather than viewed into it: a view's strides (S, S, S, 1) compare
    # S with 1, which inductor cannot decide when S is a symbolic size (dynamic image shapes)
    b, s = key_padding_mask.shape
    bias = torch.zeros((b, 1, 1, s), dtype=dtype, device=key_padding_mask.device)
    return bias.masked_fill_(key_padding_mask.view(b, 1, 1, s), float("-inf"))


class TransformerEncoderLayer(FeedForward):
    """DETR's post-norm encoder layer on batch-first tokens (B, HW, d_model)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = PackedSelfAttention(d_model, nhead, dropout)
        self.dropout1 = Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self._init_ffn(d_model, dim_feedforward, dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor, attn_bias: Optional[Tensor]) -> Tensor:
        attn = self.self_attn(src + pos, src, attn_bias)
        src = self.norm1(src + self.dropout1(attn))
        return self._ffn(src, self.norm2)


class TransformerEncoder(nn.Module):
    def __init__(self, layers: List[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, src: Tensor, pos: Tensor, key_padding_mask: Tensor) -> Tensor:
        """src, pos (B, HW, d_model); key_padding_mask (B, HW) True on padding -> (B, HW, d_model)."""
        attn_bias = key_padding_bias(key_padding_mask, src.dtype)
        for layer in self.layers:
            src = layer(src, pos, attn_bias)
        return src


class DeformableTransformerEncoderLayer(FeedForward):
    """Deformable-DETR encoder layer: multi-scale deformable self-attention, then FFN."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float,
                 n_levels: int, n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model=d_model, n_levels=n_levels, n_heads=nhead, n_points=n_points)
        self.dropout1 = Dropout(dropout)
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
    def reference_points(shapes: Sequence[Tuple[int, int]], valid_ratios: Tensor) -> Tensor:
        """Pixel centres of every level, normalised by the valid region of each image.

        shapes: (H, W) of every level; valid_ratios (B, L, 2) of (w, h) -> (B, S, L, 2) as (x, y).
        """
        refs = []
        for lvl, (h, w) in enumerate(shapes):
            # exactly linspace(0.5, n - 0.5, n) (half-integers), in a form torch.export keeps symbolic
            ys = torch.arange(h, dtype=torch.float32, device=valid_ratios.device) + PIXEL_CENTRE
            xs = torch.arange(w, dtype=torch.float32, device=valid_ratios.device) + PIXEL_CENTRE
            ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            refs.append(torch.stack((ref_x, ref_y), -1))
        return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]

    def forward(self, src: Tensor, pos: Tensor, shapes: Sequence[Tuple[int, int]], spatial_shapes: SpatialShapes,
                level_start_index: Optional[Tensor], valid_ratios: Tensor, padding_mask: Tensor) -> Tensor:
        """src, pos (B, S, d_model) over all levels; shapes: (H, W) per level as Python ints;
        spatial_shapes: the same as an (L, 2) device tensor, or `shapes` itself when traced (see
        ops/shapes.py); padding_mask (B, S) -> (B, S, d_model)."""
        reference_points = self.reference_points(shapes, valid_ratios)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return src
