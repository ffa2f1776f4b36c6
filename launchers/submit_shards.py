#!/usr/bin/env python3
"""Build and verify shards as one SLURM CPU job that uses every core of a node.

    python launchers/submit_shards.py train_sequences.txt --out out/shards --partition cpu --time 2:00:00

This is ``promoter-dist submit shards`` under another name; ``--help`` lists every option
(the shard options of ``promoter-dist shards build`` plus the job options). A requeued
or resubmitted build resumes from the shards already finished; see launchers/README.md.
"""

import sys

from promoter_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["submit", "shards", *sys.argv[1:]]))
