#!/usr/bin/env bash
# Compiles the CUDA extension of multi-scale deformable attention when nvcc is available, and caches
# the result by a hash of its sources and the torch version, so that later runs only copy it.
set -euo pipefail
cd "$(dirname "$0")/../models/ops"
if command -v nvcc >/dev/null 2>&1; then
    CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
elif [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
    CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
else
    echo "nvcc not found: skipping the CUDA extension (the PyTorch path is used)"
    exit 0
fi
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
key=$( (cat setup.py src/*; python -c 'import torch; print(torch.__version__, torch.version.cuda)'; echo "$TORCH_CUDA_ARCH_LIST") | sha256sum | cut -c1-16)
cache="${XDG_CACHE_HOME:-$HOME/.cache}/samdetr-ops/$key"
if ls "$cache"/*.so >/dev/null 2>&1; then
    cp "$cache"/*.so .
    echo "CUDA extension: cached build $key"
else
    start=$(date +%s)
    MAX_JOBS=${MAX_JOBS:-2} PYTHON=python bash make.sh >build.log 2>&1 || { tail -50 build.log; exit 1; }
    mkdir -p "$cache" && cp ./*.so "$cache"/
    echo "CUDA extension: compiled for $TORCH_CUDA_ARCH_LIST in $(( $(date +%s) - start )) s"
fi
python -c 'import sys; sys.path.insert(0, "../.."); from models.ops import extension_available; print("extension importable:", extension_available())'
