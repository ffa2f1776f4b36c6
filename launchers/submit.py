#!/usr/bin/env python3
"""Submit a training run as one SLURM job: the same run as ``deepspeed train.py --config ...``.

    python launchers/submit.py --config configs/nad/full.yaml --nodes 4 --gpus-per-node 8 \\
        --partition gpu --time 24:00:00 [key.sub=value ...]

This is ``promoter-dist submit train`` under another name; ``--help`` lists every option
(nodes, GPUs and tasks per node, CPUs per task, memory, partition, account, QoS,
constraint, time, extra sbatch options, ``--cluster local|debug`` to run without SLURM).
The job requeues itself at preemption or time limit and resumes from the latest
checkpoint; see launchers/README.md.
"""

import sys

from promoter_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["submit", "train", *sys.argv[1:]]))
