"""BERT end to end under the real ``deepspeed`` launcher (2 CPU ranks): masked-LM pretraining,
its Hugging Face export, and regression fine-tuning from that export, under every ZeRO stage.

One launch covers everything: launcher and DeepSpeed start-up cost 20-30 s here, so this file,
started as a script by the launcher, runs a list of trainings one after another in the same
process group, each through the training entry point ``promoter_dist.train.main`` exactly as
``deepspeed train.py --config ... key=value ...`` calls it. Four pretrain -> fine-tune pairs put
each task under each ZeRO stage once, and every fine-tuning starts from an export written under a
different stage: pretrain under stage s, fine-tune under stage s + 1 (mod 4). With the same seed,
data and steps, the four stages must also agree on each task's validation loss.

Start-from-pretrained check
    A fine-tuning of ``k`` steps with Adam moves no weight by more than about ``k * lr`` (Adam's
    per-element step is ``lr * m / sqrt(v)``, at most ``lr`` in the first steps whatever the
    gradients), so the fine-tuned encoder must lie within that bound of the pretrained export,
    while the random initialisation the same run would have had without ``model.bert.pretrained``
    (same seed) must lie far outside it. Fine-tuning runs at 1e-5 so that the bound is tight.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pytest

# the module's two-rank DeepSpeed run may take its whole 600 s in the first test's setup
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = REPO / "configs" / "bert" / "pretrain_debug.yaml"
FINETUNE = REPO / "configs" / "bert" / "finetune_debug.yaml"
TINY = ["model.bert.hidden=32", "model.bert.layers=2", "model.bert.heads=2", "model.bert.intermediate=64"]
COMMON = ["data.batch_size=16", "data.eval_batch_size=256", "data.shuffle_buffer=512", "run.log_every=1",
          "run.checkpoint_every=0", "run.plots=false", "engine.tensorboard=false", "engine.csv=false"]
PRETRAIN_STEPS, PRETRAIN_LR = 4, 5e-3
FINETUNE_STEPS, FINETUNE_LR = 3, 1e-5
STAGES = (0, 1, 2, 3)  # pretraining stage s; its fine-tuning runs under (s + 1) % 4
ADAM_STEP_BOUND = 1.05  # |per-element Adam step| / lr in the first few steps (1.0 plus rounding slack)


def pretrain_args(shards: Path, out: Path, stage: int) -> list[str]:
    """A few masked-LM steps of the tiny BERT on the top view, validated and exported at the end."""
    return ["--config", str(PRETRAIN), f"data.shards={shards}", f"run.out_dir={out}", *TINY, *COMMON,
            f"run.max_steps={PRETRAIN_STEPS}", f"optim.lr={PRETRAIN_LR}", f"engine.zero_stage={stage}"]


def finetune_args(shards: Path, out: Path, pretrained: Path, stage: int) -> list[str]:
    """A few regression steps from ``pretrained`` at a small rate (see the module docstring)."""
    return ["--config", str(FINETUNE), f"data.shards={shards}", f"run.out_dir={out}", *TINY, *COMMON,
            f"model.bert.pretrained={pretrained}", f"run.max_steps={FINETUNE_STEPS}", f"optim.lr={FINETUNE_LR}",
            f"engine.zero_stage={stage}"]


def plan(shards: Path, root: Path) -> list[dict[str, Any]]:
    """The trainings of the one launch, in order: each pretraining precedes the fine-tuning from it."""
    runs = []
    for stage in STAGES:
        pre = root / f"pretrain-z{stage}"
        fine = root / f"finetune-z{(stage + 1) % 4}-from-z{stage}"
        runs.append({"task": "mlm", "stage": stage, "out": str(pre), "args": pretrain_args(shards, pre, stage)})
        runs.append({"task": "regression", "stage": (stage + 1) % 4, "out": str(fine), "pretrained": str(pre / "export"),
                     "args": finetune_args(shards, fine, pre / "export", (stage + 1) % 4)})
    return runs


def records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def trained(small_shards, tmp_path_factory) -> list[dict[str, Any]]:
    """All trainings of :func:`plan` in one 2-rank deepspeed launch; returns the plan."""
    from .launch import run_deepspeed

    root = tmp_path_factory.mktemp("bert")
    runs = plan(small_shards, root)
    plan_file = root / "plan.json"
    plan_file.write_text(json.dumps(runs))
    done = run_deepspeed(Path(__file__), ["--plan", str(plan_file)], nprocs=2, timeout=600, cwd=REPO)
    assert done.stdout.count("finished:") == len(runs), done.stdout[-3000:]
    return runs


def pretrainings(trained: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in trained if r["task"] == "mlm"]


def finetunings(trained: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in trained if r["task"] == "regression"]


def test_every_zero_stage_ran_both_tasks(trained):
    assert sorted(r["stage"] for r in pretrainings(trained)) == [0, 1, 2, 3]
    assert sorted(r["stage"] for r in finetunings(trained)) == [0, 1, 2, 3]
    for run in trained:
        config = (Path(run["out"]) / "config.yaml").read_text()
        assert f"zero_stage: {run['stage']}" in config
        assert f"name: {run['task']}" in config
        steps = PRETRAIN_STEPS if run["task"] == "mlm" else FINETUNE_STEPS
        assert [r["step"] for r in records(Path(run["out"])) if r["kind"] == "train"] == list(range(1, steps + 1))


def test_zero_stages_compute_the_same_training(trained):
    """Same seed, data and steps: every stage reaches the same validation loss (up to reduction order)."""
    for runs in (pretrainings(trained), finetunings(trained)):
        losses = [[r["loss"] for r in records(Path(run["out"])) if r["kind"] == "val"][-1] for run in runs]
        assert losses == pytest.approx([losses[0]] * len(losses), rel=1e-4), losses


def test_pretraining_records_masked_token_accuracy_and_learns(trained):
    for run in pretrainings(trained):
        history = records(Path(run["out"]))
        val = [r for r in history if r["kind"] == "val"]
        assert [r["step"] for r in val] == [PRETRAIN_STEPS], run["out"]
        assert 0.0 <= val[-1]["accuracy"] <= 1.0 and val[-1]["tokens"] > 0
        losses = [r["loss"] for r in history if r["kind"] == "train"]
        assert losses[-1] < losses[0], (run["out"], losses)  # 4 steps at 5e-3 already lower the masked-LM loss


def test_pretraining_export_reloads_with_auto_classes(trained):
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    for run in pretrainings(trained):
        export = Path(run["out"]) / "export"
        tokenizer = AutoTokenizer.from_pretrained(export)
        model = AutoModelForMaskedLM.from_pretrained(export).eval()
        assert type(model).__name__ == "BertForMaskedLM" and model.config.hidden_size == 32
        encoded = tokenizer(["ACG" * 40], return_tensors="pt")
        with torch.no_grad():
            logits = model(**encoded).logits
        assert logits.shape == (1, encoded["input_ids"].shape[1], tokenizer.vocab_size)
        assert torch.isfinite(logits).all()


def test_finetuning_records_pearson_and_exports_a_sequence_regressor(trained):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    for run in finetunings(trained):
        val = [r for r in records(Path(run["out"])) if r["kind"] == "val"]
        assert [r["step"] for r in val] == [FINETUNE_STEPS]
        assert -1.0 <= val[-1]["pearson"] <= 1.0 and val[-1]["rows"] > 0
        export = Path(run["out"]) / "export"
        tokenizer = AutoTokenizer.from_pretrained(export)
        model = AutoModelForSequenceClassification.from_pretrained(export).eval()
        assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 1
        with torch.no_grad():
            out = model(**tokenizer(["ACGT" * 30, "TTAC" * 25], padding=True, return_tensors="pt")).logits
        assert out.shape == (2, 1) and torch.isfinite(out).all()


def encoder_weights(model: Any) -> dict[str, Any]:
    """Embeddings and encoder layers (``bert.*`` without the pooler), shared by the MLM and regression models."""
    return {k: v.detach().float() for k, v in model.state_dict().items()
            if k.startswith(("bert.embeddings.", "bert.encoder.")) and not k.endswith("position_ids")}


def largest_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_finetuning_starts_from_the_pretrained_encoder(trained):
    import torch
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

    from promoter_dist.config import load_config
    from promoter_dist.models.bert import build_regression_model

    bound = FINETUNE_STEPS * FINETUNE_LR * ADAM_STEP_BOUND
    for run in finetunings(trained):
        pretrained = encoder_weights(AutoModelForMaskedLM.from_pretrained(run["pretrained"]))
        tuned = encoder_weights(AutoModelForSequenceClassification.from_pretrained(Path(run["out"]) / "export"))
        moved = largest_difference(tuned, pretrained)
        assert 0 < moved <= bound, (run["out"], moved, bound)
        # The random start this fine-tuning would have had without model.bert.pretrained (same seed).
        config = load_config(Path(run["out"]) / "config.yaml", ["model.bert.pretrained="])
        torch.manual_seed(config.run.seed)
        fresh = encoder_weights(build_regression_model(config.model.bert))
        assert largest_difference(tuned, fresh) > 100 * bound, run["out"]


# ------------------------------------------------------------------------------------------ driver


def main(argv: list[str] | None = None) -> int:
    """Launcher entry: run the plan's trainings in order through ``promoter_dist.train.main``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", required=True, help="JSON list of {'args': [...], ...} written by the test")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None)
    args = parser.parse_args(argv)
    from promoter_dist.train import main as train_main

    rank_arg = [] if args.local_rank is None else [f"--local_rank={args.local_rank}"]
    for run in json.loads(Path(args.plan).read_text()):
        status = train_main([*rank_arg, *run["args"]])
        if status != 0:
            return status
    return 0


if __name__ == "__main__":  # started by the deepspeed launcher from the `trained` fixture
    sys.exit(main())
