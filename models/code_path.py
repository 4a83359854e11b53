"""Where the CPU runs other ops than a GPU would, and the switch back to the GPU's ops.

A few parts of the model have a CPU form that gives the same numbers (up to float rounding) or
the same distribution faster there: the Semantics Aligner's separable RoIs (models/roi.py),
attention with dropout written out, and dropout masks from uniform draws (models/mlp.py). Inside
`gpu_code_path()` every device runs the GPU's ops: for counting a GPU step's ops on the CPU, for
FLOP counting and for export. Setting the environment variable SAMDETR_GPU_CODE_PATH=1 does the
same for a whole process (for outside tools, such as an op counter run on the CPU).

Fast forms that use a module's weights instead of calling it (fused linears, the folded backbone,
the separable RoIs' convolution) step aside for a module they do not know: a subclass or wrapper
(LoRA, quantised layers, parametrisations) or one with hooks (`is_plain`), so that a researcher's
change takes effect on every device, in training and evaluation alike.
"""
import os
import warnings
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import Tensor, nn

GPU_CODE_PATH_ENV = "SAMDETR_GPU_CODE_PATH"
_gpu_path = os.environ.get(GPU_CODE_PATH_ENV, "0") not in ("", "0")


@contextmanager
def gpu_code_path() -> Iterator[None]:
    """Run the ops a GPU runs, on every device (CPU forms off)."""
    global _gpu_path
    previous, _gpu_path = _gpu_path, True
    try:
        yield
    finally:
        _gpu_path = previous


def gpu_ops_forced() -> bool:
    """Inside `gpu_code_path()` or an export: only the GPU's ops, whatever the device or flags."""
    return _gpu_path or torch.compiler.is_exporting()


def cpu_form(tensor: Tensor) -> bool:
    """Whether work on `tensor` may take a CPU form: on the CPU, unless `gpu_ops_forced()`."""
    return tensor.device.type == "cpu" and not gpu_ops_forced()


_noted: set = set()  # the fast forms that have said they step aside


def has_call_hooks(module: nn.Module) -> bool:
    """Whether calling `module` would run hooks that reading its weights directly skips: forward
    hooks, and backward hooks, which nn.Module.__call__ installs too. (Plain attribute reads: the
    backbone asks this of ~150 modules per forward.)"""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def is_plain(module: nn.Module, cls: type) -> bool:
    """`module` is exactly a `cls` (not a subclass: a LoRA or quantised wrapper, a parametrised
    module) and carries no hooks, so a fast form may use its weights in place of its forward."""
    return type(module) is cls and not has_call_hooks(module)


def all_plain(modules: Iterable[nn.Module], cls: type) -> bool:
    return all(is_plain(m, cls) for m in modules)


def step_aside(where: str, why: str) -> None:
    """Says once per `where` that a fast form runs its plain path, and why. (Silent while traced:
    export and compilation wrap modules in hooks of their own.)"""
    if torch.compiler.is_compiling():
        return
    if where not in _noted:
        _noted.add(where)
        warnings.warn(f"{where}: {why}; running the plain path (the modules' own forward)", stacklevel=3)
