#!/usr/bin/env bash
# Shared launcher of the scripts in this folder: one srun task per GPU, possibly over several nodes.
#   launch.sh EXP_NAME NUM_GPUS BATCH_PER_GPU [main.py flags...]
# Environment (defaults in brackets):
#   PARTITION [gpu]  GPUS_PER_NODE [min(NUM_GPUS, 8)]  CPUS_PER_TASK [4]  JOB_NAME [SAM-DETR]
#   COCO_PATH [data/coco]  OUTPUT_ROOT [output]  SRUN_ARGS [] (extra srun flags)
#   MASTER_PORT [one derived from SLURM_JOB_ID, so that jobs sharing a node do not meet]
# Runs resume from OUTPUT_ROOT/EXP_NAME/checkpoint.pth when it exists (--auto_resume), so a
# requeued or re-submitted job continues. A step that fails (a process killed by the OOM killer or
# a segfault, a lost peer) is started again, MAX_RESTARTS [3] times, and resumes the same way; one
# that main.py stopped itself (a flag, a path or the data that another try would meet again, or a
# failure that repeats: exit status 2 and EXP_DIR/stopped.txt) is not. For automatic requeue on
# time limit and node failure, submit through sbatch with `--signal=USR1@120 --requeue
# --open-mode=append` (see README, "Preemption and failures").
set -euo pipefail
exp_name=$1; num_gpus=$2; batch_per_gpu=$3; shift 3
cd "$(dirname "$0")/.."
gpus_per_node=${GPUS_PER_NODE:-$(( num_gpus < 8 ? num_gpus : 8 ))}
exp_dir="${OUTPUT_ROOT:-output}/${exp_name}"
mkdir -p "${exp_dir}"
max_restarts=${MAX_RESTARTS:-3}
no_retry=2  # main.py's exit status when it stops for a reason that another try would meet again
for (( attempt = 0; ; attempt++ )); do
    status=0
    rm -f "${exp_dir}/stopped.txt"
    # shellcheck disable=SC2086
    srun -p "${PARTITION:-gpu}" \
        --job-name="${JOB_NAME:-SAM-DETR}" \
        --gres="gpu:${gpus_per_node}" \
        --ntasks="${num_gpus}" \
        --ntasks-per-node="${gpus_per_node}" \
        --cpus-per-task="${CPUS_PER_TASK:-4}" \
        --kill-on-bad-exit=1 \
        ${SRUN_ARGS:-} \
        python main.py \
        --coco_path "${COCO_PATH:-data/coco}" \
        --batch_size "${batch_per_gpu}" \
        --output_dir "${exp_dir}" \
        --auto_resume \
        "$@" 2>&1 | tee -a "${exp_dir}/detailed_log.txt" || status=$?
    (( status == 0 )) && exit 0
    if (( status == no_retry )) || [[ -f "${exp_dir}/stopped.txt" ]]; then
        echo "launch.sh: main.py stopped (exit status ${status}) for a reason that another try would meet again;" \
             "not starting it again. It said: $(cat "${exp_dir}/stopped.txt" 2>/dev/null || echo '(see the log)')" \
            | tee -a "${exp_dir}/detailed_log.txt" >&2
        exit "${status}"
    fi
    if (( attempt >= max_restarts )); then
        echo "launch.sh: srun failed with exit status ${status} after ${attempt} restarts (MAX_RESTARTS=${max_restarts});" \
             "giving up" | tee -a "${exp_dir}/detailed_log.txt" >&2
        exit "${status}"
    fi
    echo "launch.sh: srun failed with exit status ${status}; starting it again ($(( attempt + 1 )) of" \
         "${max_restarts}), from the newest checkpoint" | tee -a "${exp_dir}/detailed_log.txt" >&2
done
