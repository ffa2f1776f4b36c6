"""Submission without SLURM: option mapping, sbatch script text, errors, and the local / debug executors."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from promoter_dist import cli
from promoter_dist.errors import UserError
from promoter_dist.launch import slurm as S
from tests.conftest import DEMO_TRAIN, REPO
from tests.launch import standin_trainer

STANDIN = "tests.launch.standin_trainer:main"


@pytest.mark.parametrize("text, minutes", [
    ("90", 90), ("1:30", 2), ("24:00:00", 1440), ("0:00:59", 1), ("2-0", 2880), ("1-12:30", 2190),
    ("1-00:00:01", 1441), (45, 45),
])
def test_parse_time(text, minutes):
    assert S.parse_time(text) == minutes


@pytest.mark.parametrize("bad", ["", "1h", "00:00:00", "1:2:3:4", "-5"])
def test_parse_time_rejects(bad):
    with pytest.raises(UserError, match="--time"):
        S.parse_time(bad)


def test_cluster_options_validation():
    with pytest.raises(UserError, match="--cluster"):
        S.ClusterOptions(cluster="kubernetes")
    with pytest.raises(UserError, match="--nodes 1"):
        S.ClusterOptions(cluster="local", nodes=2)
    with pytest.raises(UserError, match="--cluster local"):
        S.ClusterOptions(cluster="debug", tasks_per_node=2)
    with pytest.raises(UserError, match="--gpus-per-node"):
        S.ClusterOptions(gpus_per_node=-1)
    assert S.ClusterOptions(gpus_per_node=8).tasks == 8
    assert S.ClusterOptions(gpus_per_node=8, tasks_per_node=1).tasks == 1
    assert S.ClusterOptions().tasks == 1


def test_executor_parameters_maps_every_knob():
    options = S.ClusterOptions(
        nodes=4, gpus_per_node=8, cpus_per_task=10, mem_gb=480, partition="gpu", account="bio", qos="high",
        constraint="a100|h100", time="1-00:00:00", job_name="nad", signal_delay_s=180, max_timeouts=5,
        exclusive=True, setup=["module load cuda"], additional={"mail-type": "END"})
    assert S.executor_parameters(options) == {
        "name": "nad", "timeout_min": 1440, "nodes": 4, "tasks_per_node": 8, "gpus_per_node": 8,
        "cpus_per_task": 10, "mem_gb": 480, "slurm_partition": "gpu", "slurm_account": "bio", "slurm_qos": "high",
        "slurm_constraint": "a100|h100", "slurm_signal_delay_s": 180, "slurm_exclusive": True,
        "slurm_setup": ["module load cuda"], "local_setup": ["module load cuda"],
        "slurm_additional_parameters": {"mail-type": "END"}, "slurm_srun_args": ["--cpus-per-task", "10"],
    }
    # Unset knobs are left to the cluster; a CPU job asks for no GPUs at all.
    assert S.executor_parameters(S.ClusterOptions(time="10")) == {
        "name": "promoter-dist", "timeout_min": 10, "nodes": 1, "tasks_per_node": 1, "slurm_signal_delay_s": 120}


def test_available_cpus_is_capped_by_the_affinity(monkeypatch):
    usable = len(os.sched_getaffinity(0))
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", str(usable + 6))
    assert S.available_cpus() == usable  # srun bound the task to fewer cores than sbatch allocated
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert S.available_cpus() == 1
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert S.available_cpus() == usable


def fake_slurm_bin(folder: Path, sbatch_stderr: str | None = None) -> Path:
    """A folder with stand-ins for srun (presence only) and sbatch (prints a job id, or refuses)."""
    folder.mkdir(parents=True, exist_ok=True)
    scripts = {"srun": "#!/bin/sh\nexit 0\n"}
    if sbatch_stderr is None:
        scripts["sbatch"] = "#!/bin/sh\necho 'Submitted batch job 4242'\n"
    else:
        scripts["sbatch"] = f"#!/bin/sh\necho '{sbatch_stderr}' >&2\nexit 1\n"
    for name, text in scripts.items():
        path = folder / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return folder


def test_sbatch_script_carries_the_options(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{fake_slurm_bin(tmp_path / 'bin')}:{os.environ['PATH']}")
    options = S.ClusterOptions(
        nodes=4, gpus_per_node=8, cpus_per_task=10, mem_gb=480, partition="gpu", account="bio", qos="high",
        constraint="a100", time="24:00:00", job_name="nad", setup=["module load cuda"],
        additional={"mail-type": "END"})
    executor = S.make_executor(options, S.job_folder(tmp_path / "logs"))
    assert executor.cluster == "slurm" and executor._executor.max_num_timeout == 3
    text = executor._executor._make_submission_file_text("python -m x", "uid")
    for flag in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10", "--mem=480GB",
                 "--partition=gpu", "--account=bio", "--qos=high", "--constraint=a100", "--time=1440",
                 "--job-name=nad", "--signal=USR2@120", "--mail-type=END", "--open-mode=append"):
        assert f"#SBATCH {flag}\n" in text, flag
    assert f"--output={tmp_path}/logs/%j/%j_0_log.out" in text
    assert "module load cuda" in text and "srun --unbuffered" in text
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    assert srun.endswith("--cpus-per-task 10 python -m x")  # srun of Slurm 22.05+ does not inherit it


def test_submit_training_with_fake_sbatch_writes_the_job_files(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{fake_slurm_bin(tmp_path / 'bin')}:{os.environ['PATH']}")
    config = tmp_path / "run.yaml"
    config.write_text(f"run:\n  out_dir: {tmp_path / 'run'}\n")
    job = S.submit_training(config, ["optim.lr=1e-3"], S.ClusterOptions(time="10"))
    assert job.job_id == "4242"
    assert job.paths.folder == tmp_path / "run" / "slurm" / "4242"
    assert job.paths.submitted_pickle.exists() and job.paths.submission_file.exists()
    from submitit.core.utils import DelayedSubmission

    task = DelayedSubmission.load(job.paths.submitted_pickle).function
    # USR2 120 s before the limit: up to 80 s for the trainer's checkpoint, the rest for the requeue.
    assert task == S.TrainingJob(("--config", str(config), "optim.lr=1e-3"), entry=S.DEFAULT_ENTRY, stop_grace_s=80)


def test_sbatch_refusal_is_a_user_error_with_its_message(tmp_path, monkeypatch):
    refusal = "sbatch: error: Batch job submission failed: Invalid partition name specified"
    bin_dir = fake_slurm_bin(tmp_path / "bin", refusal)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    with pytest.raises(UserError, match="sbatch refused the job: .*Invalid partition name specified"):
        S.submit_training(_config(tmp_path), [], S.ClusterOptions(partition="nope", time="5"))
    assert not list((tmp_path / "run" / "slurm").glob("*.pkl"))  # no pickle of a job that does not exist


def test_no_slurm_on_this_machine_says_what_to_do(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(UserError, match="sbatch and srun not found.*--cluster local"):
        S.make_executor(S.ClusterOptions(), tmp_path / "logs")
    status = cli.main(["submit", "train", "--config", str(_config(tmp_path)), "--time", "5"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "--cluster local" in err
    status = cli.main(["submit", "shards", str(DEMO_TRAIN), "--out", str(tmp_path / "shards")])
    assert status == 2 and "--cluster local" in capsys.readouterr().err


def _config(tmp_path: Path, out: str = "run") -> Path:
    config = tmp_path / "run.yaml"
    config.write_text(f"run:\n  out_dir: {tmp_path / out}\n")
    return config


def test_training_out_dir(tmp_path):
    config = _config(tmp_path)
    assert S.training_out_dir(config, []) == str(tmp_path / "run")
    assert S.training_out_dir(config, ["run.out_dir=a", "x=1", "run.out_dir=b"]) == "b"
    empty = tmp_path / "empty.yaml"
    empty.write_text("optim: {lr: 1.0e-3}\n")
    assert S.training_out_dir(empty, []) is None
    with pytest.raises(UserError, match="no run.out_dir"):
        S.submit_training(empty, [], S.ClusterOptions(cluster="debug"))
    with pytest.raises(UserError, match="expected key.sub=value"):
        S.submit_training(config, ["lr"], S.ClusterOptions(cluster="debug"))
    with pytest.raises(UserError, match="no such config"):
        S.submit_training(tmp_path / "missing.yaml", [], S.ClusterOptions(cluster="debug"))


def test_resolve_entry():
    assert S.resolve_entry(STANDIN) is standin_trainer.main
    for bad in ("tests.launch.standin_trainer", "tests.launch.standin_trainer:nope"):
        with pytest.raises(ValueError):
            S.resolve_entry(bad)


# --------------------------------------------------------------------------- debug executor (in-process)


def test_debug_training_job_runs_in_process(tmp_path):
    out = tmp_path / "run"
    job = S.submit_training(_config(tmp_path), ["standin.steps=7"], S.ClusterOptions(cluster="debug", time="5"),
                            entry=STANDIN)
    assert S.wait(job) == [{"rank": 0, "world_size": 1, "status": 0}]
    final = json.loads((out / "final-rank0.json").read_text())
    assert final == {"step": 7, "value": standin_trainer.expected(7), "resumed_from": 0}
    env = json.loads((out / "env" / "rank0-restart0.json").read_text())
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")


def test_debug_job_failure_is_a_job_failed_error(tmp_path):
    job = S.submit_training(_config(tmp_path), ["standin.fail_at=2"], S.ClusterOptions(cluster="debug", time="5"),
                            entry=STANDIN)
    with pytest.raises(S.JobFailed, match="planned failure at step 2"):
        S.wait(job)


def test_training_job_turns_a_nonzero_status_into_an_error(monkeypatch):
    monkeypatch.setenv("SUBMITIT_DEBUG_JOB_ID", "x")
    job = S.TrainingJob(("--config", "c.yaml"), entry="tests.launch.test_submit:_exits_with_two")
    with pytest.raises(RuntimeError, match="returned status 2 on rank 0"):
        job()


def _exits_with_two(argv: list[str]) -> int:
    return 2


def test_checkpoint_requeues_the_same_call():
    job = S.TrainingJob(("--config", "c.yaml", "a=1"), entry=STANDIN)
    delayed = job.checkpoint()
    assert delayed.function == job and delayed.function is not job and delayed.args == () and delayed.kwargs == {}
    shards = S.ShardsJob("/data/x.txt", "/out/shards", overwrite=True)
    assert shards.checkpoint().function == S.ShardsJob("/data/x.txt", "/out/shards", overwrite=False)


def test_debug_shards_job_builds_and_verifies(tmp_path, capsys):
    out = tmp_path / "shards"
    status = cli.main(["submit", "shards", str(DEMO_TRAIN), "--out", str(out), "--cluster", "debug",
                       "--rows-per-block", "256", "--blocks-per-shard", "4"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    summary = json.loads(printed.strip().splitlines()[-2])
    assert summary["rows"] == summary["verified_rows"] == 6370 and summary["workers"] >= 1
    assert cli.main(["shards", "verify", str(out)]) == 0
    assert (out / "slurm").is_dir()  # job files beside the shards by default


def test_requeued_shards_job_keeps_its_finished_shards_despite_overwrite(tmp_path, monkeypatch):
    """A --overwrite job requeued from outside reruns its original call: it must not clear the
    shards its first run finished (SLURM_RESTART_COUNT tells a rerun apart)."""
    from promoter_dist.data.shards import ShardOptions

    out = tmp_path / "shards"
    options = ShardOptions(rows_per_block=256, blocks_per_shard=4)
    job = S.ShardsJob(str(DEMO_TRAIN), str(out), options, workers=1, overwrite=True)
    first = job()
    assert first["shards_written"] > 0 and first["shards_reused"] == 0
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    again = job()
    assert again["shards_written"] == 0 and again["verified_rows"] == first["verified_rows"] == 6370
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # a first run with --overwrite does rewrite
    assert job()["shards_written"] == first["shards_written"]


# --------------------------------------------------------------------------- local executor (processes here)


def _local_options(**kwargs) -> S.ClusterOptions:
    # The tasks import the stand-in from the repository; sbatch-like setup lines do that.
    return S.ClusterOptions(cluster="local", time="5", setup=[f"export PYTHONPATH={REPO}"], **kwargs)


def test_local_two_tasks_see_their_ranks_and_reach_each_other(tmp_path):
    out = tmp_path / "run"
    job = S.submit_training(_config(tmp_path), ["standin.steps=3", "standin.collective=1"],
                            _local_options(tasks_per_node=2), entry=STANDIN)
    assert job.paths.folder.parent == out / "slurm"
    results = S.wait(job, poll_s=0.5)
    assert [r["rank"] for r in results] == [0, 1]
    for rank in (0, 1):
        env = json.loads((out / "env" / f"rank{rank}-restart0.json").read_text())
        assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == (
            str(rank), str(rank), "2", "2")
        assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] == str(S_port(job.job_id))
        assert env["all_reduce_sum"] == 3  # 1 + 2 over gloo: the tasks found each other


def S_port(job_id: str) -> int:
    from promoter_dist.launch.environment import master_port

    return master_port(job_id)


def _preempt_local_job(tmp_path: Path, steps: int, extra: list[str], **options) -> tuple[dict, str, Path]:
    """Run the stand-in for ``steps`` steps of 0.1 s, send USR2 to rank 0 (what SLURM sends) after
    10 steps, wait for the job: (its final state, rank 0's job log, its progress log)."""
    out = tmp_path / "run"
    job = S.submit_training(_config(tmp_path), [f"standin.steps={steps}", "standin.step_seconds=0.1",
                                                "run.checkpoint_every=4", *extra], _local_options(**options),
                            entry=STANDIN)
    progress = out / "progress-rank0.log"
    deadline = time.time() + 60
    while not (progress.exists() and progress.read_text().count("step ") >= 10):
        assert time.time() < deadline, "the job did not start"
        time.sleep(0.1)
    pid = json.loads((out / "env" / "rank0-restart0.json").read_text())["pid"]
    os.kill(pid, signal.SIGUSR2)
    assert S.wait(job, poll_s=0.5) == [{"rank": 0, "world_size": 1, "status": 0}]
    final = json.loads((out / "final-rank0.json").read_text())
    assert final["step"] == steps and final["value"] == standin_trainer.expected(steps)
    return final, (job.paths.folder / f"{job.job_id}_0_log.out").read_text(), progress


def test_local_preemption_requeues_and_resumes(tmp_path):
    """USR2: the trainer checkpoints, checkpoint() -> requeue, the rerun resumes and ends identical."""
    steps = 30
    final, log, progress = _preempt_local_job(tmp_path, steps, [])
    assert "requeueing" in log and log.count("[promoter-dist] task rank 0/1") == 2
    # The trainer checkpointed the step it was in when the signal came, not a periodic one: the
    # rerun starts there, and every step ran exactly once over both runs.
    stopped = re.search(r"stopped on request at step (\d+)", log)
    assert stopped and int(stopped.group(1)) == final["resumed_from"] >= 10
    assert f"checkpoint of step {final['resumed_from']} written on every rank; requeueing" in log
    done = [int(line.split()[1]) for line in progress.read_text().splitlines() if line.startswith("step ")]
    assert done == list(range(1, steps + 1))


def test_local_preemption_without_a_checkpoint_in_time_requeues_from_the_last_periodic_one(tmp_path):
    """A trainer that never reaches a step boundary: rank 0 requeues once the grace period is over."""
    steps = 120  # 12 s: still running when the 8 s grace period (of a 12 s signal delay) ends
    final, log, _ = _preempt_local_job(tmp_path, steps, ["standin.honour_stop=0"], signal_delay_s=12)
    assert final["resumed_from"] % 4 == 0 and 40 <= final["resumed_from"] < steps
    assert "no checkpoint 8 s after the signal: requeueing from the last periodic checkpoint" in log


def test_local_failure_reports_the_log_tail(tmp_path):
    job = S.submit_training(_config(tmp_path), ["standin.exit_at=1"], _local_options(), entry=STANDIN)
    with pytest.raises(S.JobFailed) as info:
        S.wait(job, poll_s=0.5)
    message = str(info.value)
    assert "without a result from task 0" in message and "dying at step 1" in message
    assert f"{job.job_id}_0_log" in message


def test_forked_children_do_not_inherit_the_job_signal_handlers():
    """submitit makes a task ignore SIGTERM; a Pool worker forked from it used to as well, so
    ``Pool.terminate()`` (which read_dream calls) waited forever for a busy worker."""
    script = f"""
import multiprocessing as mp, os, signal, sys, time
sys.path.insert(0, {str(REPO)!r})
from promoter_dist.launch import slurm
signal.signal(signal.SIGTERM, lambda *a: None)  # what submitit installs in a task
signal.signal(signal.SIGUSR2, lambda *a: None)
slurm.protect_forked_children()
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
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    seconds, child_status = out.stdout.split()
    assert float(seconds) < 10 and child_status == "0", out.stderr


def test_local_shards_job_finishes(tmp_path):
    """build_shards terminates its worker pools: under submitit's handlers that once hung forever."""
    out = tmp_path / "shards"
    job = S.submit_shards(DEMO_TRAIN, out, S.ClusterOptions(cluster="local", time="5"))
    (summary,) = S.wait(job, poll_s=0.5, timeout_s=120)
    assert summary["rows"] == summary["verified_rows"] == 6370 and summary["workers"] == os.cpu_count()


def test_wait_without_accounting_reads_results_of_a_forgotten_job(tmp_path, monkeypatch):
    """No sacct database and scontrol has purged the job: the result files decide."""
    import submitit
    from submitit.core.utils import cloudpickle_dump

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"scontrol": "echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1",
                       "sacct": "echo 'sacct: error: accounting storage is disabled' >&2; exit 1"}.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{text}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    folder = tmp_path / "logs" / "%j"
    done = submitit.SlurmJob(folder=folder, job_id="77", tasks=[0, 1])
    done.paths.folder.mkdir(parents=True)
    for task in (0, 1):
        cloudpickle_dump(("success", {"rank": task}), submitit.core.utils.JobPaths(folder, "77", task).result_pickle)
    assert S.wait(done, poll_s=0.1) == [{"rank": 0}, {"rank": 1}]
    lost = submitit.SlurmJob(folder=folder, job_id="78", tasks=[0])
    lost.paths.folder.mkdir(parents=True)
    (lost.paths.folder / "78_0_log.err").write_text("slurmstepd: error: Detected 1 oom_kill event\n")
    with pytest.raises(S.JobFailed, match="(?s)job 78 ended ENDED without a result from task 0.*oom_kill"):
        S.wait(lost, poll_s=0.1)


def test_wait_follows_a_preempted_job_through_its_requeue(tmp_path, monkeypatch):
    """PREEMPTED is not the end while the controller may still requeue the job."""
    import submitit
    from submitit.core.utils import cloudpickle_dump

    folder = tmp_path / "logs" / "%j"
    job = submitit.SlurmJob(folder=folder, job_id="91", tasks=[0])
    job.paths.folder.mkdir(parents=True)
    result = submitit.core.utils.JobPaths(folder, "91", 0).result_pickle
    states = iter(["RUNNING", "PREEMPTED", "PREEMPTED", "PREEMPTED", "PENDING", "RUNNING", "COMPLETED"])

    def next_state(_job):
        state = next(states)
        if state == "COMPLETED":
            cloudpickle_dump(("success", {"rank": 0}), result)
        return state

    monkeypatch.setattr(S, "slurm_state", next_state)
    seen = []
    assert S.wait(job, poll_s=0.01, on_poll=seen.append) == [{"rank": 0}]
    assert seen[-1] == "COMPLETED" and seen.count("PREEMPTED") == 3
    # A job that stays PREEMPTED without results is reported once the grace period is over.
    monkeypatch.setattr(S, "REQUEUE_GRACE_S", {"PREEMPTED": 0.05})
    monkeypatch.setattr(S, "slurm_state", lambda _job: "PREEMPTED")
    stuck = submitit.SlurmJob(folder=folder, job_id="92", tasks=[0])
    stuck.paths.folder.mkdir(parents=True)
    with pytest.raises(S.JobFailed, match="job 92 ended PREEMPTED without a result from task 0"):
        S.wait(stuck, poll_s=0.01)


def test_stop_requests_cost_nothing_until_a_job_arms_them(monkeypatch):
    """A plain `deepspeed train.py` run never takes the per-step stop collective; a job task does."""
    from promoter_dist import distributed

    monkeypatch.setattr(distributed, "STOP", distributed.StopRequest())
    distributed.request_stop(signal.SIGUSR2)
    assert distributed.STOP.requested and distributed.STOP.signal_name == "SIGUSR2"
    assert not distributed.stop_requested()  # not armed: no check at all
    distributed.arm_stop_requests()
    assert distributed.stop_requested()
