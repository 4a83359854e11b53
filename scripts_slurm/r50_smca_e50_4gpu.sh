#!/usr/bin/env bash
# SAM-DETR-R50 w/ SMCA, 50 epochs: 4 GPUs x 4 images (srun). Extra arguments go to main.py,
# e.g. --resume output/r50_smca_e50/checkpoint.pth --eval
exec "$(dirname "$0")/launch.sh" r50_smca_e50 4 4 --smca --epochs 50 --lr_drop 40 "$@"
