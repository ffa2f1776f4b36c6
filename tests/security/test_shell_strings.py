"""Strings that reach the generated sbatch script or a shell: control characters are refused.

Each test runs the real `promoter-dist submit train` / `submit shards` with a stand-in `sbatch`
first on PATH that records its arguments and the script it is given. A string holding a newline
(or another control character) must stop the command with exit status 2 and a one-line message
naming the option, before sbatch is ever called; clean strings reach the script, whose srun line
ends every task when one fails (`--kill-on-bad-exit=1`).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from promoter_dist.cli import main
from tests.conftest import DEMO_TRAIN

pytestmark = pytest.mark.timeout(60)

SBATCH = """#!/bin/sh
# Stand-in sbatch: record the arguments and the script, then answer like sbatch.
echo "$@" >> "{record}/calls"
cat "$1" >> "{record}/scripts"
echo 'Submitted batch job 123'
"""


@pytest.fixture
def record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder receiving what the stand-in sbatch was given; the stand-ins go first on PATH."""
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    record.mkdir()
    for name, text in (("sbatch", SBATCH.format(record=record)), ("srun", "#!/bin/sh\nexit 0\n")):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return record


def _config(tmp_path: Path) -> Path:
    config = tmp_path / "run.yaml"
    config.write_text(f"run:\n  out_dir: {tmp_path / 'run'}\n")
    return config


def _train(tmp_path: Path, *args: str) -> list[str]:
    return ["submit", "train", "--config", str(_config(tmp_path)), "--time", "10", *args]


def _shards(tmp_path: Path, *args: str) -> list[str]:
    return ["submit", "shards", str(DEMO_TRAIN), "--out", str(tmp_path / "shards"), "--time", "10",
            "--cpus-per-task", "2", *args]


HOSTILE = [
    ("job name", lambda t: _train(t, "--job-name", "train\nrm -rf x"), "--job-name: ", "newline"),
    ("partition", lambda t: _train(t, "--partition", "gpu\rrm -rf x"), "--partition: ", "carriage return"),
    ("account", lambda t: _train(t, "--account", "bio\x00x"), "--account: ", "NUL"),
    ("qos", lambda t: _train(t, "--qos", "high\x7f"), "--qos: ", "DEL"),
    ("constraint", lambda t: _train(t, "--constraint", "a100\x1b[2J"), "--constraint: ", "escape"),
    ("time", lambda t: _train(t, "--time", "10\n"), "--time: ", "newline"),
    ("setup line", lambda t: _train(t, "--setup", "module load cuda\nrm -rf x"), "--setup: ", "newline"),
    ("slurm-param value", lambda t: _train(t, "--slurm-param", "mail-user=me@x\nrm -rf x"),
     "--slurm-param mail-user: ", "newline"),
    ("slurm-param key", lambda t: _train(t, "--slurm-param", "mail\ntype=END"), "--slurm-param: ", "newline"),
    ("override", lambda t: _train(t, "run.out_dir=a\nrm -rf x"), "override: 'run.out_dir=a\\nrm -rf x'", "newline"),
    ("log dir", lambda t: _train(t, "--log-dir", str(t / "logs\nrm -rf x")), "--log-dir: ", "newline"),
    ("shards job name", lambda t: _shards(t, "--job-name", "s\nrm -rf x"), "--job-name: ", "newline"),
    ("shards setup line", lambda t: _shards(t, "--setup", "true\r"), "--setup: ", "carriage return"),
    ("shards out", lambda t: ["submit", "shards", str(DEMO_TRAIN), "--out", str(t / "sh\nards"), "--time", "10",
                              "--cpus-per-task", "2"], "--out: ", "newline"),
    ("shards log dir", lambda t: _shards(t, "--log-dir", str(t / "logs\nx")), "--log-dir: ", "newline"),
]


@pytest.mark.parametrize("argv, prefix, name", [case[1:] for case in HOSTILE], ids=[case[0] for case in HOSTILE])
def test_control_character_stops_the_submission_before_sbatch(tmp_path, record, capsys, argv, prefix, name):
    status = main(argv(tmp_path))
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith(f"promoter-dist: error: {prefix}") and err.count("\n") == 1, err
    assert f"control character ({name})" in err
    assert not (record / "calls").exists() and not (record / "scripts").exists()  # sbatch never called
    assert not (tmp_path / "run").exists() and not (tmp_path / "shards").exists()  # no job folder written


@pytest.mark.slow  # 18 s here, most of it inside the submit path
def test_clean_strings_reach_the_script_and_srun_ends_every_task_on_a_failure(tmp_path, record, capsys):
    status = main(_train(tmp_path, "--job-name", "nad train", "--partition", "gpu", "--account", "bio",
                         "--setup", "module load cuda/12.4", "--setup", "export\tA=1",
                         "--slurm-param", "mail-user=me@example.org", "--cpus-per-task", "4", "optim.lr=1e-3"))
    assert status == 0, capsys.readouterr().err
    assert (record / "calls").read_text().count("\n") == 1  # sbatch called once, with the script's path
    script = (record / "scripts").read_text()
    for line in ("#SBATCH --job-name='nad train'", "#SBATCH --partition=gpu", "#SBATCH --account=bio",
                 "#SBATCH --mail-user=me@example.org", "module load cuda/12.4", "export\tA=1"):
        assert f"\n{line}\n" in script, line
    srun = [line for line in script.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1 and " --kill-on-bad-exit=1 " in srun[0] and " --cpus-per-task 4 " in srun[0]
    assert f"--output {tmp_path}/run/slurm/%j/%j_%t_log.out " in srun[0]  # the job folder, from run.out_dir


def test_shards_script_carries_kill_on_bad_exit(tmp_path, record, capsys):
    assert main(_shards(tmp_path)) == 0, capsys.readouterr().err
    srun = [line for line in (record / "scripts").read_text().splitlines() if line.startswith("srun ")]
    assert len(srun) == 1 and " --kill-on-bad-exit=1 " in srun[0]
