#!/usr/bin/env bash
# The shard stage as one CPU job using every core (and all memory) of a node, then verify.
#   bash launchers/slurm_shards.sh train_sequences.txt [OUT_DIR] [PARTITION]
# Resubmitting after a failure or cancellation resumes: finished shards are reused.
set -euo pipefail
source_file=${1:?usage: launchers/slurm_shards.sh SOURCE [OUT_DIR] [PARTITION]}
out=${2:-out/shards}
partition=${3:-cpu}
python launchers/submit_shards.py "$source_file" --out "$out" --partition "$partition" --time 2:00:00 --wait
