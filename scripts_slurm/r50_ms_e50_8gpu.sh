#!/usr/bin/env bash
# SAM-DETR-R50-MS (multi-scale, no SMCA), 50 epochs: 8 GPUs x 2 images (srun). Extra arguments go to main.py,
# e.g. --resume output/r50_ms_e50/checkpoint.pth --eval
exec "$(dirname "$0")/launch.sh" r50_ms_e50 8 2 --multiscale --epochs 50 --lr_drop 40 "$@"
