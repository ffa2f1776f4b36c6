"""Following submitted jobs: their SLURM state, waiting for their results, failure reports, cancelling.

Waiting (:func:`wait`) does not depend on ``sacct``: it polls the result files and
``scontrol show job``, so it works on clusters without an accounting database too.
"""

from __future__ import annotations

import shutil
import subprocess
import time as _time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..errors import UserError

if TYPE_CHECKING:  # submitit is imported where used: `promoter-dist --help` should not pay for it
    import submitit

    from .options import ClusterOptions

# SLURM job states after which nothing more will happen to the job (no requeue pending).
TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
    "PREEMPTED", "REVOKED", "SPECIAL_EXIT",
    "ENDED",  # ours: forgotten by scontrol, unknown to sacct (see slurm_state)
})
# Terminal states a requeue may still follow (PreemptMode=REQUEUE, submitit's own requeue, a node
# failure with --requeue): wait() watches a job in one of them this long before giving up on it.
REQUEUE_GRACE_S = {"PREEMPTED": 120.0, "NODE_FAIL": 120.0}


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
        """``message`` for the user; ``job_id`` and ``state`` (JobState, or FAILED) for callers."""
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


__all__ = ["REQUEUE_GRACE_S", "TERMINAL_STATES", "JobFailed", "cancel", "describe", "log_tail", "slurm_job_info",
           "slurm_state", "wait"]
