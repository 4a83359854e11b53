"""Build the CUDA kernels of multi-scale deformable attention.

Run from this directory (``make.sh`` does that)::

    python setup.py build_ext --inplace

The compiled module ``samdetr_ms_deform_attn`` lands next to this file, where ``models.ops`` picks
it up. The target architectures (``archs.resolve_arch_list``) are ``TORCH_CUDA_ARCH_LIST`` when
set; else those of the GPUs visible now (``+PTX`` on the newest); else, with no GPU visible,
``archs.DEFAULT_ARCH_LIST`` = SASS for sm_75, sm_80, sm_90, sm_100 and sm_120 plus PTX of sm_120,
i.e. every GPU torch runs on. The list is compiled into the extension (``built_archs()``), so that
the loader can fall back to the PyTorch path on a GPU the binary cannot run on.
"""

import os
import sys

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import archs  # noqa: E402  (next to this file, not part of an installed package)

EXTENSION_NAME = "samdetr_ms_deform_attn"
SOURCES = [os.path.join("src", "ms_deform_attn.cpp"), os.path.join("src", "ms_deform_attn_cuda.cu")]

ARCH_LIST = archs.resolve_arch_list()
# torch compiles for this variable; setting it makes the build match what the binary records.
os.environ[archs.ARCH_LIST_ENV] = ARCH_LIST
print(f"{EXTENSION_NAME}: building for {archs.ARCH_LIST_ENV}={ARCH_LIST}")

setup(
    name=EXTENSION_NAME,
    version="0.1.0",
    description="Multi-scale deformable attention CUDA kernels for the SAM-DETR re-implementation",
    ext_modules=[
        CUDAExtension(
            name=EXTENSION_NAME,
            sources=SOURCES,
            include_dirs=[os.path.abspath("src")],
            extra_compile_args={"cxx": ["-O3", *archs.built_archs_flags(ARCH_LIST)],
                                "nvcc": ["-O3", "-lineinfo"]},
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
