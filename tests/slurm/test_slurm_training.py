"""The real trainer as a SLURM job through submitit, against the ``deepspeed`` launcher.

One tiny NAD run (ZeRO-2, 12 steps, a checkpoint every 3) three ways:

(a) ``deepspeed --num_gpus 2 train.py ...``: two CPU ranks started by the launcher;
(b) the same argv as a 1-node x 2-task SLURM job (``submit_training`` + ``wait``);
(c) job (b) preempted mid-run by USR2: every rank checkpoints the step it is in, rank 0
    requeues through submitit's checkpoint(), and the rerun resumes from that step.

The per-step train losses and the validation records of metrics.jsonl must agree. They are
bitwise equal on the 2-core development machine: both layouts give rank r the same shard
units, the same seeds and one torch thread, and a gloo all-reduce over two ranks sums in
the same order. The tolerance (1e-6 relative) only leaves room for threaded CPU kernels on
machines with more cores; a wrong rank, world size or loader position moves the losses by
far more.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from promoter_dist.launch import monitor
from promoter_dist.launch.options import ClusterOptions
from promoter_dist.launch.submit import submit_training
from tests.conftest import REPO
from tests.distributed.launch import run_deepspeed
from tests.slurm.conftest import SETUP, release_if_held

# slurm-up.sh (up to 900 s), the launcher reference (600 s) and the job (400 s) may all fall in one test
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2700)]

CONFIG = REPO / "configs" / "nad" / "debug.yaml"
TRAIN = REPO / "train.py"
STEPS = 12
EVERY = 3  # run.checkpoint_every
TOLERANCE = {"rel": 1e-6, "abs": 1e-7}


def overrides(shards: Path, out: Path) -> list[str]:
    """The tiny NAD run: every step logged, a checkpoint every 3 steps, validation at 6 and 12."""
    return [f"run.out_dir={out}", f"data.shards={shards}", "data.glove=", "data.batch_size=16",
            "model.nad.channels=[8,8,16,16,16]", "model.nad.fpn_dim=16", "model.nad.heads=2", "model.nad.head_dim=8",
            "run.log_every=1", f"run.checkpoint_every={EVERY}", "run.eval_every=6", f"run.max_steps={STEPS}",
            "run.plots=false", "engine.zero_stage=2", "engine.grad_accum=1"]


def records(run: Path) -> tuple[list[int], dict[int, dict], list[dict]]:
    """metrics.jsonl: train steps in file order, train records by step, validation records (no timings)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    val = [{k: v for k, v in r.items() if k != "seconds"} for r in rows if r["kind"] == "val"]
    return [r["step"] for r in train], {r["step"]: r for r in train}, val


def assert_same_run(run: Path, reference: Path) -> None:
    steps, train, val = records(run)
    _, expected_train, expected_val = records(reference)
    assert steps == list(range(1, STEPS + 1))  # every step once, none repeated after a resume
    for step in steps:
        assert train[step]["loss"] == pytest.approx(expected_train[step]["loss"], **TOLERANCE), step
        assert train[step]["lr"] == pytest.approx(expected_train[step]["lr"], **TOLERANCE), step
    assert [r["step"] for r in val] == [r["step"] for r in expected_val] == [6, STEPS]
    for got, want in zip(val, expected_val):
        assert got.keys() == want.keys()
        for key in ("loss", "pearson", "spearman", "rows"):
            assert got[key] == pytest.approx(want[key], **TOLERANCE), (got["step"], key)


def deepspeed_reference(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run (a) once per test session, shared by the pytest-xdist workers (a file lock, a done mark)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "slurm-training-deepspeed"
    root.mkdir(exist_ok=True)
    out = root / "run"
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "done").exists():
            shutil.rmtree(out, ignore_errors=True)
            run_deepspeed(TRAIN, ["--config", str(CONFIG), *overrides(shards, out)], nprocs=2, timeout=600, cwd=REPO)
            (root / "done").write_text("ok\n")
    return out


def submit(shards: Path, out: Path):
    # time=30: above submitit's 10-minute rule, so USR2 counts as a preemption, not a time limit.
    options = ClusterOptions(cluster="slurm", tasks_per_node=2, time="30", setup=list(SETUP))
    return submit_training(CONFIG, overrides(shards, out), options)


def wait(job) -> list[dict]:
    results = monitor.wait(job, poll_s=0.5, on_poll=lambda state: release_if_held(job.job_id), timeout_s=400)
    assert [r["rank"] for r in results] == [0, 1] and {r["world_size"] for r in results} == {2}
    return results


def job_log(job, task: int) -> str:
    folder = job.paths.folder
    return "".join((folder / f"{job.job_id}_{task}_log.{ext}").read_text() for ext in ("out", "err"))


# --------------------------------------------------------------------------- task processes


def task_pids(job_id: str) -> list[int]:
    """The job's task processes (``python -m submitit.core._submit`` started by srun).

    Both nodes of the test cluster are this machine, so /proc shows them; srun's own
    command line names submitit too and is left out.
    """
    marker = f"SLURM_JOB_ID={job_id}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if b"submitit.core._submit" not in argv or os.path.basename(argv[0]) == b"srun":
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # ended meanwhile
            continue
        if marker in environ and any(item.startswith(b"SLURM_PROCID=") for item in environ):
            pids.append(int(entry.name))
    return pids


def stopped(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] in "Tt"


def pending(pid: int, signum: int) -> bool:
    """``signum`` is waiting to be delivered to the (stopped) process."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(re.search(r"^ShdPnd:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    return bool(mask >> (signum - 1) & 1)


def scancel_signal(job_id: str, name: str) -> None:
    subprocess.run(["scancel", f"--signal={name}", job_id], check=True, capture_output=True, timeout=30)


def until(check, what: str, timeout_s: float = 30) -> None:
    deadline = time.time() + timeout_s
    while not check():
        if time.time() > deadline:
            raise AssertionError(f"{what} after {timeout_s} s")
        time.sleep(0.05)


def preempt_after_first_checkpoint(job, out: Path) -> str:
    """USR2 to the job once a periodic checkpoint exists; returns the checkpoint then latest.

    The tiny run takes about two seconds from its first checkpoint to its end, less than
    SLURM may need to deliver a signal, so the tasks are held still for the moment: SIGSTOP
    (through scancel, like every signal here), USR2 while they are stopped, then SIGCONT.
    The first thing each task does on waking is the job's USR2 handler: a stop request, which
    the trainer honours after the step in progress.
    """
    latest = out / "checkpoints" / "latest"
    until(latest.exists, f"job {job.job_id} wrote no checkpoint", timeout_s=300)
    pids = task_pids(job.job_id)
    assert len(pids) == 2, f"job {job.job_id} has {len(pids)} tasks running; it ended before the preemption"
    scancel_signal(job.job_id, "STOP")
    until(lambda: all(stopped(pid) for pid in pids), "the tasks did not stop")
    at = latest.read_text().strip()
    scancel_signal(job.job_id, "USR2")
    until(lambda: all(pending(pid, signal.SIGUSR2) for pid in pids), "USR2 did not reach the stopped tasks")
    scancel_signal(job.job_id, "CONT")
    return at


# --------------------------------------------------------------------------- tests


def test_slurm_job_trains_like_the_deepspeed_launcher(small_shards, tmp_path, tmp_path_factory):
    out = tmp_path / "run"
    job = submit(small_shards, out)  # runs while the launcher run is going
    reference = deepspeed_reference(small_shards, tmp_path_factory)
    wait(job)
    assert job.paths.folder == out / "slurm" / job.job_id
    log = job_log(job, 0) + job_log(job, 1)
    assert "task rank 0/2 (local 0/2, node 0/1)" in log and "task rank 1/2 (local 1/2, node 0/1)" in log
    assert "resumed from" not in log
    assert monitor.slurm_job_info(job.job_id)["Restarts"] == "0"
    assert (out / "checkpoints" / "latest").read_text() == f"step{STEPS:08d}"
    assert_same_run(out, reference)


def test_preempted_job_requeues_resumes_and_trains_like_the_deepspeed_launcher(small_shards, tmp_path,
                                                                               tmp_path_factory):
    out = tmp_path / "run"
    job = submit(small_shards, out)
    preempted_at = preempt_after_first_checkpoint(job, out)
    wait(job)

    info = monitor.slurm_job_info(job.job_id)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1
    rank0, rank1 = job_log(job, 0), job_log(job, 1)
    # Both ranks got the signal and wrote the checkpoint of the same step; then rank 0 requeued.
    stops = [re.findall(r"checkpoint of step (\d+) written on every rank", text) for text in (rank0, rank1)]
    assert len(stops[0]) == 1 and stops[0] == stops[1], (rank0, rank1)
    stopped_at = int(stops[0][0])
    assert "SIGUSR2: preempted or at the time limit" in rank0 and "SIGUSR2: preempted or at the time limit" in rank1
    assert "this job is preempted" in rank0 and "Calling checkpoint method" in rank0
    assert "requeueing; the rerun resumes from the latest checkpoint" in rank0
    assert f"Requeued job {job.job_id}" in rank0 and "rank 0 requeues the job" in rank1
    assert "no checkpoint" not in rank0  # the trainer's checkpoint came in time: no fallback requeue
    for task in (0, 1):
        assert f"task rank {task}/2 (local {task}/2, node 0/1) master" in job_log(job, task)
        assert re.search(rf"task rank {task}/2 .* restart [1-9]", job_log(job, task)), task
    # The rerun started from the step the trainer was in at the signal, not from a periodic checkpoint.
    resumed = re.findall(r"resumed from step(\d{8}): step (\d+)", rank0)
    assert len(resumed) == 1, rank0
    tag, step = int(resumed[0][0]), int(resumed[0][1])
    assert tag == step == stopped_at and int(preempted_at[4:]) <= step < STEPS
    assert f"resumed from step{step:08d}" in (out / "logs" / "rank1.log").read_text()
    assert f"stop requested (SIGUSR2): checkpoint step{step:08d} written" in (out / "logs" / "rank0.log").read_text()
    assert (out / "checkpoints" / "latest").read_text() == f"step{STEPS:08d}"

    assert_same_run(out, deepspeed_reference(small_shards, tmp_path_factory))


def test_a_run_submitted_again_on_fewer_tasks_resumes_with_the_same_losses(small_shards, tmp_path, tmp_path_factory):
    """(d) job (b) stopped at step 6, then submitted again as a 1-node x 1-task job with
    engine.grad_accum=2 (the same global batch of 32): it converts the ZeRO-2 checkpoint into a
    universal one, resumes at step 6 and goes on with the losses of the 2-task run (the
    tolerance of tests/distributed/test_elastic_resume.py: a one-rank run sums in another order)."""
    out = tmp_path / "run"
    first = submit_training(CONFIG, [*overrides(shards=small_shards, out=out), "run.max_steps=6"],
                            ClusterOptions(cluster="slurm", tasks_per_node=2, time="30", setup=list(SETUP)))
    wait(first)
    again = [*overrides(small_shards, out), "engine.grad_accum=2"]
    second = submit_training(CONFIG, again, ClusterOptions(cluster="slurm", tasks_per_node=1, time="30",
                                                           setup=list(SETUP)))
    results = monitor.wait(second, poll_s=0.5, on_poll=lambda state: release_if_held(second.job_id), timeout_s=400)
    assert [r["world_size"] for r in results] == [1]
    log = job_log(second, 0)
    assert "resumed from step00000006" in log and "converting checkpoint step00000006 into a universal" in log
    steps, train, _ = records(out)
    _, expected, _ = records(deepspeed_reference(small_shards, tmp_path_factory))
    assert steps == list(range(1, STEPS + 1))
    for step in steps:
        assert train[step]["loss"] == pytest.approx(expected[step]["loss"], rel=2e-4), step


@pytest.mark.parametrize("name", ["legnet", "dream_rnn"])
def test_the_winners_models_train_as_a_slurm_job(name: str, small_shards, tmp_path):
    # LegNet and DREAM-RNN (the LegNet task: soft bins, both strands) through the same submission path.
    out = tmp_path / "run"
    config = REPO / "configs" / name / "debug.yaml"
    tiny = [f"run.out_dir={out}", f"data.shards={small_shards}", "data.batch_size=16", "data.eval_batch_size=256",
            "run.max_steps=4", "run.log_every=1", "run.checkpoint_every=4", "run.eval_every=4", "run.plots=false"]
    job = submit_training(config, tiny, ClusterOptions(cluster="slurm", tasks_per_node=2, time="30",
                                                       setup=list(SETUP)))
    wait(job)
    log = job_log(job, 0) + job_log(job, 1)
    assert "task rank 0/2 (local 0/2, node 0/1)" in log and "task rank 1/2 (local 1/2, node 0/1)" in log
    steps, train, val = records(out)
    assert steps == [1, 2, 3, 4] and all(train[s]["loss"] > 0 for s in steps)  # KL divergence: finite, positive
    assert [r["step"] for r in val] == [4] and -1 <= val[0]["pearson"] <= 1
    assert (out / "checkpoints" / "latest").read_text() == "step00000004"
    resolved = (out / "config.yaml").read_text()
    assert f"name: {name}" in resolved and "soft_classification" in resolved
