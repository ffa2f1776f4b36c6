"""Submitting training and shard jobs with submitit from the login node: to SLURM, to this machine, or in-process.

:func:`submit_training` and :func:`submit_shards` check their inputs, configure a submitit
executor from :class:`~promoter_dist.launch.options.ClusterOptions` and submit one job
callable (:mod:`promoter_dist.launch.jobs`); sbatch's refusals become
:class:`~promoter_dist.errors.UserError`. Nothing of the trainer is imported here.

Preemption and time limits: sbatch is given ``--signal=USR2@<signal_delay_s>``. A training
task routes that signal to the trainer on every rank
(:mod:`promoter_dist.launch.preemption`): the trainer writes a checkpoint of the step in
progress on all ranks and returns, then rank 0 requeues the job (same job id) and the rerun
resumes from ``<run.out_dir>/checkpoints/latest``. The trainer gets up to ``stop_grace_s``
(set here from the signal's lead) to reach that step boundary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..errors import UserError
from .jobs import DEFAULT_ENTRY, ShardsJob, TrainingJob
from .options import ClusterOptions, executor_parameters, refuse_control_characters

if TYPE_CHECKING:  # submitit is imported where used: `promoter-dist --help` should not pay for it
    import submitit


def check_cluster(cluster: str) -> None:
    """Refuse early, with what to do instead, when the requested executor cannot run here."""
    if cluster == "slurm":
        missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
        if missing:
            raise UserError(
                f"--cluster slurm: {' and '.join(missing)} not found on PATH, so this machine cannot submit to "
                "SLURM; run on a login node of the cluster, or use --cluster local (all tasks on this machine) "
                "or --cluster debug (one task in this process)"
            )


def make_executor(options: ClusterOptions, folder: str | os.PathLike) -> submitit.AutoExecutor:
    """A configured submitit executor writing job files under ``folder`` (may contain ``%j``)."""
    import submitit

    check_cluster(options.cluster)
    executor = submitit.AutoExecutor(folder=str(folder), cluster=options.cluster,
                                     slurm_max_num_timeout=options.max_timeouts)
    executor.update_parameters(**executor_parameters(options))
    return executor


def partition_cpus(partition: str | None = None) -> int | None:
    """CPU cores of one node of ``partition`` (the default partition when None), from sinfo.

    The smallest node of the partition counts (sinfo prints "32+" for mixed sizes).
    None when sinfo is missing or says nothing useful.
    """
    sinfo = shutil.which("sinfo")
    if sinfo is None:
        return None
    cmd = [sinfo, "-h", "-o", "%P %c"] + (["-p", partition] if partition else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        name, _, cpus = line.strip().partition(" ")
        if partition is None and not name.endswith("*"):
            continue  # the default partition is marked with '*'
        match = re.match(r"(\d+)", cpus.strip())
        if match:
            return int(match.group(1))
    return None


def submit(executor: submitit.AutoExecutor, job: Callable[[], Any]) -> submitit.Job:
    """Submit ``job``; a refusal by sbatch becomes a :class:`UserError` carrying sbatch's message."""
    from submitit.core.utils import FailedJobError, JobPaths

    root = Path(JobPaths.get_first_id_independent_folder(executor.folder))
    before = set(root.iterdir()) if root.is_dir() else set()
    try:
        # submitit also prints sbatch's stderr on failure; it is in the error raised below instead.
        with contextlib.redirect_stderr(io.StringIO()):
            return executor.submit(job)
    except FailedJobError as exc:  # sbatch exited non-zero; its stderr is the message
        for leftover in (set(root.iterdir()) if root.is_dir() else set()) - before:
            if leftover.is_file() and (leftover.suffix == ".pkl" or leftover.name.startswith(".submission_file")):
                leftover.unlink(missing_ok=True)  # the pickle and script of the refused job
        message = " / ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise UserError(f"sbatch refused the job: {message}") from None


def job_folder(log_dir: str | os.PathLike) -> str:
    """Job files go to ``<log_dir>/<job id>/`` (submitit replaces ``%j``)."""
    return str(Path(log_dir).absolute() / "%j")


def training_out_dir(config: str | os.PathLike, overrides: Sequence[str]) -> str | None:
    """``run.out_dir`` of a run: the last ``run.out_dir=`` override, else the config file's value.

    Read without the trainer's config module (the login node imports no training code);
    None when neither names one.
    """
    for item in reversed(list(overrides)):
        key, sep, value = item.partition("=")
        if sep and key.strip() == "run.out_dir":
            return value
    try:
        import yaml

        with open(config) as handle:
            data = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise UserError(f"{config}: no such file") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{config}: not valid YAML: {str(exc).splitlines()[0]}") from None
    run = data.get("run") if isinstance(data, dict) else None
    out = run.get("out_dir") if isinstance(run, dict) else None
    return str(out) if out else None


def submit_training(config: str | os.PathLike, overrides: Sequence[str], options: ClusterOptions,
                    log_dir: str | os.PathLike | None = None, entry: str = DEFAULT_ENTRY) -> submitit.Job:
    """Submit the training of ``config`` (+ ``key=value`` overrides) as one job of N nodes x G tasks.

    Job files (script, pickles, per-task logs) go to ``<log_dir>/<job id>/``; ``log_dir``
    defaults to ``<run.out_dir>/slurm``.
    """
    config = Path(config)
    # The job folder (from --log-dir or run.out_dir) is written into the sbatch script; the config
    # path and the overrides travel in the job's pickle and its log lines.
    named = [("--config", config.absolute()), *(("override", item) for item in overrides)]
    if log_dir is not None:
        named.append(("--log-dir", Path(log_dir).absolute()))
    for what, value in named:
        refuse_control_characters(str(value), what)
    if not config.is_file():
        raise UserError(f"{config}: no such config file")
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise UserError(f"override {item!r}: expected key.sub=value")
    if log_dir is None:
        out_dir = training_out_dir(config, overrides)
        if out_dir is None:
            raise UserError(f"{config}: no run.out_dir in the config; add run.out_dir=DIR or pass --log-dir")
        log_dir = Path(out_dir) / "slurm"
        refuse_control_characters(str(log_dir.absolute()), "run.out_dir")  # from the config file or the cwd
    # The job starts in the submitting directory; an absolute config path survives a `cd` in setup.
    argv = ("--config", str(config.absolute()), *overrides)
    executor = make_executor(options, job_folder(log_dir))
    # Wait up to two thirds of the signal's lead for the trainer's checkpoint (with a long lead, up to
    # all but the last minute), leaving the rest for the requeue; a lead of 10 s or less: no fallback.
    grace = max(options.signal_delay_s * 2 / 3, options.signal_delay_s - 60) if options.signal_delay_s > 10 else 0
    return submit(executor, TrainingJob(argv, entry=entry, stop_grace_s=grace))


def submit_shards(source: str | os.PathLike, out_dir: str | os.PathLike, options: ClusterOptions,
                  shard_options: Any = None, read_options: Any = None, workers: int | None = None,
                  overwrite: bool = False, log_dir: str | os.PathLike | None = None) -> submitit.Job:
    """Submit the shard build (+ verify) of ``source`` as one single-task CPU job using a whole node.

    ``options.cpus_per_task`` defaults to the cores of one node of the partition (sinfo; this
    machine's cores for local/debug); memory defaults to all of the node's (``--mem=0``).
    Job files go to ``<log_dir>/<job id>/``, ``log_dir`` defaulting to ``<out_dir>/slurm``.
    """
    source, out = Path(source).absolute(), Path(out_dir).absolute()
    # The shard folder (or --log-dir) holds the job folder written into the sbatch script.
    named = [("source", source), ("--out", out)]
    if log_dir is not None:
        named.append(("--log-dir", Path(log_dir).absolute()))
    for what, value in named:
        refuse_control_characters(str(value), what)
    if not source.is_file():
        raise UserError(f"{source}: no such file")
    if options.nodes != 1 or options.tasks != 1 or options.gpus_per_node:
        raise UserError("the shard build is one process on one node: use --nodes 1 --tasks-per-node 1, no GPUs")
    options = dataclasses.replace(options)
    if options.cpus_per_task is None:
        if options.cluster == "slurm":
            check_cluster("slurm")
            options.cpus_per_task = partition_cpus(options.partition)
            if options.cpus_per_task is None:
                raise UserError("could not read the node size of the partition from sinfo; pass --cpus-per-task N")
        else:
            options.cpus_per_task = os.cpu_count() or 1
    if options.mem_gb is None and options.cluster == "slurm" and "mem" not in options.additional:
        options.additional = {**options.additional, "mem": "0"}  # all memory of the node
    job = ShardsJob(str(source), str(out), shard_options, read_options, workers, overwrite)
    executor = make_executor(options, job_folder(log_dir if log_dir is not None else out / "slurm"))
    return submit(executor, job)


__all__ = [
    "check_cluster", "job_folder", "make_executor", "partition_cpus", "submit", "submit_shards", "submit_training",
    "training_out_dir",
]
