#!/usr/bin/env bash
# Shared launcher of the scripts in this folder: one process per GPU, via torchrun.
#   launch.sh EXP_NAME NUM_GPUS BATCH_PER_GPU [main.py flags...]
# Environment: COCO_PATH (default data/coco), OUTPUT_ROOT (default output), GPUS_PER_NODE (default 8),
# MAX_RESTARTS (default 3), MASTER_PORT (one node: a free port unless given; several nodes: 29500, or
# one derived from SLURM_JOB_ID inside a slurm job), PYTHON (default python).
# The command is checked first (main.py --check_only: flags and data paths), so that a mistake stops
# at once instead of being restarted. A failed process (killed by the OOM killer, a segfault, a lost
# peer) makes torchrun start the group again, MAX_RESTARTS times; --auto_resume continues from the
# newest checkpoint in the output folder, as does the same command run again.
# One node when NUM_GPUS <= GPUS_PER_NODE. Otherwise NUM_GPUS / GPUS_PER_NODE nodes: run the same
# command on each of them with NODE_RANK (0 .. nodes - 1) and MASTER_ADDR (the address of node 0)
# set; node 0 (rank 0) writes the checkpoints and detailed_log.txt, node k detailed_log_node<k>.txt.
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
    # two jobs on one node must not share a port: a slurm job takes one of its own
    port=${MASTER_PORT:-$( [[ "${SLURM_JOB_ID:-}" =~ ^[0-9]+$ ]] && echo $(( 20000 + SLURM_JOB_ID % 10000 )) || echo 29500 )}
    nodes_args=(--nnodes="${num_nodes}" --node_rank="${NODE_RANK}" --master_addr="${MASTER_ADDR}" --master_port="${port}")
    (( NODE_RANK == 0 )) || log_name="detailed_log_node${NODE_RANK}.txt"
elif [[ -n "${MASTER_PORT:-}" ]]; then
    nodes_args=(--master_port="${MASTER_PORT}")
else
    nodes_args=(--standalone)  # a free port: jobs that share the machine never meet
fi
main_args=(--coco_path "${COCO_PATH:-data/coco}" --batch_size "${batch_per_gpu}" --output_dir "${exp_dir}"
           --auto_resume "$@")
"${PYTHON:-python}" main.py "${main_args[@]}" --check_only >/dev/null || exit
torchrun "${nodes_args[@]}" --nproc_per_node="${gpus_per_node}" --max-restarts="${MAX_RESTARTS:-3}" \
    main.py "${main_args[@]}" 2>&1 | tee -a "${exp_dir}/${log_name}"
