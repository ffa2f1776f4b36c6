"""A checkpoint written by one process with a real DeepSpeed engine (ZeRO-0, CPU, tiny BERT).

- Every file of the checkpoint and its folder reach the disk (fsync) before ``latest`` moves.
- The end-of-run export rebuilds the task's model from the checkpoint and writes its portable form.
- The best checkpoint's validation predictions are written beside the run's records.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from promoter_dist.checkpointing import (
    CheckpointManager,
    TrainShape,
    checkpoints_dir,
    export_for_task,
)
from promoter_dist.config import load_config
from promoter_dist.records import (
    BEST_PREDICTIONS,
    BEST_PREDICTIONS_PLOT,
    write_best_predictions,
)
from tests.conftest import REPO

TINY_BERT = ["model.bert.pretrained=", "model.bert.hidden=16", "model.bert.layers=1", "model.bert.heads=2", "model.bert.intermediate=32",
             "engine.zero_stage=0", "engine.tensorboard=false", "engine.csv=false", "data.batch_size=4",
             "run.plots=false"]


@pytest.fixture(scope="module")
def bert_engine(lone_process_group):
    """A ZeRO-0 engine of a tiny BERT regressor on CPU, and its task."""
    from promoter_dist.engine import build_engine
    from promoter_dist.tasks import build_task

    config = load_config(REPO / "configs" / "bert" / "finetune_debug.yaml", TINY_BERT)
    task = build_task(config)
    torch.manual_seed(0)
    engine = build_engine(task.build_model(), config, world_size=1, device=torch.device("cpu"))
    return engine, task


def path_of(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def test_every_checkpoint_file_and_its_folder_are_fsynced_before_latest_moves(bert_engine, tmp_path, monkeypatch):
    engine, _ = bert_engine
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", path_of(fd)))
        real_fsync(fd)

    def replace(src, dst, **kwargs) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    manager = CheckpointManager(tmp_path, rank=0, shape=TrainShape(1, 1, 4, 0), keep=2)
    tag = manager.save(engine, step=3, trainer_state={"step": 3}, rank_state={"position": 0})
    monkeypatch.undo()

    folder = checkpoints_dir(tmp_path) / tag
    latest = str(checkpoints_dir(tmp_path) / "latest")
    moved = events.index(("replace", latest))
    synced_before = {path for kind, path in events[:moved] if kind == "fsync"}
    files = sorted(str(p) for p in folder.iterdir() if p.is_file())
    assert any(name.endswith("model_states.pt") for name in files), files  # DeepSpeed's own files are there
    assert set(files) <= synced_before, sorted(set(files) - synced_before)
    assert str(folder) in synced_before
    assert (checkpoints_dir(tmp_path) / "latest").read_text() == tag


def test_the_end_of_run_export_rebuilds_the_model_from_the_checkpoint(bert_engine, tmp_path):
    from transformers import AutoModelForSequenceClassification

    engine, task = bert_engine
    assert export_for_task(tmp_path, task, tmp_path / "export") is None  # no checkpoint yet: nothing
    CheckpointManager(tmp_path, rank=0, shape=TrainShape(1, 1, 4, 0), keep=2).save(
        engine, step=1, trainer_state={"step": 1}, rank_state={})
    assert export_for_task(tmp_path, task, tmp_path / "export") == "latest"
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export")
    saved = {k.removeprefix("module."): v for k, v in engine.module.state_dict().items()}
    compared = [name for name in exported.state_dict() if name in saved]
    assert len(compared) >= len(saved) - 2, sorted(set(saved) - set(compared))  # the same model, weight by weight
    for name in compared:
        assert torch.equal(exported.state_dict()[name], saved[name].float()), name
    assert (tmp_path / "export" / "model.safetensors").is_file()


def test_best_predictions_are_written_with_their_plot(tmp_path):
    outputs = {"pred": np.array([0.5, 1.0, 2.0], np.float32), "y": np.array([0.0, 1.0, 3.0], np.float32),
               "line": np.array([4, 9, 2])}
    write_best_predictions(tmp_path, outputs, step=7, plot=True)
    saved = np.load(tmp_path / BEST_PREDICTIONS)
    assert {k: saved[k].tolist() for k in saved.files} == {k: v.tolist() for k, v in outputs.items()}
    assert (tmp_path / BEST_PREDICTIONS_PLOT).stat().st_size > 0
    # Outputs without predictions (masked-LM runs) leave nothing.
    write_best_predictions(tmp_path / "mlm", {"accuracy": np.ones(2)}, step=7, plot=True)
    assert not (tmp_path / "mlm").exists()
