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

A training job's unset sizes are filled in before it is submitted (:func:`training_options`):
its GPUs from the partition (sinfo) or this machine, its cores from the loader's workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from ..errors import UserError
from .jobs import DEFAULT_ENTRY, ShardsJob, TrainingJob
from .options import ClusterOptions, executor_parameters, refuse_control_characters
from .resources import partition_cpus, read_partition_gpus, shell_gpus, visible_devices

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


def local_visible_gpus(options: ClusterOptions, environ: Mapping[str, str] | None = None) -> tuple[int, ...] | None:
    """The GPU indices a ``local`` job's tasks may use: the submitting shell's ``CUDA_VISIBLE_DEVICES``.

    submitit's local executor sets ``CUDA_VISIBLE_DEVICES`` of the tasks to ``0..G-1`` unless
    it is given these (it then takes the first G): without them a shell limited to GPUs 4-7
    would run on 0-3. None when the variable is unset or the job asks for no GPUs.
    """
    environ = os.environ if environ is None else environ
    if options.cluster != "local" or not options.gpus_per_node or "CUDA_VISIBLE_DEVICES" not in environ:
        return None
    ids = visible_devices(environ["CUDA_VISIBLE_DEVICES"])
    if not all(entry.isdigit() for entry in ids):
        raise UserError(f"--cluster local: CUDA_VISIBLE_DEVICES={environ['CUDA_VISIBLE_DEVICES']} names GPUs by "
                        "UUID, and submitit's local executor passes its tasks GPU indices only: list the GPUs by "
                        "index (e.g. CUDA_VISIBLE_DEVICES=0,1), or pass --gpus-per-node 0 to train on CPUs")
    return tuple(int(entry) for entry in ids)


def make_executor(options: ClusterOptions, folder: str | os.PathLike) -> submitit.AutoExecutor:
    """A configured submitit executor writing job files under ``folder`` (may contain ``%j``)."""
    import submitit

    check_cluster(options.cluster)
    visible = local_visible_gpus(options)
    executor = submitit.AutoExecutor(folder=str(folder), cluster=options.cluster,
                                     slurm_max_num_timeout=options.max_timeouts)
    executor.update_parameters(**executor_parameters(options))
    if visible is not None:
        # AutoExecutor does not pass visible_gpus on; the local executor's own update_parameters
        # takes it, and checks it against the GPUs asked for in the same call.
        executor._executor.update_parameters(gpus_per_node=options.gpus_per_node, visible_gpus=visible)
    return executor


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


LOADER_WORKERS_DEFAULT = 0
"""``data.num_workers`` of a config that does not set it: the trainer's ``DataConfig.num_workers``
(read here as a constant, since the config module imports the models; a test keeps them equal)."""

_UNSET = object()


def _lookup(value: Any, path: Sequence[str]) -> Any:
    """``value[path[0]][path[1]]...``, or ``_UNSET`` where a level is missing or not a mapping."""
    for name in path:
        if not isinstance(value, dict) or name not in value:
            return _UNSET
        value = value[name]
    return value


def config_value(config: str | os.PathLike, overrides: Sequence[str], key: str) -> Any:
    """The value a run's dotted ``key`` (``"data.num_workers"``) gets from its config file and overrides.

    As in the trainer, the last override setting the key (``data.num_workers=4``, or the
    section, ``data={num_workers: 4}``) wins over the file, and override values are YAML. Read
    without the trainer's config module (the login node imports no training code); None when
    neither sets the key.
    """
    import yaml

    path = key.split(".")
    for item in reversed(list(overrides)):
        dotted, sep, raw = item.partition("=")
        names = dotted.strip().split(".")
        if not sep or names != path[: len(names)]:
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise UserError(f"override {item!r}: the value is not valid YAML") from None
        found = _lookup(value, path[len(names):])
        if found is not _UNSET:
            return found
    try:
        with open(config) as handle:
            data = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise UserError(f"{config}: no such file") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{config}: not valid YAML: {str(exc).splitlines()[0]}") from None
    found = _lookup(data, path)
    return None if found is _UNSET else found


def training_out_dir(config: str | os.PathLike, overrides: Sequence[str]) -> str | None:
    """``run.out_dir`` of a run: the last ``run.out_dir=`` override, else the config file's value.

    None when neither names one.
    """
    out = config_value(config, overrides, "run.out_dir")
    return None if out is None or out == "" else str(out)


def loader_workers(config: str | os.PathLike, overrides: Sequence[str]) -> int:
    """``data.num_workers`` of a run (the loader's worker processes per rank), checked as the trainer checks it."""
    value = config_value(config, overrides, "data.num_workers")
    if value is None:
        return LOADER_WORKERS_DEFAULT
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{config}: data.num_workers: expected an integer, got {value!r}")
    if value < 0:
        raise UserError(f"{config}: data.num_workers must be >= 0, not {value}")
    return value


GPU_SLURM_PARAMS = ("gpus", "gpus-per-node", "gpus-per-task", "gpus-per-socket", "G")
"""``--slurm-param`` keys that ask for GPUs another way than ``--gpus-per-node`` (so does a ``gres`` naming gpu)."""


def default_gpus_per_node(options: ClusterOptions) -> int:
    """GPUs per node for a training job that did not say: what the cluster (or this machine) has.

    - slurm: 0 on a partition without GPUs (or when sinfo cannot tell); on a partition with
      GPUs, a :class:`UserError` asking for ``--gpus-per-node N`` (or 0 on purpose), since a job
      without GPUs would silently train on CPUs; 0 as well when ``--slurm-param`` already asks
      for GPUs (``gres=gpu:...``, ``gpus-per-task=1`` ...).
    - local: every GPU the submitting shell sees (``CUDA_VISIBLE_DEVICES``, else ``nvidia-smi -L``).
    - debug: one task in this process, so at most one.
    """
    if options.cluster == "slurm":
        check_cluster("slurm")
        asked = any(key in GPU_SLURM_PARAMS or (key == "gres" and "gpu" in value)
                    for key, value in options.additional.items())
        found = None if asked else read_partition_gpus(options.partition)
        if found is None or found.gpus == 0:
            return 0
        raise UserError(f"partition {found.name} has GPUs ({found.gres}) but the job asks for none: pass "
                        f"--gpus-per-node N (or --gpus-per-node 0 to train on CPUs on purpose)")
    count = len(shell_gpus() or [])
    return count if options.cluster == "local" else min(count, 1)


def training_options(options: ClusterOptions, config: str | os.PathLike, overrides: Sequence[str]) -> ClusterOptions:
    """``options`` of a training job with what was left unset filled in (a copy).

    GPUs per node: :func:`default_gpus_per_node`. Cores per task: the run's
    ``data.num_workers`` + 1, one core for the rank and one for each of its loader workers
    (many clusters give one core per task otherwise, shared by all of them).
    """
    options = dataclasses.replace(options)
    if options.gpus_per_node is None:
        gpus = default_gpus_per_node(options)
        if options.cluster == "local" and gpus and options.tasks_per_node is not None and options.tasks_per_node > gpus:
            raise UserError(f"--tasks-per-node {options.tasks_per_node}, but this shell sees {gpus} GPU(s): start at "
                            "most one task per GPU, or pass --gpus-per-node 0 to run the tasks on CPUs")
        options.gpus_per_node = gpus
    elif options.cluster == "local" and options.gpus_per_node:
        seen = shell_gpus()
        if seen is not None and options.gpus_per_node > len(seen):
            raise UserError(f"--gpus-per-node {options.gpus_per_node}, but this shell sees {len(seen)} GPU(s)"
                            + (f" (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']})"
                               if "CUDA_VISIBLE_DEVICES" in os.environ else ""))
    if options.cpus_per_task is None:
        options.cpus_per_task = loader_workers(config, overrides) + 1
    return dataclasses.replace(options)  # checked again with the values filled in


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
    options = training_options(options, config, overrides)
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
    "GPU_SLURM_PARAMS", "LOADER_WORKERS_DEFAULT", "check_cluster", "config_value", "default_gpus_per_node",
    "job_folder", "loader_workers", "local_visible_gpus", "make_executor", "submit", "submit_shards",
    "submit_training", "training_options", "training_out_dir",
]
