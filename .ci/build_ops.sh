#!/usr/bin/env bash
# Compiles the CUDA extension of multi-scale deformable attention when nvcc is available, and caches
# the result by a hash of its sources, the torch version and the arch list, so that later runs only copy
# it. The arch list is models/ops/archs.py's: TORCH_CUDA_ARCH_LIST when set, else the visible GPUs',
# else (no GPU, the usual CI case) its default list, which covers every GPU torch runs on.
set -euo pipefail
cd "$(dirname "$0")/../models/ops"
# A toolkit is a folder with bin/nvcc and include/cuda_runtime.h (an nvcc on PATH may be a wrapper
# script outside the toolkit, so its folder is only the last guess).
if [ -z "${CUDA_HOME:-}" ]; then
    nvcc_path=$(command -v nvcc 2>/dev/null || true)
    for candidate in /usr/local/cuda ${nvcc_path:+"$(dirname "$(dirname "$nvcc_path")")"}; do
        if [ -x "$candidate/bin/nvcc" ] && [ -f "$candidate/include/cuda_runtime.h" ]; then
            CUDA_HOME=$candidate
            break
        fi
    done
fi
if [ -z "${CUDA_HOME:-}" ]; then
    echo "no CUDA toolkit found: skipping the CUDA extension (the PyTorch path is used)"
    exit 0
fi
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
TORCH_CUDA_ARCH_LIST=$(python archs.py)
export TORCH_CUDA_ARCH_LIST
key=$( (cat setup.py archs.py src/*; python -c 'import torch; print(torch.__version__, torch.version.cuda)'; echo "$TORCH_CUDA_ARCH_LIST") | sha256sum | cut -c1-16)
cache="${XDG_CACHE_HOME:-$HOME/.cache}/samdetr-ops/$key"
if ls "$cache"/*.so >/dev/null 2>&1; then
    cp "$cache"/*.so .
    echo "CUDA extension: cached build $key ($TORCH_CUDA_ARCH_LIST)"
else
    start=$(date +%s)
    MAX_JOBS=${MAX_JOBS:-2} PYTHON=python bash make.sh >build.log 2>&1 || { tail -50 build.log; exit 1; }
    mkdir -p "$cache" && cp ./*.so "$cache"/
    echo "CUDA extension: compiled for $TORCH_CUDA_ARCH_LIST in $(( $(date +%s) - start )) s"
fi
python -c 'import sys; sys.path.insert(0, "../.."); from models.ops import extension_available; print("extension importable:", extension_available())'
