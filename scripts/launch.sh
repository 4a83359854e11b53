#!/usr/bin/env bash
# Shared launcher of the scripts in this folder: one node, one process per GPU, via torchrun.
#   launch.sh EXP_NAME NUM_GPUS BATCH_PER_GPU [main.py flags...]
# Environment: COCO_PATH (default data/coco), OUTPUT_ROOT (default output), MASTER_PORT (default 29500).
set -euo pipefail
exp_name=$1; num_gpus=$2; batch_per_gpu=$3; shift 3
cd "$(dirname "$0")/.."
exp_dir="${OUTPUT_ROOT:-output}/${exp_name}"
mkdir -p "${exp_dir}"
torchrun --nproc_per_node="${num_gpus}" --master_port="${MASTER_PORT:-29500}" main.py \
    --coco_path "${COCO_PATH:-data/coco}" \
    --batch_size "${batch_per_gpu}" \
    --output_dir "${exp_dir}" \
    "$@" 2>&1 | tee -a "${exp_dir}/detailed_log.txt"
