"""Where the CPU runs other ops than a GPU would, and the switch back to the GPU's ops.

A few parts of the model have a CPU form that gives the same numbers (up to float rounding) or
the same distribution faster there: the Semantics Aligner's separable RoIs (models/roi.py),
attention with dropout written out, and dropout masks from uniform draws (models/mlp.py). Inside
`gpu_code_path()` every device runs the GPU's ops: for counting a GPU step's ops on the CPU, for
FLOP counting and for export. Setting the environment variable SAMDETR_GPU_CODE_PATH=1 does the
same for a whole process (for outside tools, such as an op counter run on the CPU).
"""
import os
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

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
