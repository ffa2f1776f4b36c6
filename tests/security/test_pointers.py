"""Checkpoint pointer files (``latest``, ``best``) that hold something other than a tag.

A pointer may come from another user; a path in it would lead ``predict``, ``export`` or a
resume to a checkpoint folder outside the run. Each is refused with one line naming the
pointer file, before any checkpoint is read.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from promoter_dist.checkpointing import CheckpointManager, TrainShape, checkpoint_tag
from promoter_dist.cli import main
from promoter_dist.config import dump_yaml, load_config
from promoter_dist.errors import UserError
from tests.conftest import TEST_LABELLED
from tests.security.messages import one_error_line

HOSTILE = {
    "parent": b"../../elsewhere",
    "absolute": b"/etc",
    "slash": b"step00000002/../../x",
    "newline": b"step00000002\nstep00000004",
    "nul": b"step00000002\x00",
    "long": b"step" + b"0" * 200,
    "empty": b"",
    "not_ascii": "step0000000\u0662".encode(),
}


def run_with_pointer(tmp_path: Path, name: str, content: bytes) -> Path:
    """A run folder (a real resolved config) whose pointer ``name`` holds ``content``; a real tag
    folder sits outside the run, where the hostile pointers lead."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_yaml(load_config()))
    (tmp_path / "elsewhere").mkdir()
    (run / "checkpoints" / name).write_bytes(content)
    return run


@pytest.mark.parametrize("content", HOSTILE.values(), ids=HOSTILE.keys())
@pytest.mark.parametrize("which", ["latest", "best"])
def test_predict_refuses_a_pointer_that_is_not_a_tag(tmp_path, capsys, content, which):
    run = run_with_pointer(tmp_path, which, content)
    out = tmp_path / "sub.json"
    assert main(["predict", "--checkpoint", str(run), "--which", which, "--input", str(TEST_LABELLED),
                 "--out", str(out), "--no-progress"]) == 2
    one_error_line(capsys, str(run / "checkpoints" / which), "not a checkpoint pointer")
    assert not out.exists()


@pytest.mark.parametrize("content", [HOSTILE["parent"], HOSTILE["newline"], HOSTILE["long"]],
                         ids=["parent", "newline", "long"])
def test_export_refuses_a_pointer_that_is_not_a_tag(tmp_path, capsys, content):
    run = run_with_pointer(tmp_path, "best", content)
    out = tmp_path / "model.safetensors"
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 2
    one_error_line(capsys, str(run / "checkpoints" / "best"), "not a checkpoint pointer")
    assert not out.exists()


def test_resume_refuses_a_latest_pointer_that_is_not_a_tag(tmp_path):
    run = run_with_pointer(tmp_path, "latest", HOSTILE["parent"])
    manager = CheckpointManager(run, rank=0, shape=TrainShape(1, 1, 8, 0), keep=2)
    # The pointer is read before the engine is touched: no engine is needed to see the refusal.
    with pytest.raises(UserError, match=r"checkpoints/latest: not a checkpoint pointer") as caught:
        manager.resume(engine=None, config={})
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("tag", ["step00000002", "best-step00001200", "step123456789"])
def test_the_tags_the_manager_writes_are_read_back(tmp_path, tag):
    run = run_with_pointer(tmp_path, "latest", f"{tag}\n".encode())
    assert checkpoint_tag(run, "latest") == tag
