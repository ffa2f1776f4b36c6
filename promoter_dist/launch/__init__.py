"""Launching jobs: SLURM (or local / in-process) submission with submitit, and task environments.

- :mod:`promoter_dist.launch.environment`: RANK, WORLD_SIZE, MASTER_ADDR... of a task,
  derived from SLURM's (or submitit's local) variables; SLURM host-list expansion.
- :mod:`promoter_dist.launch.slurm`: cluster options, the training and shard job callables,
  submission, waiting and failure reports.

Nothing here imports the trainer: a training job imports it inside its tasks.
"""

from .environment import DistributedEnv, derive, expand_nodelist, master_port
from .slurm import (ClusterOptions, JobFailed, ShardsJob, TrainingJob, executor_parameters, submit_shards,
                    submit_training, wait)

__all__ = [
    "ClusterOptions", "DistributedEnv", "JobFailed", "ShardsJob", "TrainingJob", "derive", "executor_parameters",
    "expand_nodelist", "master_port", "submit_shards", "submit_training", "wait",
]
