"""Build the CUDA kernels of multi-scale deformable attention.

Run from this directory (``make.sh`` does that)::

    python setup.py build_ext --inplace

The compiled module ``samdetr_ms_deform_attn`` lands next to this file, where
``models.ops`` picks it up. No GPU has to be visible while building: the target
architectures come from ``TORCH_CUDA_ARCH_LIST`` (default: Ampere and Hopper).
"""

import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension

EXTENSION_NAME = "samdetr_ms_deform_attn"
DEFAULT_CUDA_ARCHS = "8.0;9.0"
SOURCES = [os.path.join("src", "ms_deform_attn.cpp"), os.path.join("src", "ms_deform_attn_cuda.cu")]

# Without this, torch asks the driver for the visible GPUs' architectures,
# which fails on build machines that have none.
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)

setup(
    name=EXTENSION_NAME,
    version="0.1.0",
    description="Multi-scale deformable attention CUDA kernels for the SAM-DETR re-implementation",
    ext_modules=[
        CUDAExtension(
            name=EXTENSION_NAME,
            sources=SOURCES,
            include_dirs=[os.path.abspath("src")],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
