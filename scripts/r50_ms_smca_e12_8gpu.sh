#!/usr/bin/env bash
# SAM-DETR-R50-MS w/ SMCA, 12 epochs: 8 GPUs x 2 images (torchrun, one node). Extra arguments go to main.py,
# e.g. --resume output/r50_ms_smca_e12/checkpoint.pth --eval
exec "$(dirname "$0")/launch.sh" r50_ms_smca_e12 8 2 --smca --multiscale --epochs 12 --lr_drop 10 "$@"
