#!/usr/bin/env bash
# DETR-R50-DC5 (the original DETR), 500 epochs: 64 GPUs x 1 images (torchrun, 8 nodes of 8: see launch.sh).
# DETR's recipe for its published R50-DC5 model: total batch 64 (facebookresearch/detr#283).
# Extra arguments go to main.py, e.g. --resume output/detr_r50_dc5_e500/checkpoint.pth --eval
exec "$(dirname "$0")/launch.sh" detr_r50_dc5_e500 64 1 --meta_arch detr --dilation --epochs 500 --lr_drop 400 "$@"
