#!/usr/bin/env bash
# SAM-DETR-R50-DC5, 12 epochs: 8 GPUs x 1 images (srun). Extra arguments go to main.py,
# e.g. --resume output/r50_dc5_e12/checkpoint.pth --eval
exec "$(dirname "$0")/launch.sh" r50_dc5_e12 8 1 --dilation --epochs 12 --lr_drop 10 "$@"
