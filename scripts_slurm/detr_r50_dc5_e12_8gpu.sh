#!/usr/bin/env bash
# DETR-R50-DC5 (the original DETR), 12 epochs: 8 GPUs x 1 images (srun).
# SAM-DETR-R50-DC5's recipe (r50_dc5_e12_8gpu.sh), for a comparison at the same schedule.
# Extra arguments go to main.py, e.g. --resume output/detr_r50_dc5_e12/checkpoint.pth --eval
exec "$(dirname "$0")/launch.sh" detr_r50_dc5_e12 8 1 --meta_arch detr --dilation --epochs 12 --lr_drop 10 "$@"
