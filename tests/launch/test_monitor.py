"""Waiting for jobs: results, requeues and jobs SLURM has forgotten, with stand-ins for scontrol and sacct."""

from __future__ import annotations

import os

import pytest

from promoter_dist.launch import monitor
from promoter_dist.launch.monitor import JobFailed, wait


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
    assert wait(done, poll_s=0.1) == [{"rank": 0}, {"rank": 1}]
    lost = submitit.SlurmJob(folder=folder, job_id="78", tasks=[0])
    lost.paths.folder.mkdir(parents=True)
    (lost.paths.folder / "78_0_log.err").write_text("slurmstepd: error: Detected 1 oom_kill event\n")
    with pytest.raises(JobFailed, match="(?s)job 78 ended ENDED without a result from task 0.*oom_kill"):
        wait(lost, poll_s=0.1)


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

    monkeypatch.setattr(monitor, "slurm_state", next_state)
    seen = []
    assert wait(job, poll_s=0.01, on_poll=seen.append) == [{"rank": 0}]
    assert seen[-1] == "COMPLETED" and seen.count("PREEMPTED") == 3
    # A job that stays PREEMPTED without results is reported once the grace period is over.
    monkeypatch.setattr(monitor, "REQUEUE_GRACE_S", {"PREEMPTED": 0.05})
    monkeypatch.setattr(monitor, "slurm_state", lambda _job: "PREEMPTED")
    stuck = submitit.SlurmJob(folder=folder, job_id="92", tasks=[0])
    stuck.paths.folder.mkdir(parents=True)
    with pytest.raises(JobFailed, match="job 92 ended PREEMPTED without a result from task 0"):
        wait(stuck, poll_s=0.01)
