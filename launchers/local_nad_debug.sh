#!/usr/bin/env bash
# The SLURM launch path without SLURM: 2 tasks of the debug NAD config as processes on this
# machine (submitit's local executor, gloo on CPUs), waiting for the result.
#   bash launchers/local_nad_debug.sh [extra key=value overrides]
# Needs the demo shards and GloVe vectors: promoter-dist demo --out out/demo
set -euo pipefail
python launchers/submit.py --config configs/nad/debug.yaml --cluster local --tasks-per-node 2 --gpus-per-node 0 \
    --time 1:00:00 run.out_dir=runs/nad-debug-local "$@"
