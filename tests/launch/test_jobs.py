"""The job callables as a task runs them: entry points, statuses, requeue calls, cores, forked children."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from promoter_dist.launch.jobs import ShardsJob, TrainingJob, available_cpus, resolve_entry
from promoter_dist.stopping import StopRequest
from tests.conftest import DEMO_TRAIN, REPO
from tests.launch import standin_trainer

STANDIN = "tests.launch.standin_trainer:main"


def test_available_cpus_is_capped_by_the_affinity(monkeypatch):
    usable = len(os.sched_getaffinity(0))
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", str(usable + 6))
    assert available_cpus() == usable  # srun bound the task to fewer cores than sbatch allocated
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert available_cpus() == 1
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert available_cpus() == usable


def test_resolve_entry():
    assert resolve_entry(STANDIN) is standin_trainer.main
    for bad in ("tests.launch.standin_trainer", "tests.launch.standin_trainer:nope"):
        with pytest.raises(ValueError):
            resolve_entry(bad)


def test_training_job_turns_a_nonzero_status_into_an_error(monkeypatch):
    monkeypatch.setenv("SUBMITIT_DEBUG_JOB_ID", "x")
    job = TrainingJob(("--config", "c.yaml"), entry="tests.launch.test_jobs:_exits_with_two")
    with pytest.raises(RuntimeError, match="returned status 2 on rank 0"):
        job()
    job = TrainingJob(("--config", "c.yaml"), entry="tests.launch.test_jobs:_returns_a_bare_status")
    with pytest.raises(RuntimeError, match="returned 0 on rank 0, not a dict with a 'status'"):
        job()


def _exits_with_two(argv: list[str], stop: StopRequest | None) -> dict[str, Any]:
    return {"status": 2, "stopped_at_step": None}


def _returns_a_bare_status(argv: list[str], stop: StopRequest | None) -> int:
    return 0


def test_training_job_outside_a_job_process_gives_the_trainer_no_stop_request(monkeypatch):
    """The debug executor runs the task in the submitting process: no relay, so no stop request."""
    monkeypatch.setenv("SUBMITIT_DEBUG_JOB_ID", "x")
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    job = TrainingJob(("--config", "c.yaml", "a=1"), entry="tests.launch.test_jobs:_expects_no_stop_request")
    assert job() == {"rank": 0, "world_size": 1, "status": 0}


def _expects_no_stop_request(argv: list[str], stop: StopRequest | None) -> dict[str, Any]:
    assert argv == ["--config", "c.yaml", "a=1"] and stop is None, (argv, stop)
    return {"status": 0, "stopped_at_step": None}


def test_checkpoint_requeues_the_same_call():
    job = TrainingJob(("--config", "c.yaml", "a=1"), entry=STANDIN)
    delayed = job.checkpoint()
    assert delayed.function == job and delayed.function is not job and delayed.args == () and delayed.kwargs == {}
    shards = ShardsJob("/data/x.txt", "/out/shards", overwrite=True)
    assert shards.checkpoint().function == ShardsJob("/data/x.txt", "/out/shards", overwrite=False)


def test_requeued_shards_job_keeps_its_finished_shards_despite_overwrite(tmp_path, monkeypatch):
    """A --overwrite job requeued from outside reruns its original call: it must not clear the
    shards its first run finished (SLURM_RESTART_COUNT tells a rerun apart)."""
    from promoter_dist.data.shards import ShardOptions

    out = tmp_path / "shards"
    options = ShardOptions(rows_per_block=256, blocks_per_shard=4)
    job = ShardsJob(str(DEMO_TRAIN), str(out), options, workers=1, overwrite=True)
    first = job()
    assert first["shards_written"] > 0 and first["shards_reused"] == 0
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    again = job()
    assert again["shards_written"] == 0 and again["verified_rows"] == first["verified_rows"] == 6370
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # a first run with --overwrite does rewrite
    assert job()["shards_written"] == first["shards_written"]


def test_forked_children_do_not_inherit_the_job_signal_handlers():
    """submitit makes a task ignore SIGTERM; a Pool worker forked from it used to as well, so
    ``Pool.terminate()`` (which read_dream calls) waited forever for a busy worker."""
    script = f"""
import multiprocessing as mp, os, signal, sys, time
sys.path.insert(0, {str(REPO)!r})
from promoter_dist.launch.jobs import protect_forked_children
signal.signal(signal.SIGTERM, lambda *a: None)  # what submitit installs in a task
signal.signal(signal.SIGUSR2, lambda *a: None)
protect_forked_children()
pool = mp.get_context("fork").Pool(1)
pool.apply_async(time.sleep, (600,))
time.sleep(0.5)
t = time.time()
pool.terminate()
pool.join()
pid = os.fork()
if pid == 0:
    os._exit(0 if signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN else 1)
print(round(time.time() - t, 1), os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    seconds, child_status = out.stdout.split()
    assert float(seconds) < 10 and child_status == "0", out.stderr
