#!/usr/bin/env bash
# DETR-R50 (the original DETR), 500 epochs: 32 GPUs x 2 images (torchrun, 4 nodes of 8: see launch.sh).
# DETR's recipe for its published R50 model: total batch 64 (facebookresearch/detr#283).
# Extra arguments go to main.py, e.g. --resume output/detr_r50_e500/checkpoint.pth --eval
exec "$(dirname "$0")/launch.sh" detr_r50_e500 32 2 --meta_arch detr --epochs 500 --lr_drop 400 "$@"
