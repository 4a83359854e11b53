#!/usr/bin/env bash
# SAM-DETR-R50-DC5 w/ SMCA, 12 epochs: 8 GPUs x 1 images (torchrun, one node). Extra arguments go to main.py,
# e.g. --resume output/r50_dc5_smca_e12/checkpoint.pth --eval
exec "$(dirname "$0")/launch.sh" r50_dc5_smca_e12 8 1 --smca --dilation --epochs 12 --lr_drop 10 "$@"
