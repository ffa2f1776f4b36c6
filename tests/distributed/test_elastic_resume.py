"""Elastic resume with the real DeepSpeed launcher on CPU ranks: one run, three shapes, the same losses.

Per ZeRO stage, a reference run on 2 ranks x 1 micro batch goes to step 9. An elastic run of the same
config starts on 1 rank with 2 accumulation steps (the same global batch of 32 rows, the same micro
batches of 16), is stopped at step 3, resumed on 2 ranks x 1 to step 6, and resumed on 1 rank x 2 to step
9. Every step's training loss must match the reference's: the same rows make each global batch (the
loader's global order), the same random draws make each micro batch's loss (keyed by step and micro
batch position), and the weights, optimizer state, GSAM state and BatchNorm statistics carry over (ZeRO
1-3 through a universal checkpoint).

Tolerance: relative 2e-4. The shapes compute the same sums in another order: the gradient is an
all-reduce average over 2 ranks in one, an accumulation over 2 micro batches in the other, and one rank
alone runs its matmuls on 2 threads instead of 1. Those float32 rounding differences (about 1e-7) pass
through Adam's normalised updates step after step; the measured gap after 9 steps is reported in
the assertion message.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO

from .launch import DeepSpeedRunError, run_deepspeed

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

TRAIN = REPO / "train.py"
STEPS, FIRST_STOP, SECOND_STOP = 9, 3, 6
TOLERANCE = 2e-4


def args(shards: Path, out: Path, stage: int, ranks: int, steps: int, *extra: str) -> list[str]:
    """A tiny NAD model (BatchNorm, dropout, label noise) on the small real-row shards; global batch 32."""
    accum = 2 // ranks
    return ["--config", str(REPO / "configs" / "nad" / "debug.yaml"), f"run.out_dir={out}", f"data.shards={shards}",
            "data.glove=", "data.batch_size=16", f"engine.grad_accum={accum}", f"engine.zero_stage={stage}",
            "model.nad.channels=[8,8,16,16,16]", "model.nad.fpn_dim=16", "model.nad.heads=2", "model.nad.head_dim=8",
            "run.log_every=1", "run.checkpoint_every=0", "run.eval_every=0", "run.plots=false",
            "engine.tensorboard=false", "engine.csv=false", f"run.max_steps={steps}", *extra]


def train_losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


@pytest.mark.parametrize("stage,extra", [(0, ()), (2, ("optim.gsam.enabled=true",)), (3, ())],
                         ids=["zero0", "zero2-gsam", "zero3"])
def test_a_run_moves_between_one_and_two_ranks_with_the_same_losses(small_shards, tmp_path, stage, extra):
    reference = tmp_path / "reference"
    run_deepspeed(TRAIN, args(small_shards, reference, stage, 2, STEPS, *extra), nprocs=2, timeout=600, cwd=REPO)
    elastic = tmp_path / "elastic"
    run_deepspeed(TRAIN, args(small_shards, elastic, stage, 1, FIRST_STOP, *extra), nprocs=1, timeout=600, cwd=REPO)
    grown = run_deepspeed(TRAIN, args(small_shards, elastic, stage, 2, SECOND_STOP, *extra), nprocs=2, timeout=600,
                          cwd=REPO)
    assert f"resumed from step{FIRST_STOP:08d}" in grown.stdout + grown.stderr
    shrunk = run_deepspeed(TRAIN, args(small_shards, elastic, stage, 1, STEPS, *extra), nprocs=1, timeout=600,
                           cwd=REPO)
    assert f"resumed from step{SECOND_STOP:08d}" in shrunk.stdout + shrunk.stderr
    if stage > 0:  # ZeRO partitions were converted once per checkpoint that changed shape
        assert (elastic / "checkpoints" / f"step{SECOND_STOP:08d}" / "universal" / "zero").is_dir()
    expected, got = train_losses(reference), train_losses(elastic)
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    gaps = {step: abs(got[step] - expected[step]) / abs(expected[step]) for step in expected}
    assert max(gaps.values()) <= TOLERANCE, gaps


def test_a_shape_that_changes_the_global_batch_is_refused_with_the_settings_that_keep_it(small_shards, tmp_path):
    run = tmp_path / "run"
    run_deepspeed(TRAIN, args(small_shards, run, 0, 2, 2), nprocs=2, timeout=600, cwd=REPO)
    with pytest.raises(DeepSpeedRunError) as caught:  # 1 rank x 1 x 16 = 16, not 32
        run_deepspeed(TRAIN, args(small_shards, run, 0, 2, 4)[:-1] + ["run.max_steps=4"], nprocs=1, timeout=600,
                      cwd=REPO)
    message = str(caught.value)
    assert "keeps its global batch of 32" in message, message[-3000:]
    assert "on 1 rank(s) set data.batch_size=32 or engine.grad_accum=2" in message, message[-3000:]
