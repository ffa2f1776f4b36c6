"""Jobs on a real SLURM cluster through submitit: shards, ranks, preemption/requeue, errors.

The training path is exercised with the stand-in trainer (tests/launch/standin_trainer.py),
which checkpoints and resumes the way the real trainer does.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from promoter_dist import cli
from promoter_dist.errors import UserError
from promoter_dist.launch import environment as E
from promoter_dist.launch.monitor import JobFailed, slurm_job_info, wait
from promoter_dist.launch.options import ClusterOptions
from promoter_dist.launch.submit import submit_training
from tests.conftest import DEMO_TRAIN
from tests.launch import standin_trainer
from tests.slurm.conftest import SETUP, release_if_held, wait_for_lines

# real SLURM jobs; the first test also waits for the session's slurm-up.sh (up to 900 s)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

STANDIN = "tests.launch.standin_trainer:main"


def _config(tmp_path: Path) -> Path:
    config = tmp_path / "run.yaml"
    config.write_text(f"run:\n  out_dir: {tmp_path / 'run'}\n")
    return config


def _options(**kwargs) -> ClusterOptions:
    return ClusterOptions(cluster="slurm", time="10", setup=list(SETUP), **kwargs)


def _wait(job, **kwargs):
    return wait(job, poll_s=0.5, on_poll=lambda state: release_if_held(job.job_id), timeout_s=240, **kwargs)


@pytest.mark.parametrize("nodelist", ["gpu[01-04,07]", "a1,b[2-3]", "r[1-2]n[01-02]", "n[8-10],m[098-101]", "n-[1-2]"])
def test_nodelist_expansion_agrees_with_scontrol(nodelist):
    assert E.scontrol_hostnames(nodelist) == E.expand_nodelist(nodelist)


def test_shards_job_uses_the_whole_node_and_verifies(tmp_path, capsys):
    out = tmp_path / "shards"
    status = cli.main(["submit", "shards", str(DEMO_TRAIN), "--out", str(out), "--time", "10", "--wait",
                       "--rows-per-block", "256", "--blocks-per-shard", "4"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    summary = json.loads(printed.strip().splitlines()[-2])
    cores = os.cpu_count()
    assert summary["workers"] == cores and summary["rows"] == summary["verified_rows"] == 6370
    script = next((out / "slurm").glob("*/*_submission.sh")).read_text()
    assert f"#SBATCH --cpus-per-task={cores}\n" in script and "#SBATCH --mem=0\n" in script
    assert cli.main(["shards", "verify", str(out)]) == 0
    # The same submission again (a rerun, or a requeue) finds the finished build: nothing rewritten.
    assert cli.main(["submit", "shards", str(DEMO_TRAIN), "--out", str(out), "--time", "10", "--wait",
                     "--rows-per-block", "256", "--blocks-per-shard", "4"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-2])
    assert again["shards_written"] == 0 and again["verified_rows"] == 6370


def test_two_tasks_get_their_ranks_and_a_working_master(tmp_path):
    out = tmp_path / "run"
    job = submit_training(_config(tmp_path), ["standin.steps=3", "standin.collective=1"],
                          _options(tasks_per_node=2), entry=STANDIN)
    assert job.paths.folder == out / "slurm" / job.job_id
    assert [r["rank"] for r in _wait(job)] == [0, 1]
    envs = [json.loads((out / "env" / f"rank{rank}-restart0.json").read_text()) for rank in (0, 1)]
    for rank, env in enumerate(envs):
        assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"], env["NODE_RANK"]) == (
            str(rank), str(rank), "2", "2", "0")
        assert env["MASTER_ADDR"] == envs[0]["SLURMD_NODENAME"] == env["SLURMD_NODENAME"]
        assert env["MASTER_PORT"] == str(E.master_port(job.job_id))
        assert env["SLURM_JOB_ID"] == job.job_id and env["CUDA_VISIBLE_DEVICES"] is None
        assert env["all_reduce_sum"] == 3  # gloo over MASTER_ADDR:MASTER_PORT worked


def test_two_nodes_by_two_tasks(tmp_path):
    """A job across both nodes: ranks 0-1 on n1, 2-3 on n2, all meeting at n1's MASTER_PORT."""
    out = tmp_path / "run"
    job = submit_training(_config(tmp_path), ["standin.steps=3", "standin.collective=1"],
                          _options(nodes=2, tasks_per_node=2), entry=STANDIN)
    assert [r["rank"] for r in _wait(job)] == [0, 1, 2, 3]
    envs = [json.loads((out / "env" / f"rank{rank}-restart0.json").read_text()) for rank in range(4)]
    assert [e["SLURMD_NODENAME"] for e in envs] == ["n1", "n1", "n2", "n2"]
    assert [(e["RANK"], e["LOCAL_RANK"], e["NODE_RANK"]) for e in envs] == [
        ("0", "0", "0"), ("1", "1", "0"), ("2", "0", "1"), ("3", "1", "1")]
    assert {(e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"], e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs} == {
        ("4", "2", "n1", str(E.master_port(job.job_id)))}
    assert {e["all_reduce_sum"] for e in envs} == {10}  # 1 + 2 + 3 + 4


def _preemptible_job(tmp_path: Path, steps: int):
    job = submit_training(_config(tmp_path), [f"standin.steps={steps}", "standin.step_seconds=0.2",
                                              "run.checkpoint_every=5"], _options(tasks_per_node=2), entry=STANDIN)
    wait_for_lines(tmp_path / "run" / "progress-rank0.log", "step ", 12)
    return job


def _assert_resumed_to_the_same_end(tmp_path: Path, job, steps: int) -> list[str]:
    """Both ranks ended where an uninterrupted run ends, after a SLURM requeue and a resume."""
    info = slurm_job_info(job.job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1"
    reference = standin_trainer.expected(steps)
    for rank in (0, 1):
        final = json.loads((tmp_path / "run" / f"final-rank{rank}.json").read_text())
        assert final["step"] == steps and final["value"] == reference
        assert 10 <= final["resumed_from"] < steps  # from a periodic checkpoint, not from scratch
        starts = (tmp_path / "run" / f"progress-rank{rank}.log").read_text().splitlines()
        assert [line for line in starts if line.startswith("start")][0] == "start 0 restart 0"
    return (job.paths.folder / f"{job.job_id}_0_log.out").read_text().splitlines()


def test_preemption_signal_checkpoints_requeues_and_resumes(tmp_path):
    """USR2, the signal sbatch --signal sends at preemption or time limit: submitit calls
    checkpoint() on rank 0, requeues the job, and the rerun resumes from the latest checkpoint."""
    steps = 40
    job = _preemptible_job(tmp_path, steps)
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
    assert [r["status"] for r in _wait(job)] == [0, 0]
    log = _assert_resumed_to_the_same_end(tmp_path, job, steps)
    assert any("Calling checkpoint method" in line for line in log)
    assert any("requeueing; the rerun resumes" in line for line in log)
    assert any(f"Requeued job {job.job_id}" in line for line in log)


def test_external_requeue_reruns_and_resumes(tmp_path):
    """`scontrol requeue` (an admin, or PreemptMode=REQUEUE): the original call runs again and resumes."""
    steps = 40
    job = _preemptible_job(tmp_path, steps)
    subprocess.run(["scontrol", "requeue", job.job_id], check=True)
    assert [r["status"] for r in _wait(job)] == [0, 0]
    _assert_resumed_to_the_same_end(tmp_path, job, steps)


def test_bad_partition_is_a_user_error_with_sbatchs_message(tmp_path):
    with pytest.raises(UserError, match="sbatch refused the job: .*[Ii]nvalid partition"):
        submit_training(_config(tmp_path), [], _options(partition="no-such-partition"), entry=STANDIN)


def test_bad_partition_from_the_command_line(tmp_path, capsys):
    status = cli.main(["submit", "train", "--config", str(_config(tmp_path)), "--partition", "no-such-partition",
                       "--time", "5"])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("promoter-dist: error: sbatch refused the job") and err.count("\n") == 1


def test_failing_job_reports_its_error_and_log_tail(tmp_path):
    # Rank 1 alone would count for 10 minutes: srun --kill-on-bad-exit=1 ends it when rank 0 fails,
    # well within the wait's limit.
    job = submit_training(_config(tmp_path), ["standin.fail_at=2", "standin.steps=6000", "standin.step_seconds=0.1"],
                          _options(tasks_per_node=2), entry=STANDIN)
    srun = [line for line in job.paths.submission_file.read_text().splitlines() if line.startswith("srun ")]
    assert len(srun) == 1 and " --kill-on-bad-exit=1 " in srun[0]
    with pytest.raises(JobFailed) as info:
        _wait(job)
    message = str(info.value)
    assert f"job {job.job_id} failed on task 0: RuntimeError: stand-in trainer: planned failure at step 2" in message
    assert f"last lines of {job.paths.folder}/{job.job_id}_0_log.err" in message
    assert "Traceback" in message and info.value.state == "FAILED"


def test_job_killed_without_a_result_reports_the_log_tail(tmp_path):
    job = submit_training(_config(tmp_path), ["standin.exit_at=1"], _options(), entry=STANDIN)
    with pytest.raises(JobFailed) as info:
        _wait(job)
    message = str(info.value)
    assert f"job {job.job_id} ended FAILED without a result from task 0" in message
    assert "dying at step 1" in message or "exit code 3" in message
