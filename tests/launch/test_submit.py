"""Submission without SLURM: sbatch script text, errors, and jobs run by the local / debug executors."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import time
from pathlib import Path

import pytest

from promoter_dist import cli
from promoter_dist.errors import UserError
from promoter_dist.launch.jobs import DEFAULT_ENTRY, TrainingJob
from promoter_dist.launch.monitor import JobFailed, wait
from promoter_dist.launch.options import ClusterOptions
from promoter_dist.launch.submit import (LOADER_WORKERS_DEFAULT, config_value, job_folder, local_visible_gpus,
                                         make_executor, submit_shards, submit_training, training_options,
                                         training_out_dir)
from tests.conftest import DEMO_TRAIN, REPO
from tests.launch import standin_trainer
from tests.launch.test_resources import fake_sinfo

STANDIN = "tests.launch.standin_trainer:main"


# The partitions of the stand-in sinfo: the default one without GPUs, one with.
SINFO_GRES = "debug* (null)\ngpu gpu:a100:4(S:0-1)\ngpu gpu:a100:8(S:0-1)"


def fake_slurm_bin(folder: Path, sbatch_stderr: str | None = None, sinfo_gres: str = SINFO_GRES) -> Path:
    """A folder with stand-ins for srun (presence only), sbatch (prints a job id, or refuses) and
    sinfo (``sinfo_gres`` as the partitions' generic resources)."""
    folder.mkdir(parents=True, exist_ok=True)
    scripts = {"srun": "#!/bin/sh\nexit 0\n", "sinfo": "#!/bin/sh\n" + fake_sinfo({"%P %G": sinfo_gres}) + "\n"}
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
    options = ClusterOptions(
        nodes=4, gpus_per_node=8, cpus_per_task=10, mem_gb=480, partition="gpu", account="bio", qos="high",
        constraint="a100", time="24:00:00", job_name="nad", setup=["module load cuda"],
        additional={"mail-type": "END"})
    executor = make_executor(options, job_folder(tmp_path / "logs"))
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
    assert " --kill-on-bad-exit=1 " in srun  # one failing task ends the others


def test_submit_training_with_fake_sbatch_writes_the_job_files(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{fake_slurm_bin(tmp_path / 'bin')}:{os.environ['PATH']}")
    config = tmp_path / "run.yaml"
    config.write_text(f"run:\n  out_dir: {tmp_path / 'run'}\n")
    job = submit_training(config, ["optim.lr=1e-3"], ClusterOptions(time="10"))
    assert job.job_id == "4242"
    assert job.paths.folder == tmp_path / "run" / "slurm" / "4242"
    assert job.paths.submitted_pickle.exists() and job.paths.submission_file.exists()
    from submitit.core.utils import DelayedSubmission

    task = DelayedSubmission.load(job.paths.submitted_pickle).function
    # USR2 120 s before the limit: up to 80 s for the trainer's checkpoint, the rest for the requeue.
    assert task == TrainingJob(("--config", str(config), "optim.lr=1e-3"), entry=DEFAULT_ENTRY, stop_grace_s=80)


def test_sbatch_refusal_is_a_user_error_with_its_message(tmp_path, monkeypatch):
    refusal = "sbatch: error: Batch job submission failed: Invalid partition name specified"
    bin_dir = fake_slurm_bin(tmp_path / "bin", refusal)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    with pytest.raises(UserError, match="sbatch refused the job: .*Invalid partition name specified"):
        submit_training(_config(tmp_path), [], ClusterOptions(partition="nope", time="5"))
    assert not list((tmp_path / "run" / "slurm").glob("*.pkl"))  # no pickle of a job that does not exist


def test_no_slurm_on_this_machine_says_what_to_do(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(UserError, match="sbatch and srun not found.*--cluster local"):
        make_executor(ClusterOptions(), tmp_path / "logs")
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
    assert training_out_dir(config, []) == str(tmp_path / "run")
    assert training_out_dir(config, ["run.out_dir=a", "x=1", "run.out_dir=b"]) == "b"
    empty = tmp_path / "empty.yaml"
    empty.write_text("optim: {lr: 1.0e-3}\n")
    assert training_out_dir(empty, []) is None
    with pytest.raises(UserError, match="no run.out_dir"):
        submit_training(empty, [], ClusterOptions(cluster="debug"))
    with pytest.raises(UserError, match="expected key.sub=value"):
        submit_training(config, ["lr"], ClusterOptions(cluster="debug"))
    with pytest.raises(UserError, match="no such config"):
        submit_training(tmp_path / "missing.yaml", [], ClusterOptions(cluster="debug"))


def test_control_characters_in_paths_and_overrides_are_refused(tmp_path):
    """Strings that reach the job folder, the job's pickle or its log lines: refused before anything is written."""
    config = _config(tmp_path)
    debug = ClusterOptions(cluster="debug")
    with pytest.raises(UserError, match=r"^--config: .*\(newline\)"):
        submit_training(tmp_path / "run\n.yaml", [], debug)
    with pytest.raises(UserError, match=r"^override: 'run.out_dir=a\\nrm -rf x' holds .*\(newline\) at position 14"):
        submit_training(config, ["optim.lr=1", "run.out_dir=a\nrm -rf x"], debug)
    with pytest.raises(UserError, match=r"^--log-dir: .*\(carriage return\)"):
        submit_training(config, [], debug, log_dir=tmp_path / "logs\r")
    hostile = tmp_path / "hostile.yaml"
    hostile.write_text('run:\n  out_dir: "runs/a\\nrm -rf x"\n')  # the YAML string holds a newline
    with pytest.raises(UserError, match=r"^run.out_dir: .*\(newline\)"):
        submit_training(hostile, [], debug)
    with pytest.raises(UserError, match=r"^source: .*\(NUL\)"):
        submit_shards(tmp_path / "a\0.txt", tmp_path / "shards", debug)
    with pytest.raises(UserError, match=r"^--out: .*\(escape\)"):
        submit_shards(DEMO_TRAIN, tmp_path / "sh\x1bards", debug)
    with pytest.raises(UserError, match=r"^--log-dir: .*\(newline\)"):
        submit_shards(DEMO_TRAIN, tmp_path / "shards", debug, log_dir="logs\nx")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["hostile.yaml", "run.yaml"]  # nothing written


# --------------------------------------------------------------------------- GPUs and cores a training job asks for


def _script(job) -> str:
    return job.paths.submission_file.read_text()


def _srun(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("srun "))


def test_default_submit_on_a_partition_without_gpus_asks_for_none_and_cores_for_the_loader(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{fake_slurm_bin(tmp_path / 'bin')}:{os.environ['PATH']}")
    text = _script(submit_training(_config(tmp_path), [], ClusterOptions(time="10")))
    assert "--gpus-per-node" not in text and "gres" not in text
    # No data.num_workers in the config: the trainer's default, 0 workers, so one core per task.
    assert "#SBATCH --cpus-per-task=1\n" in text and " --cpus-per-task 1 " in _srun(text)


def test_gpu_partition_without_gpus_asked_for_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", f"{fake_slurm_bin(tmp_path / 'bin')}:{os.environ['PATH']}")
    config = _config(tmp_path)
    with pytest.raises(UserError) as info:
        submit_training(config, [], ClusterOptions(partition="gpu", time="10"))
    message = str(info.value)
    assert message == ("partition gpu has GPUs (gpu:a100:8(S:0-1)) but the job asks for none: pass --gpus-per-node N "
                       "(or --gpus-per-node 0 to train on CPUs on purpose)")
    assert not (tmp_path / "run").exists()  # refused before anything was written
    status = cli.main(["submit", "train", "--config", str(config), "--partition", "gpu", "--time", "5"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "--gpus-per-node N" in err
    # The default partition has GPUs: the same.
    gpu_default = fake_slurm_bin(tmp_path / "bin2", sinfo_gres="cpu (null)\ngpu* gpu:8")
    monkeypatch.setenv("PATH", f"{gpu_default}:{os.environ['PATH']}")
    with pytest.raises(UserError, match=r"^partition gpu has GPUs \(gpu:8\)"):
        submit_training(config, [], ClusterOptions(time="10"))


def test_gpus_asked_for_on_a_gpu_partition(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{fake_slurm_bin(tmp_path / 'bin')}:{os.environ['PATH']}")
    config = _config(tmp_path)
    text = _script(submit_training(config, [], ClusterOptions(partition="gpu", gpus_per_node=4, time="10")))
    assert "#SBATCH --gpus-per-node=4\n" in text and "#SBATCH --ntasks-per-node=4\n" in text
    # 0 on purpose: CPU ranks on a GPU partition.
    text = _script(submit_training(config, [], ClusterOptions(partition="gpu", gpus_per_node=0, time="10")))
    assert "--gpus-per-node" not in text
    # GPUs asked for through another sbatch option: no refusal, and no --gpus-per-node added.
    for key, value in (("gpus-per-task", "1"), ("gres", "gpu:a100:4"), ("gpus", "8")):
        options = ClusterOptions(partition="gpu", tasks_per_node=4, additional={key: value}, time="10")
        text = _script(submit_training(config, [], options))
        assert f"#SBATCH --{key}={value}\n" in text and "--gpus-per-node" not in text


def test_cores_per_task_follow_the_loader_workers(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{fake_slurm_bin(tmp_path / 'bin')}:{os.environ['PATH']}")
    config = tmp_path / "run.yaml"
    config.write_text(f"run:\n  out_dir: {tmp_path / 'run'}\ndata:\n  num_workers: 4\n")
    text = _script(submit_training(config, [], ClusterOptions(gpus_per_node=2, time="10")))
    assert "#SBATCH --cpus-per-task=5\n" in text and " --cpus-per-task 5 " in _srun(text)
    for overrides, cores in ((["data.num_workers=2"], 3), (["data={num_workers: 6, batch_size: 8}"], 7),
                             (["data.num_workers=2", "data={batch_size: 8}"], 3), (["data.num_workers=0"], 1)):
        assert training_options(ClusterOptions(gpus_per_node=2), config, overrides).cpus_per_task == cores, overrides
    # Said on the command line: kept.
    text = _script(submit_training(config, [], ClusterOptions(gpus_per_node=2, cpus_per_task=12, time="10")))
    assert "#SBATCH --cpus-per-task=12\n" in text and " --cpus-per-task 12 " in _srun(text)
    for bad, message in (("data.num_workers=four", "expected an integer, got 'four'"),
                         ("data.num_workers=true", "expected an integer, got True"),
                         ("data.num_workers=-1", "must be >= 0, not -1"),
                         ("data.num_workers=[1", "not valid YAML")):
        with pytest.raises(UserError, match=re.escape(message)):
            submit_training(config, [bad], ClusterOptions(gpus_per_node=2, time="10"))


def test_loader_workers_default_is_the_trainers():
    import dataclasses

    from promoter_dist.config import DataConfig

    default = {f.name: f.default for f in dataclasses.fields(DataConfig)}["num_workers"]
    assert LOADER_WORKERS_DEFAULT == default


def test_config_value(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("run:\n  out_dir: runs/a\ndata:\n  num_workers: 4\n  shards: out/shards\n")
    assert config_value(config, [], "data.num_workers") == 4
    assert config_value(config, ["data.num_workers=8", "optim.lr=1"], "data.num_workers") == 8
    assert config_value(config, ["data.num_workers=8", "data.num_workers=2"], "data.num_workers") == 2
    assert config_value(config, ["data={num_workers: 3}"], "data.num_workers") == 3
    assert config_value(config, ["data={batch_size: 3}"], "data.num_workers") == 4  # a section override merges
    assert config_value(config, ["data.num_workers_x=1"], "data.num_workers") == 4
    assert config_value(config, [], "data.batch_size") is None and config_value(config, [], "engine.x") is None
    assert config_value(config, [], "run.out_dir.x") is None  # below a value that is not a section
    assert config_value(config, ["run.out_dir=runs/b"], "run.out_dir") == "runs/b"


def test_local_job_keeps_the_shells_gpus(tmp_path, monkeypatch):
    """submitit's local executor would give the tasks GPUs 0..G-1: they get the shell's own list."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    options = training_options(_local_options(gpus_per_node=None, tasks_per_node=2), _config(tmp_path), [])
    assert options.gpus_per_node == 2 and options.tasks == 2  # every GPU this shell sees
    assert local_visible_gpus(options) == (5, 7)
    job = submit_training(_config(tmp_path), ["standin.steps=1"], _local_options(gpus_per_node=None), entry=STANDIN)
    assert [r["rank"] for r in wait(job, poll_s=0.5)] == [0, 1]
    for rank in (0, 1):  # each task sees both; the trainer picks the local rank's (distributed.device_index)
        env = json.loads((tmp_path / "run" / "env" / f"rank{rank}-restart0.json").read_text())
        assert env["CUDA_VISIBLE_DEVICES"] == "5,7" and env["LOCAL_RANK"] == str(rank)


def test_local_gpus_checked_against_the_shell(tmp_path, monkeypatch):
    config = _config(tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    assert training_options(_local_options(gpus_per_node=1), config, []).gpus_per_node == 1
    assert local_visible_gpus(_local_options(gpus_per_node=1)) == (5, 7)  # submitit takes the first one
    assert local_visible_gpus(_local_options(gpus_per_node=0)) is None  # CPU tasks: submitit hides every GPU
    with pytest.raises(UserError, match=r"^--gpus-per-node 4, but this shell sees 2 GPU\(s\) "
                                        r"\(CUDA_VISIBLE_DEVICES=5,7\)"):
        training_options(_local_options(gpus_per_node=4), config, [])
    with pytest.raises(UserError, match=r"^--tasks-per-node 4, but this shell sees 2 GPU\(s\).*--gpus-per-node 0"):
        training_options(_local_options(gpus_per_node=None, tasks_per_node=4), config, [])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f2a,GPU-11bc")
    with pytest.raises(UserError, match=r"^--cluster local: CUDA_VISIBLE_DEVICES=GPU-8f2a,GPU-11bc names GPUs by UUID"):
        make_executor(_local_options(gpus_per_node=2), tmp_path / "logs")
    assert not (tmp_path / "logs").exists()
    # No GPU anywhere (no variable, no nvidia-smi): CPU tasks; in-process debug runs take at most one GPU.
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("PATH", str(fake_slurm_bin(tmp_path / "bin")))
    assert training_options(_local_options(gpus_per_node=None), config, []).gpus_per_node == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    assert training_options(ClusterOptions(cluster="debug"), config, []).gpus_per_node == 1


# --------------------------------------------------------------------------- debug executor (in-process)


def test_debug_training_job_runs_in_process(tmp_path):
    out = tmp_path / "run"
    job = submit_training(_config(tmp_path), ["standin.steps=7"], ClusterOptions(cluster="debug", time="5"),
                          entry=STANDIN)
    assert wait(job) == [{"rank": 0, "world_size": 1, "status": 0}]
    final = json.loads((out / "final-rank0.json").read_text())
    assert final == {"step": 7, "value": standin_trainer.expected(7), "resumed_from": 0}
    env = json.loads((out / "env" / "rank0-restart0.json").read_text())
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")


def test_debug_job_failure_is_a_job_failed_error(tmp_path):
    job = submit_training(_config(tmp_path), ["standin.fail_at=2"], ClusterOptions(cluster="debug", time="5"),
                          entry=STANDIN)
    with pytest.raises(JobFailed, match="planned failure at step 2"):
        wait(job)


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


# --------------------------------------------------------------------------- local executor (processes here)


def _local_options(**kwargs) -> ClusterOptions:
    # The tasks import the stand-in from the repository; sbatch-like setup lines do that. CPU
    # tasks whatever GPUs this machine has, unless a test says otherwise.
    kwargs.setdefault("gpus_per_node", 0)
    return ClusterOptions(cluster="local", time="5", setup=[f"export PYTHONPATH={REPO}"], **kwargs)


def test_local_two_tasks_see_their_ranks_and_reach_each_other(tmp_path):
    out = tmp_path / "run"
    job = submit_training(_config(tmp_path), ["standin.steps=3", "standin.collective=1"],
                          _local_options(tasks_per_node=2), entry=STANDIN)
    assert job.paths.folder.parent == out / "slurm"
    results = wait(job, poll_s=0.5)
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
    job = submit_training(_config(tmp_path), [f"standin.steps={steps}", "standin.step_seconds=0.1",
                                              "run.checkpoint_every=4", *extra], _local_options(**options),
                          entry=STANDIN)
    progress = out / "progress-rank0.log"
    deadline = time.time() + 60
    while not (progress.exists() and progress.read_text().count("step ") >= 10):
        assert time.time() < deadline, "the job did not start"
        time.sleep(0.1)
    pid = json.loads((out / "env" / "rank0-restart0.json").read_text())["pid"]
    os.kill(pid, signal.SIGUSR2)
    assert wait(job, poll_s=0.5) == [{"rank": 0, "world_size": 1, "status": 0}]
    final = json.loads((out / "final-rank0.json").read_text())
    assert final["step"] == steps and final["value"] == standin_trainer.expected(steps)
    return final, (job.paths.folder / f"{job.job_id}_0_log.out").read_text(), progress


@pytest.mark.slow
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


@pytest.mark.slow
def test_local_preemption_without_a_checkpoint_in_time_requeues_from_the_last_periodic_one(tmp_path):
    """A trainer that never reaches a step boundary: rank 0 requeues once the grace period is over."""
    steps = 120  # 12 s: still running when the 8 s grace period (of a 12 s signal delay) ends
    final, log, _ = _preempt_local_job(tmp_path, steps, ["standin.honour_stop=0"], signal_delay_s=12)
    assert final["resumed_from"] % 4 == 0 and 40 <= final["resumed_from"] < steps
    assert "no checkpoint 8 s after the signal: requeueing from the last periodic checkpoint" in log


def test_local_failure_reports_the_log_tail(tmp_path):
    job = submit_training(_config(tmp_path), ["standin.exit_at=1"], _local_options(), entry=STANDIN)
    with pytest.raises(JobFailed) as info:
        wait(job, poll_s=0.5)
    message = str(info.value)
    assert "without a result from task 0" in message and "dying at step 1" in message
    assert f"{job.job_id}_0_log" in message


def test_local_shards_job_finishes(tmp_path):
    """build_shards terminates its worker pools: under submitit's handlers that once hung forever."""
    out = tmp_path / "shards"
    job = submit_shards(DEMO_TRAIN, out, ClusterOptions(cluster="local", time="5"))
    (summary,) = wait(job, poll_s=0.5, timeout_s=120)
    assert summary["rows"] == summary["verified_rows"] == 6370 and summary["workers"] == os.cpu_count()
