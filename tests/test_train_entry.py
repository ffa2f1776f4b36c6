"""``train.py`` as a user runs it: --dump-config, errors as one line with status 2, and tiny real runs
under ``torchrun`` (2 CPU ranks) and as a plain ``python train.py`` (no launcher environment)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# every test starts train.py in a fresh interpreter (DeepSpeed's import alone takes seconds)
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train.py"
DEBUG = REPO / "configs" / "nad" / "debug.yaml"
LAUNCHER_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID", "GROUP_RANK")


def clean_env() -> dict[str, str]:
    """The caller's environment without any launcher variables (a plain shell)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_KEYS}
    env["PYTHONWARNINGS"] = "ignore"
    return env


def run(command: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=clean_env())


def train_py(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return run([sys.executable, TRAIN, *args], timeout=timeout)


def everything(done: subprocess.CompletedProcess) -> str:
    return f"--- stdout ---\n{done.stdout[-4000:]}\n--- stderr ---\n{done.stderr[-4000:]}"


def assert_one_line_error(done: subprocess.CompletedProcess, *expected: str) -> str:
    assert done.returncode == 2, everything(done)
    assert "Traceback" not in done.stdout + done.stderr, everything(done)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, everything(done)
    assert lines[0].startswith("error: "), everything(done)
    for text in expected:
        assert text in lines[0], (text, everything(done))
    return lines[0]


# --------------------------------------------------------------------------- --dump-config and errors


def test_dump_config_prints_the_resolved_yaml_with_the_override(tmp_path):
    done = train_py("--dump-config", "--config", str(DEBUG), "optim.lr=0.001", "model.nad.heads=2")
    assert done.returncode == 0, everything(done)
    assert "Traceback" not in done.stderr
    printed = yaml.safe_load(done.stdout)
    assert printed["optim"]["lr"] == 0.001
    assert printed["model"]["nad"]["heads"] == 2
    assert printed["model"]["nad"]["channels"] == yaml.safe_load(DEBUG.read_text())["model"]["nad"]["channels"]
    assert set(printed) == {"run", "data", "model", "task", "optim", "schedule", "engine"}
    # The printed YAML is itself a config file that resolves to the same thing.
    path = tmp_path / "resolved.yaml"
    path.write_text(done.stdout)
    again = train_py("--dump-config", "--config", str(path))
    assert again.returncode == 0, everything(again)
    assert again.stdout == done.stdout


def test_unknown_key_exits_2_with_one_line_naming_it():
    done = train_py("--dump-config", "--config", str(DEBUG), "optim.gsam.rhoo=0.1")
    line = assert_one_line_error(done, "optim.gsam.rhoo", str(DEBUG))
    assert done.stdout == "", everything(done)
    assert "rho_max" in line  # the known keys are listed


def test_unknown_key_without_dump_config_fails_before_training(tmp_path):
    out = tmp_path / "run"
    done = train_py("--config", str(DEBUG), f"run.out_dir={out}", "model.nad.chanels=[8,8,16,16,16]")
    assert_one_line_error(done, "model.nad.chanels")
    assert not out.exists()


@pytest.mark.parametrize("where", ["file", "under_a_file"])
def test_a_run_folder_that_cannot_be_made_is_one_line_naming_run_out_dir(tmp_path, where):
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder\n")
    out = blocker if where == "file" else blocker / "run"
    done = train_py("--config", str(DEBUG), f"run.out_dir={out}", "data.glove=")
    assert done.returncode == 2, everything(done)
    assert "Traceback" not in done.stdout + done.stderr, everything(done)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, everything(done)
    assert "run.out_dir" in errors[0] and str(out) in errors[0] and f"{blocker} is a file" in errors[0], errors
    assert blocker.read_text() == "not a folder\n"


def test_bad_value_exits_2_with_one_line():
    assert_one_line_error(train_py("--dump-config", "engine.zero_stage=two"), "engine.zero_stage")


def test_invalid_yaml_file_exits_2_with_one_line(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim:\n  lr: [0.1\nrun: {\n")
    assert_one_line_error(train_py("--dump-config", "--config", str(broken)), str(broken), "YAML", "line")


# --------------------------------------------------------------------------- tiny real runs


def tiny_args(shards: Path, out: Path) -> list[str]:
    return ["--config", str(DEBUG), f"run.out_dir={out}", f"data.shards={shards}", "data.glove=",
            "data.batch_size=16", "model.nad.channels=[8,8,16,16,16]", "model.nad.fpn_dim=16", "model.nad.heads=2",
            "model.nad.head_dim=8", "model.nad.depths=[1,1,1,1]", "run.max_steps=3", "run.log_every=1",
            "run.checkpoint_every=3", "run.plots=false", "engine.tensorboard=false", "engine.csv=false"]


def assert_finished(done: subprocess.CompletedProcess, out: Path) -> None:
    assert done.returncode == 0, everything(done)
    assert "finished: 3 steps" in done.stdout, everything(done)
    assert done.stdout.count("finished:") == 1, everything(done)  # only rank 0 reports
    assert "Traceback" not in done.stderr, everything(done)
    assert (out / "checkpoints" / "latest").read_text() == "step00000003"
    assert (out / "config.yaml").exists()


def test_torchrun_two_ranks_runs_to_completion(small_shards, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip(f"no torchrun next to {sys.executable}")
    out = tmp_path / "run"
    done = run([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), TRAIN,
                *tiny_args(small_shards, out)], timeout=300)
    assert_finished(done, out)
    assert {p.name for p in (out / "checkpoints" / "step00000003").glob("trainer-rank*.pt")} == {
        "trainer-rank0.pt", "trainer-rank1.pt"}
    assert (out / "logs" / "rank1.log").exists()


def test_plain_python_runs_to_completion(small_shards, tmp_path):
    out = tmp_path / "run"
    done = train_py(*tiny_args(small_shards, out), timeout=300)
    assert_finished(done, out)
    assert {p.name for p in (out / "checkpoints" / "step00000003").glob("trainer-rank*.pt")} == {"trainer-rank0.pt"}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
