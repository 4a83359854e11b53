"""Loading of the compiled CUDA kernels and their autograd wrapper.

The extension is looked up, in order, as a module next to this file (built by
``make.sh``), as an installed top-level module, and -- only when the
environment variable ``SAMDETR_BUILD_OPS=1`` is set -- compiled on first use
with ``torch.utils.cpp_extension.load``. Nothing is compiled at import time.
"""

from __future__ import annotations

import importlib
import os
import threading
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["BUILD_ENV_VAR", "EXTENSION_NAME", "MSDeformAttnCudaFunction", "extension_available", "load_extension"]

EXTENSION_NAME = "samdetr_ms_deform_attn"
BUILD_ENV_VAR = "SAMDETR_BUILD_OPS"
_SOURCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")
_SOURCES = ("ms_deform_attn.cpp", "ms_deform_attn_cuda.cu")

_lock = threading.Lock()
_extension: Optional[ModuleType] = None
_load_attempted = False
_load_error: Optional[str] = None


def _import_prebuilt() -> Optional[ModuleType]:
    for name in (f"{__package__}.{EXTENSION_NAME}", EXTENSION_NAME):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def _build_now() -> ModuleType:
    from torch.utils.cpp_extension import load

    return load(
        name=EXTENSION_NAME,
        sources=[os.path.join(_SOURCE_DIR, source) for source in _SOURCES],
        extra_include_paths=[_SOURCE_DIR],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3"],
        verbose=False,
    )


def load_extension() -> Optional[ModuleType]:
    """Returns the compiled extension module, or ``None`` if unavailable.

    The lookup runs once per process; later calls return the cached result.
    """
    global _extension, _load_attempted, _load_error
    if _load_attempted:
        return _extension
    with _lock:
        if _load_attempted:
            return _extension
        module = _import_prebuilt()
        if module is None and os.environ.get(BUILD_ENV_VAR, "0") == "1":
            try:
                module = _build_now()
            except Exception as error:  # a failed build must not break training
                _load_error = f"building {EXTENSION_NAME} failed: {error}"
        elif module is None:
            _load_error = (
                f"{EXTENSION_NAME} is not built; run models/ops/make.sh or set {BUILD_ENV_VAR}=1"
            )
        _extension = module
        _load_attempted = True
    return _extension


def extension_available() -> bool:
    """Whether the CUDA kernels can be used in this process."""
    return load_extension() is not None


def extension_error() -> Optional[str]:
    """Why :func:`load_extension` returned ``None`` (``None`` if it did not)."""
    load_extension()
    return _load_error


class MSDeformAttnCudaFunction(torch.autograd.Function):
    """Autograd wrapper of the CUDA kernels; arguments as in ``ms_deform_attn``."""

    @staticmethod
    def forward(ctx, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
        extension = load_extension()
        if extension is None:
            raise RuntimeError(_load_error)
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return extension.forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_locations, grad_attention = load_extension().backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            grad_output.contiguous(),
        )
        return grad_value, None, None, grad_locations, grad_attention
