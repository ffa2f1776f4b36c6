"""Run a script under the ``deepspeed`` launcher with N local ranks, for multi-process tests.

The launcher is the one next to the running interpreter (``<venv>/bin/deepspeed``), so the test runs in
the same virtual environment as pytest. On a CPU-only machine ``--num_gpus N`` starts N CPU processes
that talk over gloo; the script calls ``deepspeed.init_distributed(dist_backend="gloo")`` itself and
must accept the ``--local_rank`` argument the launcher appends.

Start-up costs 15-30 s per launch on a 2-core machine: make one launch cover many cases (the worker
can call ``deepspeed.initialize`` repeatedly in one process group) and share it between tests with a
module- or session-scoped fixture.

Example::

    done = run_deepspeed(Path(__file__).with_name("my_worker.py"), ["--out", str(tmp_path / "r.json")])
    results = json.loads((tmp_path / "r.json").read_text())
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

TAIL_CHARS = 6000


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_launcher() -> Path:
    """``deepspeed`` in the directory of the running Python (its virtual environment's bin)."""
    launcher = Path(sys.executable).parent / "deepspeed"
    if not launcher.exists():
        raise FileNotFoundError(f"no deepspeed launcher next to {sys.executable} (expected {launcher})")
    return launcher


class DeepSpeedRunError(RuntimeError):
    """The launched job failed or timed out; the message carries the tails of stdout and stderr."""


def _tail(text: str) -> str:
    return text if len(text) <= TAIL_CHARS else "...\n" + text[-TAIL_CHARS:]


def _report(what: str, command: list[str], stdout: str, stderr: str) -> str:
    return f"{what}: {' '.join(command)}\n--- stdout ---\n{_tail(stdout)}\n--- stderr ---\n{_tail(stderr)}"


def run_deepspeed(
    script: Path,
    args: list[str],
    nprocs: int = 2,
    timeout: float = 300,
    env: dict | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """Run ``deepspeed --num_gpus nprocs --master_port <free> script *args`` and wait for it.

    ``env`` entries are added to (and override) the current environment. Returns the completed
    process (text stdout/stderr) when every rank exited 0; otherwise, or after ``timeout`` seconds (the
    whole process group is killed then), raises ``DeepSpeedRunError`` with both output tails.
    """
    command = [
        str(deepspeed_launcher()),
        "--num_gpus",
        str(nprocs),
        "--master_port",
        str(free_port()),
        str(script),
        *[str(a) for a in args],
    ]
    full_env = dict(os.environ)
    # A single-process environment left over from the caller would confuse the launcher's ranks.
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(name, None)
    full_env.setdefault("PYTHONWARNINGS", "ignore")
    full_env.update(env or {})
    # Own process group, so a timeout can stop the launcher and every rank it started.
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise DeepSpeedRunError(_report(f"timed out after {timeout:.0f}s", command, stdout, stderr)) from None
    done = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if done.returncode != 0:
        raise DeepSpeedRunError(_report(f"exit status {done.returncode}", command, stdout, stderr))
    return done
