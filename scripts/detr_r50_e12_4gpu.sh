#!/usr/bin/env bash
# DETR-R50 (the original DETR), 12 epochs: 4 GPUs x 4 images (torchrun, one node).
# SAM-DETR-R50's recipe (r50_e12_4gpu.sh), for a comparison at the same schedule.
# Extra arguments go to main.py, e.g. --resume output/detr_r50_e12/checkpoint.pth --eval
exec "$(dirname "$0")/launch.sh" detr_r50_e12 4 4 --meta_arch detr --epochs 12 --lr_drop 10 "$@"
