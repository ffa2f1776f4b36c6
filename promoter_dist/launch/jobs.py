"""The callables that run inside the tasks of a job: training and the shard build.

:class:`TrainingJob` and :class:`ShardsJob` are small picklable callables. submitit pickles
one into the job folder, ``sbatch`` starts ``srun python -m submitit.core._submit`` on
every task, and each task unpickles and calls it. Everything heavy is imported inside the
call, in the task: the login node that pickles a job imports nothing of the trainer or of
the shard builder. :class:`TrainingJob` exports the distributed environment
(:mod:`promoter_dist.launch.environment`) and calls its entry point
(``promoter_dist.train:run_task`` by default) with the argv and the task's stop request,
which a :class:`~promoter_dist.launch.preemption.PreemptionRelay` sets at preemption or
time limit.

A requeue runs ``checkpoint()``'s return value: the same call again, which resumes (the
trainer from ``<run.out_dir>/checkpoints/latest``, the shard build from
``build-state.jsonl``). A job requeued from outside (``scontrol requeue``, preemption with
``PreemptMode=REQUEUE``) reruns its original pickle: the same call again too.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ..stopping import StopRequest
from .preemption import PreemptionRelay, preemption_signal

if TYPE_CHECKING:
    from submitit.helpers import DelayedSubmission

DEFAULT_ENTRY = "promoter_dist.train:run_task"
"""The trainer's entry point in a task: ``run_task(argv, stop) -> {"status": int, "stopped_at_step": int | None}``."""

TaskEntry = Callable[[list[str], StopRequest | None], dict[str, Any]]
"""What an entry point is: called with the trainer's argv and the task's stop request (None: no
preemption handling, as under the debug executor); returns its status (0 ok, 2 a user error
already printed) and the step it stopped at on request (None: it did not stop early)."""


def resolve_entry(spec: str) -> TaskEntry:
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
    signal.signal(preemption_signal(), signal.SIG_IGN)


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

    Every task calls ``entry(argv, stop)`` with the argv of ``deepspeed train.py <argv>``;
    the trainer reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from the environment.
    """

    argv: tuple[str, ...]
    """Trainer arguments: ``("--config", path, "key.sub=value", ...)``."""
    entry: str = DEFAULT_ENTRY
    """``module:function`` called with ``list(argv)`` and the task's stop request; imported inside the task only."""
    prefer_scontrol: bool = True
    """Expand the node list with ``scontrol show hostnames`` when available (else our parser)."""
    stop_grace_s: float = 90.0
    """After the preemption signal, how long rank 0 waits for the trainer's checkpoint before it
    requeues without one (keep it below sbatch's ``--signal`` delay)."""

    def __call__(self) -> dict[str, Any]:
        """Run this task's share of the training; rank 0 requeues the job when the trainer stopped on request."""
        from . import environment

        stop: StopRequest | None = None
        relay: PreemptionRelay | None = None
        if _in_job_process():
            protect_forked_children()
            # Every task of the job installs the relay, so every rank checks for a stop together.
            stop = StopRequest()
            relay = PreemptionRelay.install(stop, self.stop_grace_s, _log)
        dist = environment.setup(prefer_scontrol=self.prefer_scontrol)
        _log(f"task rank {dist.rank}/{dist.world_size} (local {dist.local_rank}/{dist.local_world_size}, "
             f"node {dist.node_rank}/{dist.num_nodes}) master {dist.master_addr}:{dist.master_port} "
             f"restart {os.environ.get('SLURM_RESTART_COUNT', '0')}; {self.entry} {' '.join(self.argv)}")
        run = resolve_entry(self.entry)
        # SystemExit is not caught: submitit's requeue (in a signal handler) exits through it.
        result = run(list(self.argv), stop)
        if not isinstance(result, dict) or "status" not in result:
            raise RuntimeError(f"{self.entry} returned {result!r} on rank {dist.rank}, not a dict with a 'status'")
        if result["status"] != 0:
            raise RuntimeError(f"{self.entry} returned status {result['status']} on rank {dist.rank}")
        stopped_at_step = result.get("stopped_at_step")
        if relay is not None and stopped_at_step is not None:
            # Every rank wrote the checkpoint; rank 0 requeues through submitit (which exits), the
            # others end here and the requeue restarts them.
            relay.requeue(dist.rank, stopped_at_step)
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
        """Build and verify the shards; returns the build's and the check's counts."""
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


__all__ = ["DEFAULT_ENTRY", "ShardsJob", "TaskEntry", "TrainingJob", "available_cpus", "protect_forked_children",
           "resolve_entry"]
