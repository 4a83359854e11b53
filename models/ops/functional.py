"""Device dispatch for multi-scale deformable attention."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .cuda_impl import (MSDeformAttnCudaFunction, arch_mismatch_message, extension_error, kernel_usable,
                        load_extension, note_kernel_error)
from .pytorch_impl import ms_deform_attn_pytorch, ms_deform_attn_reference
from .shapes import SpatialShapes, has_table, shapes_tensor

__all__ = ["level_start_index", "ms_deform_attn"]

# Reasons already warned about in this process: each fallback reason warns once.
_warned: set[str] = set()
_UNBUILT = "unbuilt"
_ARCH_MISMATCH = "arch mismatch"
# Frames from warnings.warn up to the caller of ms_deform_attn:
# _warn_once <- _cuda_kernel_ready <- _ms_deform_attn_cuda <- ms_deform_attn <- caller.
_WARNING_STACKLEVEL = 5


def _warn_once(reason: str, detail: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"ms_deform_attn: {detail}; using the slower pure-PyTorch implementation on GPU.",
                      RuntimeWarning, stacklevel=_WARNING_STACKLEVEL)


def _cuda_kernel_ready(device: torch.device) -> bool:
    """Whether to call the kernels on ``device``; warns once per reason when not."""
    if load_extension() is None:
        _warn_once(_UNBUILT, f"CUDA extension unavailable ({extension_error()})")
        return False
    if not kernel_usable(device):
        _warn_once(_ARCH_MISMATCH, arch_mismatch_message(device))
        return False
    return True


def _ms_deform_attn_cuda(device: torch.device, value: Tensor, spatial_shapes: SpatialShapes,
                         level_start_index: Tensor, sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """``ms_deform_attn`` on CUDA ``device``: the kernels where they run there, the PyTorch path otherwise."""
    if _cuda_kernel_ready(device):
        dtype = value.dtype
        try:
            return MSDeformAttnCudaFunction.apply(
                value, shapes_tensor(spatial_shapes, device), level_start_index,
                sampling_locations.to(dtype), attention_weights.to(dtype),
            )
        except RuntimeError as error:  # a binary without a recorded arch list, run on a GPU it lacks
            if not note_kernel_error(device, error):
                raise
            _cuda_kernel_ready(device)  # False now: warns as for a mismatch known in advance
    return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


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

    CUDA inputs run the compiled kernels when they are built and their archs
    run on the device (otherwise the PyTorch path, with a one-time warning);
    CPU inputs run the PyTorch path.
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
        return _ms_deform_attn_cuda(value.device, value, spatial_shapes, level_start_index, sampling_locations,
                                    attention_weights)
    return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
