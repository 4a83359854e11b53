"""Loading of the compiled CUDA kernels and their autograd wrapper.

The extension is looked up, in order, as a module next to this file (built by
``make.sh``), as an installed top-level module, and -- only when the
environment variable ``SAMDETR_BUILD_OPS=1`` is set -- compiled on first use
with ``torch.utils.cpp_extension.load``. Nothing is compiled at import time.

A binary only runs on the GPUs its archs cover (``archs.py``): :func:`kernel_usable` decides that
once per device from the archs compiled into the extension (``built_archs()``), and
:func:`note_kernel_error` turns the driver's "no kernel image is available" into the same verdict,
for binaries that predate ``built_archs()`` or record an unknown list.
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

from .archs import (ARCH_LIST_ENV, Arch, built_archs_flags, can_run, format_arch_list, parse_arch_list,
                    resolve_arch_list)

__all__ = ["BUILD_ENV_VAR", "EXTENSION_NAME", "MSDeformAttnCudaFunction", "arch_mismatch_message", "built_archs",
           "extension_available", "kernel_usable", "load_extension", "note_kernel_error"]

EXTENSION_NAME = "samdetr_ms_deform_attn"
BUILD_ENV_VAR = "SAMDETR_BUILD_OPS"
_SOURCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")
_SOURCES = ("ms_deform_attn.cpp", "ms_deform_attn_cuda.cu")
# The CUDA runtime's message when a binary has neither SASS nor PTX for the device.
NO_KERNEL_IMAGE = "no kernel image is available"

_lock = threading.Lock()
_extension: Optional[ModuleType] = None
_load_attempted = False
_load_error: Optional[str] = None
# Device index -> whether the kernels run there; filled by kernel_usable and note_kernel_error.
_usable_on_device: dict[int, bool] = {}


def _import_prebuilt() -> Optional[ModuleType]:
    for name in (f"{__package__}.{EXTENSION_NAME}", EXTENSION_NAME):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def _build_now() -> ModuleType:
    """Compiles the extension for ``resolve_arch_list()``, as setup.py does, and records the list in it."""
    from torch.utils.cpp_extension import load

    arch_list = resolve_arch_list()
    previous = os.environ.get(ARCH_LIST_ENV)
    os.environ[ARCH_LIST_ENV] = arch_list  # torch's load() compiles for this variable
    try:
        return load(
            name=EXTENSION_NAME,
            sources=[os.path.join(_SOURCE_DIR, source) for source in _SOURCES],
            extra_include_paths=[_SOURCE_DIR],
            extra_cflags=["-O3", *built_archs_flags(arch_list)],
            extra_cuda_cflags=["-O3"],
            verbose=False,
        )
    finally:
        if previous is None:
            del os.environ[ARCH_LIST_ENV]
        else:
            os.environ[ARCH_LIST_ENV] = previous


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


def built_archs(extension: ModuleType) -> Optional[list[Arch]]:
    """The archs compiled into ``extension``; ``None`` if unknown (a build without ``built_archs()``,
    or one whose list is empty or not in ``X.Y[+PTX]`` form)."""
    reported = getattr(extension, "built_archs", None)
    try:
        return parse_arch_list(reported()) if reported is not None else None
    except ValueError:
        return None


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def kernel_usable(device: torch.device) -> bool:
    """Whether the loaded kernels can run on CUDA ``device``; decided once per device index.

    ``False`` without the extension, or when its archs have neither SASS nor PTX for the device's
    capability; ``True`` when they do or when they are unknown (then :func:`note_kernel_error`
    catches a missing kernel image at the first call).
    """
    index = _device_index(device)
    if index not in _usable_on_device:
        extension = load_extension()
        archs = built_archs(extension) if extension is not None else []
        _usable_on_device[index] = archs is None or can_run(torch.cuda.get_device_capability(index), archs)
    return _usable_on_device[index]


def note_kernel_error(device: torch.device, error: BaseException) -> bool:
    """Whether ``error`` says the kernels have no image for ``device``; if so, marks it unusable."""
    if NO_KERNEL_IMAGE not in str(error):
        return False
    _usable_on_device[_device_index(device)] = False
    return True


def arch_mismatch_message(device: torch.device) -> str:
    """Why the kernels do not run on ``device``, and how to rebuild them for it."""
    index = _device_index(device)
    major, minor = torch.cuda.get_device_capability(index)
    extension = load_extension()
    archs = built_archs(extension) if extension is not None else None
    built = format_arch_list(archs) if archs else "unknown archs"
    return (f"the CUDA kernels of {EXTENSION_NAME} were built for {built} and cannot run on cuda:{index} "
            f"(sm_{major}{minor}); rebuild them with {ARCH_LIST_ENV}=\"{major}.{minor}\" bash models/ops/make.sh")


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
