"""Multi-scale deformable attention module (Deformable DETR, Zhu et al. 2021)."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import ms_deform_attn
from .shapes import SpatialShapes, shapes_tensor

__all__ = ["MSDeformAttn"]

# Coordinates of a 2-D point.
_XY = 2
# reference_points may also carry a box: (cx, cy, w, h).
_BOX = 4
# A box reference spans half its width/height on each side of the centre.
_HALF = 0.5


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention.

    Each query attends to ``n_points`` locations per head and feature level,
    placed at learned offsets around its reference point.

    Args:
        d_model: channel width of queries, values and output.
        n_levels: number of feature levels.
        n_heads: number of attention heads; must divide ``d_model``.
        n_points: sampling points per head and level.
    """

    def __init__(self, *, d_model: int, n_levels: int, n_heads: int, n_points: int) -> None:
        super().__init__()
        for name, number in (("d_model", d_model), ("n_levels", n_levels), ("n_heads", n_heads),
                             ("n_points", n_points)):
            if not isinstance(number, int) or number <= 0:
                raise ValueError(f"MSDeformAttn: {name} must be a positive int, got {number!r}")
        if d_model % n_heads != 0:
            raise ValueError(
                f"MSDeformAttn: d_model ({d_model}) must be divisible by n_heads ({n_heads})"
            )
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.head_dim = d_model // n_heads

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * _XY)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Offsets start as a fixed pattern: head h looks along direction
        # 2*pi*h/n_heads, scaled so the larger component is 1 (a ring of the
        # 8-neighbourhood for 8 heads), and point k sits k+1 steps out. Zero
        # weights make this pattern independent of the query at init.
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack((angles.cos(), angles.sin()), dim=-1)
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        steps = torch.arange(1, self.n_points + 1, dtype=torch.float32)
        grid = directions[:, None, None, :] * steps[None, None, :, None]
        grid = grid.expand(self.n_heads, self.n_levels, self.n_points, _XY)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        # Uniform attention over all points at init.
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        input_spatial_shapes: SpatialShapes,
        input_level_start_index: Tensor,
        input_padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """Attends from ``query`` into the flattened multi-level features.

        Args:
            query: ``(N, Lq, C)``.
            reference_points: ``(N, Lq, L, 2)`` normalised ``(x, y)``, top-left
                ``(0, 0)``, bottom-right ``(1, 1)``, padding area included; or
                ``(N, Lq, L, 4)`` boxes ``(cx, cy, w, h)``, in which case the
                offsets are scaled by the box size instead of the map size.
            input_flatten: ``(N, S, C)`` with ``S = sum(H_l * W_l)``.
            input_spatial_shapes: ``(L, 2)`` int64 rows of ``(H_l, W_l)``, or
                ``(H_l, W_l)`` pairs of ints (see ``shapes.py``).
            input_level_start_index: ``(L,)`` int64 first token of each level.
            input_padding_mask: optional ``(N, S)`` bool, True on padding.

        Returns:
            ``(N, Lq, C)``.
        """
        batch, queries, _ = query.shape
        _, tokens, _ = input_flatten.shape
        if len(input_spatial_shapes) != self.n_levels:
            raise ValueError(
                f"MSDeformAttn: expected {self.n_levels} levels, got {len(input_spatial_shapes)} spatial shapes"
            )
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            # Padding tokens must not leak into bilinear samples near borders.
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(batch, tokens, self.n_heads, self.head_dim)

        offsets = self.sampling_offsets(query).view(
            batch, queries, self.n_heads, self.n_levels, self.n_points, _XY
        )
        attention = self.attention_weights(query).view(
            batch, queries, self.n_heads, self.n_levels * self.n_points
        )
        # One softmax across all levels and points of a head.
        attention = F.softmax(attention, dim=-1).view(
            batch, queries, self.n_heads, self.n_levels, self.n_points
        )

        if reference_points.shape[-1] == _XY:
            # Offsets are in pixels of each level; normalise by (W, H).
            normalizer = shapes_tensor(input_spatial_shapes, offsets.device).flip(-1).to(offsets.dtype)
            locations = (
                reference_points[:, :, None, :, None, :]
                + offsets / normalizer[None, None, None, :, None, :]
            )
        elif reference_points.shape[-1] == _BOX:
            centre = reference_points[:, :, None, :, None, :_XY]
            size = reference_points[:, :, None, :, None, _XY:]
            locations = centre + offsets / self.n_points * size * _HALF
        else:
            raise ValueError(
                f"MSDeformAttn: last dim of reference_points must be {_XY} or {_BOX}, "
                f"got {reference_points.shape[-1]}"
            )

        output = ms_deform_attn(
            value, input_spatial_shapes, input_level_start_index, locations, attention
        )
        return self.output_proj(output)
