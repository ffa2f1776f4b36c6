"""LegNet through the engine on 2 CPU ranks, one DeepSpeed launch (legnet_worker.py): ZeRO stages 0-3 against
one process, bf16 and Lion, then the trainer at ZeRO-3 with GSAM and the one-cycle schedule, resumed exactly;
its ZeRO-3 checkpoint exported to fp32 weights and used by ``predict``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import DEMO_TRAIN

from .launch import run_deepspeed

# one two-rank launch of about a minute or two; its fixture may take the whole 600 s on a busy machine
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

WORKER = Path(__file__).with_name("legnet_worker.py")


@pytest.fixture(scope="module")
def results(small_shards, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("legnet")
    out = work / "results.json"
    run_deepspeed(WORKER, ["--shards", str(small_shards), "--work", str(work), "--out", str(out)], nprocs=2,
                  timeout=600)
    return {**json.loads(out.read_text()), "work": work}


def records(run: Path, kind: str) -> dict[int, dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if r["kind"] == kind}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_fp32_zero_stages_match_one_process(results, stage):
    case = results["cases"][f"stage{stage}_fp32_adamw"]
    assert results["world_size"] == 2
    assert case["median_param_change"] > 1e-3  # the weights moved
    assert case["max_abs_diff"] < 2e-6, case  # every stage is the same optimisation, to float rounding


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_close_to_fp32_reference(results, stage):
    case = results["cases"][f"stage{stage}_bf16_adamw"]
    assert 0 < case["relative_diff"] < 0.2, case  # bf16 compute: close, never exact
    assert results["cases"][f"stage{stage}_fp32_adamw"]["relative_diff"] < 1e-4


@pytest.mark.parametrize("stage", [1, 3])
def test_lion_matches_one_process(results, stage):
    case = results["cases"][f"stage{stage}_fp32_lion"]
    assert case["median_param_change"] > 1e-3
    assert case["max_abs_diff"] < 2e-6, case


def test_resumed_trainer_gives_the_same_losses_and_validation(results):
    straight, resumed = results["work"] / "straight", results["work"] / "resumed"
    assert results["straight"]["steps"] == results["second_half"]["steps"] == 8
    assert results["first_half"]["steps"] == 4
    expected, got = records(straight, "train"), records(resumed, "train")
    assert sorted(expected) == sorted(got) == list(range(1, 9))
    for step in expected:
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-6, abs=1e-7), step
        assert got[step]["lr"] == pytest.approx(expected[step]["lr"], rel=1e-12)
    val_expected, val_got = records(straight, "val"), records(resumed, "val")
    assert sorted(val_expected) == sorted(val_got) == [4, 8]
    for step in (4, 8):
        for key in ("loss", "pearson", "spearman"):
            assert val_got[step][key] == pytest.approx(val_expected[step][key], rel=1e-6), (step, key)
    assert "resumed from step00000004" in (resumed / "logs" / "rank0.log").read_text()


def test_zero3_checkpoint_exports_and_predicts_what_validation_saw(results):
    """fp32 weights of the ZeRO-3 best checkpoint, through ``promoter-dist predict``'s path, give the saved
    validation predictions (window encoding, singleton 0, both orientations averaged) for those rows."""
    from promoter_dist.checkpointing import fp32_state_dict
    from promoter_dist.predict import predict_file
    from promoter_dist.config import load_config
    from promoter_dist.tasks import build_task

    run = results["work"] / "straight"
    state = fp32_state_dict(run, "best")
    model = build_task(load_config(run / "config.yaml")).build_model()
    model.load_state_dict(state, strict=True)  # plain fp32 weights of every parameter and statistic
    predictions = predict_file(run, DEMO_TRAIN, which="best", batch_size=512, device="cpu")
    assert predictions.shape == (len(DEMO_TRAIN.read_text().splitlines()),) and np.isfinite(predictions).all()
    saved = np.load(run / "best_val_predictions.npz")
    np.testing.assert_allclose(predictions[saved["line"].astype(np.int64) - 1], saved["pred"], rtol=1e-4, atol=1e-4)
    assert torch.isfinite(torch.as_tensor(predictions)).all() and predictions.std() > 0
