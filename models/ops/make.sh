#!/usr/bin/env bash
# Compile the multi-scale deformable attention CUDA extension in place.
# Honours TORCH_CUDA_ARCH_LIST (default "8.0;9.0") and MAX_JOBS.
set -euo pipefail
cd "$(dirname "$0")"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
"${PYTHON:-python}" setup.py build_ext --inplace "$@"
