"""Submitting training and shard jobs with submitit: to SLURM, to this machine, or in-process.

The job objects (:class:`TrainingJob`, :class:`ShardsJob`) are small picklable callables.
submitit pickles one into the job folder, ``sbatch`` starts ``srun python -m
submitit.core._submit`` on every task, and each task unpickles and calls it. Nothing of
the trainer is imported on the login node: :class:`TrainingJob` imports its entry point
(``promoter_dist.train:main`` by default) inside the task, after exporting the
distributed environment (:mod:`promoter_dist.launch.environment`).

Preemption and time limits: sbatch is given ``--signal=USR2@<signal_delay_s>``. A training
task routes that signal to the trainer (:func:`promoter_dist.distributed.request_stop`) on
every rank instead of to submitit's handler: the trainer agrees on it over all ranks at the
next step boundary, writes a checkpoint of that step on all ranks (DeepSpeed's save is
collective, so it cannot run inside a signal handler on rank 0 alone) and returns; then
rank 0 hands over to submitit's handler, which calls the job's ``checkpoint()``, pickles
what it returns and requeues the job (same job id). The rerun runs the same argv, which
resumes from ``<run.out_dir>/checkpoints/latest``: that step, with its loader position, so
no step is lost or done twice. Should the trainer not reach a step boundary within
``stop_grace_s`` (a long validation), rank 0 requeues without that checkpoint and the rerun
resumes from the last periodic one. A job requeued from outside (``scontrol requeue``,
preemption with ``PreemptMode=REQUEUE``) reruns its original pickle: the same argv again.

Waiting (:func:`wait`) does not depend on ``sacct``: it polls the result files and
``scontrol show job``, so it works on clusters without an accounting database too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import os
import re
import shutil
import signal
import subprocess
import time as _time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..errors import UserError

if TYPE_CHECKING:  # submitit is imported where used: `promoter-dist --help` should not pay for it
    import argparse

    import submitit
    from submitit.helpers import DelayedSubmission

DEFAULT_ENTRY = "promoter_dist.train:main"
"""The trainer's entry point: ``main(argv: list[str]) -> int``, as called by ``train.py``."""

CLUSTERS = ("slurm", "local", "debug")

# SLURM job states after which nothing more will happen to the job (no requeue pending).
TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
    "PREEMPTED", "REVOKED", "SPECIAL_EXIT",
    "ENDED",  # ours: forgotten by scontrol, unknown to sacct (see slurm_state)
})
# Terminal states a requeue may still follow (PreemptMode=REQUEUE, submitit's own requeue, a node
# failure with --requeue): wait() watches a job in one of them this long before giving up on it.
REQUEUE_GRACE_S = {"PREEMPTED": 120.0, "NODE_FAIL": 120.0}


# --------------------------------------------------------------------------- options


def parse_time(text: str | int) -> int:
    """A SLURM time limit -> whole minutes (seconds round up).

    Accepts every sbatch ``--time`` form: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``,
    ``D-HH:MM``, ``D-HH:MM:SS``; an int is minutes.
    """
    if isinstance(text, int):
        minutes = text
    else:
        s = str(text).strip()
        match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", s)
        if not match:
            raise UserError(f"--time: '{text}' is not a SLURM time (MM, HH:MM:SS, D-HH:MM, ...)")
        days, a, b, c = match.groups()
        numbers = [int(x) for x in (a, b, c) if x is not None]
        if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
            h, m, sec = (numbers + [0, 0])[:3]
            seconds = ((int(days) * 24 + h) * 60 + m) * 60 + sec
        elif len(numbers) == 1:  # MM
            seconds = numbers[0] * 60
        elif len(numbers) == 2:  # MM:SS
            seconds = numbers[0] * 60 + numbers[1]
        else:  # HH:MM:SS
            seconds = (numbers[0] * 60 + numbers[1]) * 60 + numbers[2]
        minutes = -(-seconds // 60)
    if minutes < 1:
        raise UserError(f"--time: '{text}' is shorter than one minute")
    return minutes


def parse_key_values(items: Sequence[str], what: str) -> dict[str, str]:
    """``["mail-type=END", "gres=gpu:8"]`` -> ``{"mail-type": "END", "gres": "gpu:8"}``."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{what}: expected KEY=VALUE, got {item!r}")
        out[key.strip()] = value
    return out


@dataclass
class ClusterOptions:
    """Where and how big a job runs. Every field maps to one sbatch option (or a local setting)."""

    cluster: str = "slurm"
    """"slurm" (sbatch on a cluster), "local" (the tasks as processes on this machine, no SLURM)
    or "debug" (one task inside the submitting process; for pdb)."""
    nodes: int = 1
    """Nodes (``--nodes``); "local" and "debug" run on one."""
    gpus_per_node: int = 0
    """GPUs per node (``--gpus-per-node``); 0 asks for none."""
    tasks_per_node: int | None = None
    """Processes per node (``--ntasks-per-node``); default: one per GPU, or 1 without GPUs."""
    cpus_per_task: int | None = None
    """CPU cores per process (``--cpus-per-task``): dataloader workers + 1 is a good start."""
    mem_gb: float | None = None
    """Memory per node in GB (``--mem``); None: the partition's default."""
    partition: str | None = None
    """Partition (``--partition``); None: the cluster's default partition."""
    account: str | None = None
    """Account to charge (``--account``)."""
    qos: str | None = None
    """Quality of service (``--qos``)."""
    constraint: str | None = None
    """Node features (``--constraint``), e.g. "a100|h100"."""
    time: str = "24:00:00"
    """Time limit of one run of the job (``--time``); a requeued job gets it again."""
    job_name: str = "promoter-dist"
    """Job name shown by squeue (``--job-name``)."""
    signal_delay_s: int = 120
    """USR2 this many seconds before the time limit (``--signal=USR2@N``): the job requeues itself."""
    max_timeouts: int = 3
    """Requeues after hitting the time limit before giving up (preemptions do not count)."""
    exclusive: bool = False
    """Whole nodes only (``--exclusive``)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run in the batch script before the tasks start (``module load ...``, ``source venv``)."""
    additional: dict[str, str] = field(default_factory=dict)
    """Any other sbatch option, name without dashes: {"mail-type": "END", "reservation": "x"}."""

    def __post_init__(self) -> None:
        if self.cluster not in CLUSTERS:
            raise UserError(f"--cluster: '{self.cluster}' is not one of {', '.join(CLUSTERS)}")
        for name in ("nodes", "tasks_per_node", "cpus_per_task"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, not {value}")
        if self.gpus_per_node < 0:
            raise UserError(f"--gpus-per-node must be >= 0, not {self.gpus_per_node}")
        if self.mem_gb is not None and self.mem_gb < 0:
            raise UserError(f"--mem-gb must be >= 0, not {self.mem_gb}")
        if self.cluster in ("local", "debug") and self.nodes != 1:
            raise UserError(f"--cluster {self.cluster} runs on this machine only: use --nodes 1 (or --cluster slurm)")
        if self.cluster == "debug" and self.tasks > 1:
            raise UserError("--cluster debug runs one task in this process: use --tasks-per-node 1 "
                            "(or --cluster local for several processes)")
        parse_time(self.time)  # fail at once on a bad time

    @property
    def tasks(self) -> int:
        """Processes per node actually requested."""
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1

    @property
    def timeout_min(self) -> int:
        return parse_time(self.time)


def add_cluster_arguments(parser: "argparse.ArgumentParser", time: str, job_name: str, training: bool = True) -> None:
    """The :class:`ClusterOptions` as command-line options (``promoter-dist submit ...``).

    ``training=False`` leaves out the job-shape options of a training job (nodes, GPUs,
    tasks): the shard build is always one task on one node.
    """
    g = parser.add_argument_group("where and how the job runs (each maps to an sbatch option)")
    g.add_argument("--cluster", choices=CLUSTERS, default="slurm",
                   help="slurm: sbatch on this cluster; local: the tasks as processes on this machine; "
                        "debug: one task inside this process (default: slurm)")
    if training:
        g.add_argument("--nodes", type=int, default=1, help="nodes (--nodes; default: 1)")
        g.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (--gpus-per-node; default: 0)")
        g.add_argument("--tasks-per-node", type=int, default=None,
                       help="processes per node (--ntasks-per-node; default: one per GPU, 1 without GPUs)")
    g.add_argument("--cpus-per-task", type=int, default=None,
                   help="cores per process (--cpus-per-task; default: " +
                        ("the cluster's default)" if training else "all cores of a node of the partition)"))
    g.add_argument("--mem-gb", type=float, default=None,
                   help="memory per node in GB (--mem; default: " +
                        ("the partition's default)" if training else "all of the node's memory)"))
    g.add_argument("--partition", default=None, help="partition (--partition; default: the cluster's default)")
    g.add_argument("--account", default=None, help="account to charge (--account)")
    g.add_argument("--qos", default=None, help="quality of service (--qos)")
    g.add_argument("--constraint", default=None, help="node features (--constraint), e.g. 'a100|h100'")
    g.add_argument("--time", default=time,
                   help=f"time limit of one run, requeues get it again (--time; default: {time})")
    g.add_argument("--job-name", default=job_name, help=f"job name (--job-name; default: {job_name})")
    g.add_argument("--signal-delay", type=int, default=120, metavar="SECONDS",
                   help="USR2 this long before the time limit, to requeue (--signal=USR2@N; default: 120)")
    g.add_argument("--max-timeouts", type=int, default=3,
                   help="requeues after hitting the time limit before giving up; preemptions do not count (default: 3)")
    g.add_argument("--exclusive", action="store_true", help="whole nodes only (--exclusive)")
    g.add_argument("--setup", action="append", default=[], metavar="SHELL_LINE",
                   help="line run before the tasks start, e.g. 'module load cuda' (repeatable)")
    g.add_argument("--slurm-param", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option without dashes, e.g. mail-type=END (repeatable)")
    g.add_argument("--log-dir", default=None,
                   help="job files go to LOG_DIR/<job id>/ (default: <out dir>/slurm)")
    g.add_argument("--wait", action="store_true",
                   help="wait for the job to end and report its result (always on for local and debug)")


def cluster_options_from_args(args: "argparse.Namespace") -> ClusterOptions:
    """:class:`ClusterOptions` from the options of :func:`add_cluster_arguments`."""
    return ClusterOptions(
        cluster=args.cluster, nodes=getattr(args, "nodes", 1), gpus_per_node=getattr(args, "gpus_per_node", 0),
        tasks_per_node=getattr(args, "tasks_per_node", None), cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb,
        partition=args.partition, account=args.account, qos=args.qos, constraint=args.constraint, time=args.time,
        job_name=args.job_name, signal_delay_s=args.signal_delay, max_timeouts=args.max_timeouts,
        exclusive=args.exclusive, setup=list(args.setup),
        additional=parse_key_values(args.slurm_param, "--slurm-param"),
    )


def executor_parameters(options: ClusterOptions) -> dict[str, Any]:
    """The ``AutoExecutor.update_parameters`` keywords for ``options`` (pure; no SLURM needed).

    Shared keywords apply to every executor; ``slurm_*`` ones only to SLURM, ``local_*`` only
    to the local executor (submitit ignores the others).
    """
    params: dict[str, Any] = {
        "name": options.job_name,
        "timeout_min": options.timeout_min,  # LocalExecutor's default is 2 minutes: always set
        "nodes": options.nodes,
        "tasks_per_node": options.tasks,
    }
    if options.gpus_per_node > 0:
        params["gpus_per_node"] = options.gpus_per_node
    if options.cpus_per_task is not None:
        params["cpus_per_task"] = options.cpus_per_task
        # srun of Slurm 22.05-23.02 does not inherit sbatch's --cpus-per-task: without it each
        # task would be bound to one core where task/affinity or task/cgroup is in use.
        params["slurm_srun_args"] = ["--cpus-per-task", str(options.cpus_per_task)]
    if options.mem_gb is not None:
        params["mem_gb"] = options.mem_gb
    for name in ("partition", "account", "qos", "constraint"):
        value = getattr(options, name)
        if value:
            params[f"slurm_{name}"] = value
    params["slurm_signal_delay_s"] = options.signal_delay_s
    if options.exclusive:
        params["slurm_exclusive"] = True
    if options.setup:
        params["slurm_setup"] = list(options.setup)
        params["local_setup"] = list(options.setup)
    if options.additional:
        params["slurm_additional_parameters"] = dict(options.additional)
    return params


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


# --------------------------------------------------------------------------- job callables


def resolve_entry(spec: str) -> Callable[[list[str]], int | None]:
    """``"package.module:function"`` -> the function (imported now, i.e. inside the job)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"entry point must look like 'package.module:function', not {spec!r}")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"{module_name} has no attribute {attr!r}") from None


_FORK_HOOK_INSTALLED = False


def _reset_signals_in_child() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCONT, signal.SIG_DFL)
    preempt = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)
    signal.signal(preempt, signal.SIG_IGN)


def protect_forked_children() -> None:
    """Give processes forked from this task (Pool, DataLoader workers) sane signal handling.

    submitit installs handlers in the task: SIGTERM and SIGCONT are only logged, USR2 runs
    checkpoint-and-requeue. A forked child inherits them, so ``Pool.terminate()`` (SIGTERM)
    could never stop a worker (the parent then waits forever in ``join``), and at preemption
    every worker would run the requeue logic as if it were rank 0. Children get SIGTERM and
    SIGCONT back to their defaults and ignore USR2 (the task itself handles it; SLURM's
    SIGTERM/SIGKILL after the requeue ends them). Installed once per process.
    """
    global _FORK_HOOK_INSTALLED
    if not _FORK_HOOK_INSTALLED and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_reset_signals_in_child)
        _FORK_HOOK_INSTALLED = True


def _in_job_process() -> bool:
    """True inside a task process started by submitit (not the in-process debug executor)."""
    return os.environ.get("SUBMITIT_EXECUTOR") in ("slurm", "local")


def _log(message: str) -> None:
    print(f"[promoter-dist] {message}", flush=True)


@dataclass(frozen=True)
class TrainingJob:
    """One task of a training job: export the distributed environment, then run the trainer.

    Every task calls ``entry(argv)`` exactly as ``deepspeed train.py <argv>`` would; the
    trainer reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from the environment.
    """

    argv: tuple[str, ...]
    """Trainer arguments: ``("--config", path, "key.sub=value", ...)``."""
    entry: str = DEFAULT_ENTRY
    """``module:function`` called with ``list(argv)``; imported inside the task only."""
    prefer_scontrol: bool = True
    """Expand the node list with ``scontrol show hostnames`` when available (else our parser)."""
    stop_grace_s: float = 90.0
    """After the preemption signal, how long rank 0 waits for the trainer's checkpoint before it
    requeues without one (keep it below sbatch's ``--signal`` delay)."""

    def __call__(self) -> dict[str, Any]:
        from . import environment

        preemption = None
        if _in_job_process():
            protect_forked_children()
            preemption = _PreemptionRelay.install(self.stop_grace_s)
        dist = environment.setup(prefer_scontrol=self.prefer_scontrol)
        _log(f"task rank {dist.rank}/{dist.world_size} (local {dist.local_rank}/{dist.local_world_size}, "
             f"node {dist.node_rank}/{dist.num_nodes}) master {dist.master_addr}:{dist.master_port} "
             f"restart {os.environ.get('SLURM_RESTART_COUNT', '0')}; {self.entry} {' '.join(self.argv)}")
        main = resolve_entry(self.entry)
        # SystemExit is not caught: submitit's requeue (in a signal handler) exits through it.
        status = main(list(self.argv))
        if status not in (None, 0):
            raise RuntimeError(f"{self.entry} returned status {status} on rank {dist.rank}")
        if preemption is not None and preemption.stopped_early():
            # Every rank wrote the checkpoint; rank 0 requeues through submitit (which exits), the
            # others end here and the requeue restarts them.
            preemption.requeue(dist.rank)
            return {"rank": dist.rank, "world_size": dist.world_size, "status": "stopped for requeue"}
        return {"rank": dist.rank, "world_size": dist.world_size, "status": 0}

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """Called by submitit on rank 0 only, at preemption or time limit: requeue the same task.

        By then the trainer has written a checkpoint of its last step on all ranks (or, past
        ``stop_grace_s``, not: then the rerun resumes from the last periodic checkpoint).
        """
        from submitit.helpers import DelayedSubmission

        _log("preempted or at the time limit: requeueing; the rerun resumes from the latest checkpoint")
        return DelayedSubmission(dataclasses.replace(self))


class _PreemptionRelay:
    """Routes the preemption signal of a training task to the trainer, then to submitit.

    submitit's own handler (checkpoint() and requeue on rank 0, nothing elsewhere) is kept and
    called only once the trainer has stopped with a checkpoint, or after ``grace_s`` seconds.
    """

    def __init__(self, signum: int, submitit_handler: Any, grace_s: float):
        self.signum = signum
        self.submitit_handler = submitit_handler
        self.grace_s = grace_s
        self.timer: Any = None

    @classmethod
    def install(cls, grace_s: float) -> "_PreemptionRelay":
        signum = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)
        from ..distributed import arm_stop_requests

        relay = cls(signum, signal.getsignal(signum), grace_s)
        signal.signal(signum, relay.on_signal)
        arm_stop_requests()  # every task of the job installs the relay: all ranks check together
        return relay

    def on_signal(self, signum: int, frame: Any = None) -> None:
        import threading

        from ..distributed import STOP, request_stop

        first = not STOP.requested
        request_stop(signum, frame)
        _log(f"{signal.Signals(signum).name}: preempted or at the time limit; the trainer checkpoints at the "
             "next step and stops")
        if first and callable(self.submitit_handler) and self.grace_s > 0:
            # Rank 0 requeues anyway if the trainer cannot get to a step boundary in time; the
            # checkpoint pointer moves only after every rank wrote, so a half-written save is ignored.
            self.timer = threading.Timer(self.grace_s, self._requeue_without_checkpoint)
            self.timer.daemon = True
            self.timer.start()

    def _requeue_without_checkpoint(self) -> None:
        _log(f"no checkpoint {self.grace_s:.0f} s after the signal: requeueing from the last periodic checkpoint")
        try:
            self.submitit_handler(self.signum, None)  # rank 0: requeue; SLURM then ends every task
        except SystemExit as exit_:  # raised in this thread, where it would end only the thread
            os._exit(exit_.code if isinstance(exit_.code, int) else 1)

    @staticmethod
    def stopped_early() -> bool:
        from ..distributed import STOP

        return STOP.honoured_at_step is not None

    def requeue(self, rank: int) -> None:
        from ..distributed import STOP

        if self.timer is not None:
            self.timer.cancel()
        _log(f"checkpoint of step {STOP.honoured_at_step} written on every rank"
             + ("; requeueing" if rank == 0 else "; rank 0 requeues the job"))
        if rank == 0 and callable(self.submitit_handler):
            self.submitit_handler(self.signum, None)  # checkpoint() -> pickle -> requeue -> exit


def available_cpus() -> int:
    """Cores this task may use: SLURM's allocation, capped by the cores the process may run on."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    value = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if value.isdigit() and int(value) > 0:
        return min(int(value), usable)
    return usable


@dataclass(frozen=True)
class ShardsJob:
    """Build shards with every core of the task, then verify them (a CPU job).

    ``build_shards`` is resumable: finished shards are logged in ``build-state.jsonl`` of the
    output folder and reused (checked by sha256) when the same build runs again, so a
    requeued job continues where it stopped and ends byte-identical.
    """

    source: str
    """DREAM text file (plain or .gz), absolute path."""
    out_dir: str
    """Shard folder, absolute path."""
    options: Any = None
    """:class:`promoter_dist.data.shards.ShardOptions` (None: defaults)."""
    read_options: Any = None
    """:class:`promoter_dist.data.dream.ReadOptions` (None: defaults)."""
    workers: int | None = None
    """Build processes; None: every core allocated to the task."""
    overwrite: bool = False
    """Replace shards built from another source or with other options."""

    def __call__(self) -> dict[str, Any]:
        from ..data.dream import ReadOptions
        from ..data.shards import ShardOptions, build_shards, verify_shards

        if _in_job_process():
            protect_forked_children()  # build_shards and read_dream fork worker pools
        workers = self.workers or available_cpus()
        overwrite = self.overwrite
        if overwrite and os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0"):
            # Requeued from outside (scontrol requeue, preemption): this job's first run already
            # cleared the old shards, and clearing again would throw away the ones it finished.
            overwrite = False
            _log("shards: requeued job: keeping the shards finished before the requeue (overwrite off)")
        _log(f"shards: {self.source} -> {self.out_dir} with {workers} workers")
        result = build_shards(self.source, self.out_dir, self.options or ShardOptions(),
                              self.read_options or ReadOptions(), workers=workers, overwrite=overwrite,
                              progress=False, log=_log)
        check = verify_shards(self.out_dir)
        for problem in check.problems:
            _log(f"BAD {problem}")
        if not check.ok:
            raise RuntimeError(f"shards verify failed for {self.out_dir}: {'; '.join(check.problems[:5])}")
        summary = {
            "out_dir": result.out_dir, "rows": result.manifest["rows"], "shards_written": result.shards_written,
            "shards_reused": result.shards_reused, "seconds": round(result.seconds, 2), "workers": workers,
            "verified_shards": check.shards_checked, "verified_rows": check.rows_checked,
        }
        _log(f"shards done: {summary}")
        return summary

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """Requeue the same build; it resumes from ``build-state.jsonl``.

        ``overwrite`` is dropped for the rerun: the first run already cleared the old shards,
        and clearing again would throw away the shards this run finished.
        """
        from submitit.helpers import DelayedSubmission

        _log("shards: preempted or at the time limit: requeueing; the rerun reuses finished shards")
        return DelayedSubmission(dataclasses.replace(self, overwrite=False))


# --------------------------------------------------------------------------- submit


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


# --------------------------------------------------------------------------- wait and report


def slurm_job_info(job_id: str) -> dict[str, str] | None:
    """``scontrol show job -o ID`` as a dict (JobState, Reason, Restarts, ExitCode, ...).

    ``{}`` when the controller no longer knows the job (purged ``MinJobAge`` after its
    end); None when scontrol is missing or does not answer.
    """
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return None
    try:
        result = subprocess.run([scontrol, "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                                timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0 or not result.stdout.strip():
        return {} if "invalid job id" in (result.stderr + result.stdout).lower() else None
    info: dict[str, str] = {}
    for token in result.stdout.split():
        key, sep, value = token.partition("=")
        if sep and key not in info:
            info[key] = value
    return info


def slurm_state(job: submitit.Job) -> str:
    """The job's state: scontrol first, then submitit's sacct watcher.

    "ENDED" when scontrol has forgotten the job and sacct knows nothing either (no
    accounting database): it ended a while ago, and its result files tell how.
    "UNKNOWN" when neither can be asked.
    """
    info = slurm_job_info(job.job_id)
    if info and info.get("JobState"):
        return info["JobState"]
    state = job.watcher.get_state(job.job_id, mode="force")
    return "ENDED" if state == "UNKNOWN" and info == {} else state


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def log_tail(job: submitit.Job, task: int = 0, lines: int = 30) -> str:
    """The end of a task's stderr (else stdout), with the file it comes from."""
    from submitit.core.utils import JobPaths

    paths = JobPaths(job.paths.folder, job_id=job.job_id, task_id=task)
    for path in (paths.stderr, paths.stdout):
        text = _tail(path, lines)
        if text.strip():
            return f"--- last lines of {path} ---\n{text}"
    return f"(no output in {paths.stderr} or {paths.stdout})"


class JobFailed(UserError):
    """A submitted job ended without a result for every task; the message holds the log tail."""

    def __init__(self, message: str, job_id: str, state: str):
        super().__init__(message)
        self.job_id = job_id
        self.state = state


def _result_paths(job: submitit.Job) -> list[Path]:
    from submitit.core.utils import JobPaths

    return [JobPaths(job.paths.folder, job_id=job.job_id, task_id=t).result_pickle
            for t in range(job.num_tasks)]


def wait(job: submitit.Job, poll_s: float = 2.0, timeout_s: float | None = None,
         on_poll: Callable[[str], None] | None = None) -> list[Any]:
    """Wait for ``job`` to end; return each task's result, or raise :class:`JobFailed`.

    A SLURM job is done when its state is terminal (COMPLETED, FAILED, ...) as seen by
    ``scontrol`` (falling back to ``sacct``), and its tasks' results are read then. A task
    that raised, or left no result (killed, out of memory, failed before Python started),
    becomes a :class:`JobFailed` naming the job, its state and the log tail of that task.
    ``on_poll`` is called with the state on each poll (progress display, tests).
    """
    import submitit
    from submitit.core.utils import pickle_load

    start = _time.monotonic()
    if isinstance(job, submitit.DebugJob):
        try:
            return job.results()
        except Exception as exc:  # noqa: BLE001 - the job's own error, in this process
            tail = "".join(traceback.format_exception(exc)[-12:]).rstrip()
            raise JobFailed(f"job {job.job_id} (debug) failed: {exc}\n{tail}", job.job_id, "FAILED") from None
    state = "UNKNOWN"
    if isinstance(job, submitit.SlurmJob):
        ended_since: float | None = None
        while True:
            state = slurm_state(job)
            if on_poll is not None:
                on_poll(state)
            name = state.split()[0]
            if name in TERMINAL_STATES:
                if all(p.exists() for p in _result_paths(job)):
                    break
                # No results yet: keep looking a little (at least one more poll), in case the job is
                # being requeued; a preempted job may sit in PREEMPTED until the controller requeues it.
                now = _time.monotonic()
                ended_since = now if ended_since is None else ended_since
                if now - ended_since >= max(REQUEUE_GRACE_S.get(name, 0.0), poll_s):
                    break
                _time.sleep(poll_s)
                continue
            ended_since = None
            if state == "UNKNOWN" and all(p.exists() for p in _result_paths(job)):
                break  # forgotten by SLURM (purged, no accounting) after writing every result
            if timeout_s is not None and _time.monotonic() - start > timeout_s:
                raise JobFailed(f"job {job.job_id} still {state} after {timeout_s:.0f} s", job.job_id, state)
            _time.sleep(poll_s)
        # Results are written just before a task exits; give a slow shared filesystem a moment.
        deadline = _time.monotonic() + 30
        while not all(p.exists() for p in _result_paths(job)) and _time.monotonic() < deadline and state == "COMPLETED":
            _time.sleep(0.5)
    else:
        while not job.done():
            if timeout_s is not None and _time.monotonic() - start > timeout_s:
                raise JobFailed(f"job {job.job_id} still running after {timeout_s:.0f} s", job.job_id, "RUNNING")
            _time.sleep(poll_s)
        state = job.state
    results: list[Any] = []
    for task, path in enumerate(_result_paths(job)):
        if not path.exists():
            raise JobFailed(f"job {job.job_id} ended {state} without a result from task {task}\n"
                            f"{log_tail(job, task)}", job.job_id, state)
        outcome, value = pickle_load(path)
        if outcome != "success":
            last = str(value).strip().splitlines()[-1] if str(value).strip() else "error"
            raise JobFailed(f"job {job.job_id} failed on task {task}: {last}\n{log_tail(job, task)}",
                            job.job_id, state if state in TERMINAL_STATES else "FAILED")
        results.append(value)
    return results


def describe(job: submitit.Job, options: ClusterOptions) -> str:
    """One line for the user: what was submitted and where its files are."""
    shape = f"{options.nodes} node(s) x {options.tasks} task(s)"
    if options.gpus_per_node:
        shape += f", {options.gpus_per_node} GPU(s) per node"
    return f"submitted job {job.job_id} ({options.cluster}, {shape}); logs: {job.paths.folder}"


def cancel(job: submitit.Job) -> None:
    """Cancel a job (ignore one that already ended)."""
    from submitit.core.utils import UncompletedJobError

    try:
        job.cancel(check=False)
    except (OSError, UncompletedJobError):
        pass


__all__ = [
    "CLUSTERS", "DEFAULT_ENTRY", "ClusterOptions", "JobFailed", "ShardsJob", "TrainingJob", "add_cluster_arguments",
    "available_cpus", "cancel", "check_cluster", "cluster_options_from_args", "describe", "executor_parameters",
    "job_folder", "log_tail", "make_executor", "parse_key_values", "parse_time", "partition_cpus",
    "protect_forked_children", "resolve_entry", "slurm_job_info", "slurm_state", "submit", "submit_shards",
    "submit_training", "training_out_dir", "wait",
]
