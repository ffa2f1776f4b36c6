"""Launching jobs: SLURM (or local / in-process) submission with submitit, and task environments.

On the login node:

- :mod:`promoter_dist.launch.options`: cluster options (:class:`ClusterOptions`), their
  command-line form and the submitit keywords they map to.
- :mod:`promoter_dist.launch.submit`: submitting the training and shard jobs (sbatch).
- :mod:`promoter_dist.launch.resources`: a partition's cores and GPUs (sinfo), this shell's GPUs.
- :mod:`promoter_dist.launch.monitor`: job state, waiting for results, failure reports.

Inside the job's tasks:

- :mod:`promoter_dist.launch.jobs`: the training and shard job callables.
- :mod:`promoter_dist.launch.preemption`: the preemption signal, to the trainer, then to submitit.
- :mod:`promoter_dist.launch.environment`: RANK, WORLD_SIZE, MASTER_ADDR... of a task,
  derived from SLURM's (or submitit's local) variables; SLURM host-list expansion.

Nothing here imports the trainer: a training job imports it inside its tasks.
"""

from .environment import DistEnv, derive, expand_nodelist, master_port
from .jobs import ShardsJob, TrainingJob
from .monitor import JobFailed, wait
from .options import ClusterOptions, executor_parameters
from .submit import submit_shards, submit_training

__all__ = [
    "ClusterOptions", "DistEnv", "JobFailed", "ShardsJob", "TrainingJob", "derive", "executor_parameters",
    "expand_nodelist", "master_port", "submit_shards", "submit_training", "wait",
]
