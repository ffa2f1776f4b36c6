"""Real SLURM for these tests: the session brings a cluster up on this machine with .ci/slurm-up.sh.

Two slurmd daemons play two nodes (n1, n2; PROMOTER_DIST_SLURM_NODES=2), so that a job
really spans two nodes; every other test runs on one of them.

Never skipped: a machine where the cluster cannot be brought up (not root, no apt, daemons
that do not start) fails every test here with slurm-up's own message. slurm-up.sh is
idempotent and serialises concurrent callers with a lock, so each pytest-xdist worker
simply runs it once. The cluster is left running at the end (other workers may still use
it); .ci/slurm-down.sh stops it.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

SLURM_UP = REPO / ".ci" / "slurm-up.sh"
NODES = 2
# The stand-in trainer lives in the test tree: make it importable inside the job's tasks.
SETUP = [f"export PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}}"]


@pytest.fixture(scope="session", autouse=True)
def slurm_cluster() -> str:
    """Run slurm-up.sh (install if needed, start, wait for the node); fail loudly if it cannot."""
    t0 = time.perf_counter()
    try:
        result = subprocess.run(["bash", str(SLURM_UP)], capture_output=True, text=True, timeout=900,
                                env={**os.environ, "PROMOTER_DIST_SLURM_NODES": str(NODES)})
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{SLURM_UP} did not finish in {exc.timeout} s:\n{exc.stdout}\n{exc.stderr}", pytrace=False)
    if result.returncode != 0:
        pytest.fail(f"{SLURM_UP} failed (exit {result.returncode}); the SLURM tests need a real cluster:\n"
                    f"{result.stdout}{result.stderr}", pytrace=False)
    print(f"\n{result.stdout.strip()}\n(slurm-up.sh took {time.perf_counter() - t0:.1f} s)")
    return result.stdout


_HELD_SINCE: dict[str, float] = {}
RELEASE_AFTER_S = 3.0


def release_if_held(job_id: str) -> None:
    """Make a requeued job eligible soon.

    SLURM keeps a requeued job pending for about two minutes (Reason=BeginTime) before it may
    start again; on a real cluster that is harmless, here it would only slow the tests down.
    The job is released a few seconds after it was first seen held, not at once: slurmd
    compares a job credential's creation time with the time the previous run's credential was
    revoked to the second, so a rerun started within the same second as the requeue is killed
    as "non-startable: Job credential revoked" and the job ends FAILED.
    """
    from promoter_dist.launch.monitor import slurm_job_info

    info = slurm_job_info(job_id) or {}
    if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
        since = _HELD_SINCE.setdefault(job_id, time.monotonic())
        if time.monotonic() - since >= RELEASE_AFTER_S:
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True,
                           capture_output=True)
            del _HELD_SINCE[job_id]


def wait_for_lines(path: Path, needle: str, count: int, timeout_s: float = 120) -> None:
    """Block until ``path`` holds ``count`` lines containing ``needle``."""
    deadline = time.time() + timeout_s
    while not (path.exists() and path.read_text().count(needle) >= count):
        if time.time() > deadline:
            raise AssertionError(f"{path}: fewer than {count} '{needle}' lines after {timeout_s} s")
        time.sleep(0.2)
