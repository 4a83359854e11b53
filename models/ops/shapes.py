"""The per-level sizes of multi-scale feature maps, as a tensor or as Python ints.

Eager code passes ``spatial_shapes`` as an ``(L, 2)`` int64 tensor of ``(H_l, W_l)`` rows: the
CUDA kernel reads it on the device. Under ``torch.export`` the sizes are passed as ``(H_l, W_l)``
pairs of Python ints instead, which the exporter traces as symbols of the input size; read back
from a tensor they would be data, and the exported graph would be fixed to the example's size.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
from torch import Tensor

class LevelShapes(tuple):
    """Per-level ``(H, W)`` as Python ints that also carry the same sizes as an ``(L, 2)`` int64
    device tensor (`table`), for the CUDA kernel. Code that needs the sizes on the host reads the
    ints, never the tensor: on a GPU, reading it back would wait for the queued work.
    """
    table: Tensor

    def __new__(cls, shapes: Sequence[Tuple[int, int]], table: Tensor) -> "LevelShapes":
        obj = super().__new__(cls, [tuple(s) for s in shapes])
        obj.table = table
        return obj


SpatialShapes = Union[Tensor, LevelShapes, Sequence[Tuple[int, int]]]

__all__ = ["LevelShapes", "SpatialShapes", "has_table", "level_shapes", "shapes_tensor"]


def has_table(spatial_shapes: SpatialShapes) -> bool:
    """True when the sizes are also on the device (a tensor, or LevelShapes)."""
    return isinstance(spatial_shapes, (Tensor, LevelShapes))


def level_shapes(spatial_shapes: SpatialShapes) -> List[Tuple[int, int]]:
    """Per-level ``(H, W)`` as Python ints (symbolic under ``torch.export``)."""
    rows = spatial_shapes.tolist() if isinstance(spatial_shapes, Tensor) else spatial_shapes
    return [(h, w) for h, w in rows]


def shapes_tensor(spatial_shapes: SpatialShapes, device: torch.device) -> Tensor:
    """``(L, 2)`` int64 rows of ``(H, W)``; a tensor passes through unchanged."""
    if isinstance(spatial_shapes, Tensor):
        return spatial_shapes
    if isinstance(spatial_shapes, LevelShapes):
        return spatial_shapes.table
    # torch.tensor, unlike torch.as_tensor, keeps symbolic sizes symbolic under torch.export
    return torch.tensor([list(s) for s in spatial_shapes], dtype=torch.long, device=device)
