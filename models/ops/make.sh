#!/usr/bin/env bash
# Compile the multi-scale deformable attention CUDA extension in place.
# Targets (archs.py): TORCH_CUDA_ARCH_LIST when set, else the visible GPUs (+PTX of the newest), else
# "7.5;8.0;9.0;10.0;12.0+PTX" (every GPU torch runs on). MAX_JOBS limits parallel compilation.
set -euo pipefail
cd "$(dirname "$0")"
"${PYTHON:-python}" setup.py build_ext --inplace "$@"
