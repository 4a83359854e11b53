"""Device dispatch for multi-scale deformable attention."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .cuda_impl import MSDeformAttnCudaFunction, extension_error, load_extension
from .pytorch_impl import ms_deform_attn_pytorch, ms_deform_attn_reference
from .shapes import SpatialShapes, has_table, shapes_tensor

__all__ = ["level_start_index", "ms_deform_attn"]

_warned_fallback = False


def _warn_fallback_once() -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"ms_deform_attn: CUDA extension unavailable ({extension_error()}); "
            "using the slower pure-PyTorch implementation on GPU.",
            RuntimeWarning,
            stacklevel=3,
        )


def level_start_index(spatial_shapes: Tensor) -> Tensor:
    """(L, 2) rows of (H, W) -> (L,) index of each level's first token in the flattened maps."""
    areas = spatial_shapes.prod(1)
    return torch.cat((areas.new_zeros(1), areas.cumsum(0)[:-1]))


def _at_least_float32(tensor: Tensor) -> Tensor:
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention core.

    For every (batch, query, head), bilinearly samples each level's value map at
    ``levels * points`` locations -- exactly ``F.grid_sample(mode="bilinear",
    padding_mode="zeros", align_corners=False)`` at grid ``2 * location - 1`` --
    and sums the samples weighted by ``attention_weights``.

    Args:
        value: ``(N, S, M, D)`` with ``S = sum(H_l * W_l)``, ``M`` heads of
            ``D`` channels.
        spatial_shapes: ``(L, 2)`` int64 rows of ``(H_l, W_l)``, or ``(H_l, W_l)``
            pairs of Python ints (under ``torch.export``, see ``shapes.py``).
        level_start_index: ``(L,)`` int64 index of each level's first token.
        sampling_locations: ``(N, Lq, M, L, P, 2)`` normalised ``(x, y)``;
            ``(0, 0)`` is the top-left corner of the map, ``(1, 1)`` the
            bottom-right. Points off the map read zeros.
        attention_weights: ``(N, Lq, M, L, P)``.

    Returns:
        ``(N, Lq, M * D)``.

    CUDA inputs run the compiled kernels when they are available (otherwise the
    PyTorch path, with a one-time warning); CPU inputs run the PyTorch path.
    Under autocast, half and bfloat16 inputs are upcast, the op runs in float32
    and the result stays float32: bilinear weights and sampling-location
    gradients are too sensitive for half precision, and the caller's next
    ``nn.Linear`` recasts under autocast anyway. Outside autocast, CUDA inputs
    run in ``value.dtype`` (locations and weights are cast to it) with float32
    accumulation. Under ``torch.export`` the op is traced as one ``grid_sample``
    per level, which exports to the standard ONNX ``GridSample``.
    """
    if torch.compiler.is_exporting() or torch.compiler.is_compiling() or not has_table(spatial_shapes):
        return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations,
                                        attention_weights)
    device_type = value.device.type
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type=device_type, enabled=False):
            return ms_deform_attn(
                _at_least_float32(value), spatial_shapes, level_start_index,
                _at_least_float32(sampling_locations), _at_least_float32(attention_weights),
            )
    if value.is_cuda:
        if load_extension() is not None:
            dtype = value.dtype
            return MSDeformAttnCudaFunction.apply(
                value, shapes_tensor(spatial_shapes, value.device), level_start_index,
                sampling_locations.to(dtype), attention_weights.to(dtype),
            )
        _warn_fallback_once()
    return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
