#!/usr/bin/env bash
# SAM-DETR-R50, 12 epochs: 4 GPUs x 4 images (srun). Extra arguments go to main.py,
# e.g. --resume output/r50_e12/checkpoint.pth --eval
exec "$(dirname "$0")/launch.sh" r50_e12 4 4 --epochs 12 --lr_drop 10 "$@"
