#!/usr/bin/env bash
# Team NAD's full recipe on 4 nodes x 8 GPUs, submitted from a login node (no sbatch script).
#   bash launchers/slurm_nad_full.sh [PARTITION] [extra key=value overrides]
# configs/nad/full.yaml assumes 8 GPUs x 256 = global batch 2048; on 32 GPUs keep 2048
# with 64 per GPU. Rerunning this script after the job died continues the same run
# (run.out_dir holds the checkpoints); preemption and time limits requeue it by themselves.
set -euo pipefail
partition=${1:-gpu}
shift $(( $# >= 1 ? 1 : 0 ))
python launchers/submit.py --config configs/nad/full.yaml \
    --nodes 4 --gpus-per-node 8 --cpus-per-task 6 --partition "$partition" --time 24:00:00 \
    data.batch_size=64 run.out_dir=runs/nad-full-4x8 "$@"
