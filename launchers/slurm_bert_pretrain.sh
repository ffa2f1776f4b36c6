#!/usr/bin/env bash
# SYSU-SAIL's 3-mer BERT pretraining (masked LM) on one node with 8 GPUs, then wait for it.
#   bash launchers/slurm_bert_pretrain.sh [PARTITION] [extra key=value overrides]
set -euo pipefail
partition=${1:-gpu}
shift $(( $# >= 1 ? 1 : 0 ))
python launchers/submit.py --config configs/bert/pretrain.yaml \
    --nodes 1 --gpus-per-node 8 --cpus-per-task 6 --partition "$partition" --time 12:00:00 --wait \
    run.out_dir=runs/bert-pretrain "$@"
