#!/usr/bin/env bash
# DETR-R50 (the original DETR), 50 epochs: 4 GPUs x 4 images (torchrun, one node).
# SAM-DETR-R50's recipe (r50_e50_4gpu.sh), for a comparison at the same schedule.
# Extra arguments go to main.py, e.g. --resume output/detr_r50_e50/checkpoint.pth --eval
exec "$(dirname "$0")/launch.sh" detr_r50_e50 4 4 --meta_arch detr --epochs 50 --lr_drop 40 "$@"
