#!/usr/bin/env bash
# Shared launcher of the scripts in this folder: one process per GPU, via torchrun.
#   launch.sh EXP_NAME NUM_GPUS BATCH_PER_GPU [main.py flags...]
# Environment: COCO_PATH (default data/coco), OUTPUT_ROOT (default output), MASTER_PORT (default 29500),
# GPUS_PER_NODE (default 8), MAX_RESTARTS (default 3).
# A failed process (killed by the OOM killer, a segfault, a lost peer) makes torchrun start the group
# again, MAX_RESTARTS times; --auto_resume continues from the newest checkpoint in the output folder,
# as does the same command run again.
# One node when NUM_GPUS <= GPUS_PER_NODE. Otherwise NUM_GPUS / GPUS_PER_NODE nodes: run the same
# command on each of them with NODE_RANK (0 .. nodes - 1) and MASTER_ADDR (the address of node 0)
# set; node 0 writes detailed_log.txt, node k detailed_log_node<k>.txt.
set -euo pipefail
exp_name=$1; num_gpus=$2; batch_per_gpu=$3; shift 3
cd "$(dirname "$0")/.."
gpus_per_node=${GPUS_PER_NODE:-8}
gpus_per_node=$(( num_gpus < gpus_per_node ? num_gpus : gpus_per_node ))
if (( num_gpus % gpus_per_node )); then
    echo "launch.sh: ${num_gpus} GPUs do not split into nodes of GPUS_PER_NODE=${gpus_per_node}" >&2
    exit 2
fi
num_nodes=$(( num_gpus / gpus_per_node ))
exp_dir="${OUTPUT_ROOT:-output}/${exp_name}"
mkdir -p "${exp_dir}"
nodes_args=()
log_name=detailed_log.txt
if (( num_nodes > 1 )); then
    if [[ -z "${NODE_RANK:-}" || -z "${MASTER_ADDR:-}" ]]; then
        echo "launch.sh: ${exp_name} runs on ${num_nodes} nodes of ${gpus_per_node} GPUs (${num_gpus} in all): run" \
             "this script on each node with NODE_RANK (0 to $(( num_nodes - 1 ))) and MASTER_ADDR (node 0's" \
             "address) set, or use scripts_slurm/ (srun starts every node)" >&2
        exit 2
    fi
    nodes_args=(--nnodes="${num_nodes}" --node_rank="${NODE_RANK}" --master_addr="${MASTER_ADDR}")
    (( NODE_RANK == 0 )) || log_name="detailed_log_node${NODE_RANK}.txt"
fi
# (the guarded expansion: an empty array is "unbound" to bash < 4.4 under set -u)
torchrun ${nodes_args[@]+"${nodes_args[@]}"} \
    --nproc_per_node="${gpus_per_node}" --master_port="${MASTER_PORT:-29500}" \
    --max-restarts="${MAX_RESTARTS:-3}" main.py \
    --coco_path "${COCO_PATH:-data/coco}" \
    --batch_size "${batch_per_gpu}" \
    --output_dir "${exp_dir}" \
    --auto_resume \
    "$@" 2>&1 | tee -a "${exp_dir}/${log_name}"
