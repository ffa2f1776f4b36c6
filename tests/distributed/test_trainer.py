"""`deepspeed train.py` end to end on 2 CPU ranks: outputs, exact resume after SIGKILL, fp32 export.

The runs use GSAM, gradient accumulation, label noise and ZeRO-2, so the resume test covers the
optimizer wrapper's state, the RNG replay of its second pass and the loader position together.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO

from .launch import deepspeed_launcher, free_port, run_deepspeed

# two-rank DeepSpeed runs: the module's run (600 s) and a test's own run (600 s) may fall in one test
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

TRAIN = REPO / "train.py"
STEPS = 14
LOG_EVERY = 3
LOGGED = list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))  # 3, 6, 9, 12


def tiny_args(shards: Path, out: Path, *extra: str) -> list[str]:
    """A tiny NAD model with GSAM on the small real-row shards; a train record every 3 steps (averaging
    them), checkpoints every 4 steps: checkpoint 8 falls inside the window of record 9."""
    return ["--config", str(REPO / "configs" / "nad" / "debug.yaml"), f"run.out_dir={out}", f"data.shards={shards}",
            "data.glove=", "data.batch_size=16", "model.nad.channels=[8,8,16,16,16]", "model.nad.fpn_dim=16",
            "model.nad.heads=2", "model.nad.head_dim=8", f"run.log_every={LOG_EVERY}", "run.checkpoint_every=4",
            "run.eval_every=5", f"run.max_steps={STEPS}", "engine.zero_stage=2", "engine.grad_accum=2",
            "optim.gsam.enabled=true", *extra]


def train_losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


@pytest.fixture(scope="module")
def uninterrupted(small_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_deepspeed(TRAIN, tiny_args(small_shards, out), nprocs=2, timeout=600, cwd=REPO)
    return out


def test_run_folder_holds_config_logs_monitor_plots_and_checkpoints(uninterrupted):
    run = uninterrupted
    assert "zero_stage: 2" in (run / "config.yaml").read_text()
    assert (run / "logs" / "rank0.log").read_text().count("kind=train") == len(LOGGED)
    assert (run / "logs" / "rank1.log").read_text().count("kind=train") == len(LOGGED)  # every rank keeps its own log
    assert list((run / "monitor").rglob("events.out.tfevents*")), "no TensorBoard events"
    assert (run / "monitor" / "csv" / "val_pearson.csv").exists()
    for png in ("curves.png", "val_predicted_vs_measured.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = run / "checkpoints"
    latest = (ckpt / "latest").read_text()
    assert latest == f"step{STEPS:08d}"  # the run's last step is always saved
    assert {p.name for p in ckpt.glob("step*")} == {"step00000012", f"step{STEPS:08d}"}  # keep_checkpoints=2
    assert {p.name for p in (ckpt / latest).glob("trainer-rank*.pt")} == {"trainer-rank0.pt", "trainer-rank1.pt"}
    assert (ckpt / (ckpt / "best").read_text()).is_dir()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in val] == [5, 10, STEPS]  # every run.eval_every steps and at the end
    assert all(-1 <= r["pearson"] <= 1 and -1 <= r["spearman"] <= 1 for r in val)


def test_killed_run_resumes_with_the_same_losses(uninterrupted, small_shards, tmp_path):
    """SIGKILL the whole job after its second checkpoint; the rerun continues to identical losses.

    Resumed from checkpoint 8, record 9 must still average steps 7, 8 and 9: the two steps before the
    checkpoint come from the rank states it saved."""
    out = tmp_path / "run"
    command = [str(deepspeed_launcher()), "--num_gpus", "2", "--master_port", str(free_port()), str(TRAIN),
               *tiny_args(small_shards, out, "run.max_steps=1000")]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:  # kill once step 9 is logged: checkpoint 8 exists, steps 9+ are lost
            metrics = out / "metrics.jsonl"
            if metrics.exists() and any(json.loads(l).get("step", 0) >= 9 for l in metrics.read_text().splitlines()[:-1] or []):
                break
            time.sleep(0.1)
        else:
            pytest.fail("the job never reached step 9")
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    killed_at = max(train_losses(out))
    assert killed_at >= 9
    done = run_deepspeed(TRAIN, tiny_args(small_shards, out), nprocs=2, timeout=600, cwd=REPO)
    assert "resumed from step000000" in done.stdout
    expected, resumed = train_losses(uninterrupted), train_losses(out)
    assert sorted(resumed) == sorted(expected) == LOGGED
    for step in LOGGED:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step


def test_zero_checkpoint_converts_to_plain_fp32_weights(uninterrupted, small_shards):
    """The exported best weights load into a fresh model and reproduce the saved validation predictions."""
    from promoter_dist.checkpointing import fp32_state_dict
    from promoter_dist.config import load_config
    from promoter_dist.data.loader import LoaderConfig, ShardLoader
    from promoter_dist.tasks import build_task

    state = fp32_state_dict(uninterrupted, "best")
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    config = load_config(uninterrupted / "config.yaml")
    task = build_task(config)
    model = task.build_model()
    model.load_state_dict(state, strict=True)
    model.eval()
    loader = ShardLoader(small_shards, LoaderConfig(split="val", view="nad", tokens="nad", batch_size=64,
                                                    shuffle=False, drop_last=False), rank=0, world_size=1)
    lines, preds = [], []
    with torch.no_grad():
        for batch in loader:
            preds.append(task.predict(model, batch).numpy())
            lines.append(batch["line"].numpy())
    saved = np.load(uninterrupted / "best_val_predictions.npz")
    order = np.argsort(np.concatenate(lines))
    saved_order = np.argsort(saved["line"])
    np.testing.assert_array_equal(np.concatenate(lines)[order], saved["line"][saved_order])
    np.testing.assert_allclose(np.concatenate(preds)[order], saved["pred"][saved_order], rtol=1e-4, atol=1e-5)
