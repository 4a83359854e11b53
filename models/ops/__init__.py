"""Multi-scale deformable attention: fast PyTorch path and optional CUDA kernels.

Build the kernels with ``models/ops/make.sh`` (or set ``SAMDETR_BUILD_OPS=1``
to compile them on first use); without them, or on a GPU they were not built
for, everything runs in PyTorch.
"""

from .functional import level_start_index, ms_deform_attn
from .modules import MSDeformAttn
from .cuda_impl import extension_available
from .pytorch_impl import ms_deform_attn_pytorch, ms_deform_attn_reference

__all__ = [
    "MSDeformAttn",
    "extension_available",
    "level_start_index",
    "ms_deform_attn",
    "ms_deform_attn_pytorch",
    "ms_deform_attn_reference",
]
