"""Where and how big a job runs: :class:`ClusterOptions`, its command-line options and its submitit keywords.

Pure and cheap: no SLURM, no submitit, no trainer; the login node parses and checks the
options here before anything is submitted (:mod:`promoter_dist.launch.submit`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import UserError

if TYPE_CHECKING:
    import argparse

CLUSTERS = ("slurm", "local", "debug")


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


_CONTROL_CHARACTER_NAMES = {"\0": "NUL", "\t": "tab", "\n": "newline", "\r": "carriage return",
                            "\x1b": "escape", "\x7f": "DEL"}


def refuse_control_characters(value: str, what: str, allow_tab: bool = False) -> None:
    """Raise a :class:`UserError` naming ``what`` when ``value`` holds a C0 control character or DEL.

    Such strings reach the generated sbatch script or a shell (``#SBATCH`` lines, the setup
    lines, the job folder on the srun line): a newline there ends the line and starts a new
    command, whatever quoting submitit adds. ``allow_tab`` keeps tabs, plain shell whitespace,
    for shell lines the user writes (``--setup``).
    """
    for index, char in enumerate(value):
        if (char < " " or char == "\x7f") and not (allow_tab and char == "\t"):
            name = _CONTROL_CHARACTER_NAMES.get(char, f"U+{ord(char):04X}")
            raise UserError(f"{what}: {value!r} holds a control character ({name}) at position {index + 1}; "
                            "it would break the job's batch script or shell command: remove it")


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
    gpus_per_node: int | None = None
    """GPUs per node (``--gpus-per-node``); 0 asks for none. None: a training job takes the
    cluster's answer (:func:`promoter_dist.launch.submit.training_options`: refused on a SLURM
    partition with GPUs, 0 on one without; every GPU of this machine for ``local``)."""
    tasks_per_node: int | None = None
    """Processes per node (``--ntasks-per-node``); default: one per GPU, or 1 without GPUs."""
    cpus_per_task: int | None = None
    """CPU cores per process (``--cpus-per-task``); None: a training job takes its loader's
    ``data.num_workers`` + 1, other jobs the cluster's default."""
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
        if self.gpus_per_node is not None and self.gpus_per_node < 0:
            raise UserError(f"--gpus-per-node must be >= 0, not {self.gpus_per_node}")
        if self.gpus_per_node and self.tasks_per_node is not None and self.tasks_per_node > self.gpus_per_node:
            # Said before the job queues: in the job, ranks would share a GPU or ask for one that is not there.
            raise UserError(f"--tasks-per-node {self.tasks_per_node} with --gpus-per-node {self.gpus_per_node}: "
                            "more tasks than GPUs; start one task per GPU (leave --tasks-per-node unset)")
        if self.mem_gb is not None and self.mem_gb < 0:
            raise UserError(f"--mem-gb must be >= 0, not {self.mem_gb}")
        if self.cluster in ("local", "debug") and self.nodes != 1:
            raise UserError(f"--cluster {self.cluster} runs on this machine only: use --nodes 1 (or --cluster slurm)")
        if self.cluster == "debug" and self.tasks > 1:
            raise UserError("--cluster debug runs one task in this process: use --tasks-per-node 1 "
                            "(or --cluster local for several processes)")
        # Every string that reaches the sbatch script (or the local executor's shell), before anything else uses it.
        for name in ("job_name", "partition", "account", "qos", "constraint", "time"):
            value = getattr(self, name)
            if value is not None:
                refuse_control_characters(str(value), f"--{name.replace('_', '-')}")
        for line in self.setup:
            refuse_control_characters(line, "--setup", allow_tab=True)
        for key, value in self.additional.items():
            refuse_control_characters(key, "--slurm-param")
            refuse_control_characters(str(value), f"--slurm-param {key}")
        parse_time(self.time)  # fail at once on a bad time

    @property
    def tasks(self) -> int:
        """Processes per node actually requested."""
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return self.gpus_per_node if self.gpus_per_node else 1

    @property
    def timeout_min(self) -> int:
        """The time limit in whole minutes (submitit's ``timeout_min``)."""
        return parse_time(self.time)


def add_cluster_arguments(parser: argparse.ArgumentParser, time: str, job_name: str, training: bool = True) -> None:
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
        g.add_argument("--gpus-per-node", type=int, default=None,
                       help="GPUs per node (--gpus-per-node); 0 trains on CPUs. Default: on slurm, none on a "
                            "partition without GPUs and an error on one with GPUs (say how many); on local, "
                            "every GPU this shell sees (CUDA_VISIBLE_DEVICES, else nvidia-smi)")
        g.add_argument("--tasks-per-node", type=int, default=None,
                       help="processes per node (--ntasks-per-node; default: one per GPU, 1 without GPUs)")
    g.add_argument("--cpus-per-task", type=int, default=None,
                   help="cores per process (--cpus-per-task, given to srun too; default: " +
                        ("the config's data.num_workers + 1)" if training else "all cores of a node of the partition)"))
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


def cluster_options_from_args(args: argparse.Namespace) -> ClusterOptions:
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
    if options.gpus_per_node:
        params["gpus_per_node"] = options.gpus_per_node
    # One task exiting non-zero ends the others: the ranks left would otherwise wait in a
    # collective for the dead one until the time limit.
    srun_args = ["--kill-on-bad-exit=1"]
    if options.cpus_per_task is not None:
        params["cpus_per_task"] = options.cpus_per_task
        # srun of Slurm 22.05-23.02 does not inherit sbatch's --cpus-per-task: without it each
        # task would be bound to one core where task/affinity or task/cgroup is in use.
        srun_args += ["--cpus-per-task", str(options.cpus_per_task)]
    params["slurm_srun_args"] = srun_args
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


__all__ = [
    "CLUSTERS", "ClusterOptions", "add_cluster_arguments", "cluster_options_from_args", "executor_parameters",
    "parse_key_values", "parse_time", "refuse_control_characters",
]
