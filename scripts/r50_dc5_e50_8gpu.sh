#!/usr/bin/env bash
# SAM-DETR-R50-DC5, 50 epochs: 8 GPUs x 1 images (torchrun, one node). Extra arguments go to main.py,
# e.g. --resume output/r50_dc5_e50/checkpoint.pth --eval
exec "$(dirname "$0")/launch.sh" r50_dc5_e50 8 1 --dilation --epochs 50 --lr_drop 40 "$@"
