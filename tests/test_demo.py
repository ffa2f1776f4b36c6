"""The demo pipeline's steps: data stages end to end, the training plan, and the report of finished runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from promoter_dist import checkpointing
from promoter_dist.data.shards import load_manifest
from promoter_dist.data.synthetic import SynthReport, synthesize
from promoter_dist.demo import (
    REPO_CONFIGS,
    DemoOptions,
    TrainingRun,
    describe_best,
    oracle_on_rows,
    plan_training,
    report,
    run_demo,
)
from promoter_dist.errors import UserError


def options(out: Path, **changes) -> DemoOptions:
    """The command's defaults, scaled down to a test."""
    values = {"out": out, "rows": 1000, "seed": 0, "procs": 0, "models": ("nad", "bert"), "overrides": (),
              "glove_iterations": 1, "progress": False}
    return DemoOptions(**(values | changes))


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> SynthReport:
    """A small synthetic training file with its noise-free values."""
    return synthesize(tmp_path_factory.mktemp("synth") / "train.txt", rows=400, seed=3, workers=1, progress=False)


def fabricate_run(run_dir: Path, best: dict, history: list[dict], lines: np.ndarray | None = None) -> Path:
    """A finished run folder as the trainer leaves it: metrics.jsonl, the best record, the best predictions."""
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    folder = checkpointing.checkpoints_dir(run_dir)
    folder.mkdir()
    tag = f"best-step{best['step']:08d}"
    (folder / checkpointing.BEST).write_text(tag)
    (folder / checkpointing.BEST_RECORD).write_text(json.dumps({"tag": tag, "record": best}))
    if lines is not None:
        np.savez(run_dir / "best_val_predictions.npz", line=lines, pred=np.zeros(len(lines)), y=np.zeros(len(lines)))
    return run_dir


def test_data_stages_print_each_stage_and_stop_without_training(tmp_path, capsys):
    assert run_demo(options(tmp_path / "demo", models=("nonsense",))) == 0  # models are checked only for training
    printed = capsys.readouterr().out.splitlines()
    stages = [line for line in printed if line.startswith("[")]
    assert stages == ["[1/5] synthetic data: 1000 rows, seed 0", "[2/5] shards", "[3/5] verify", "[4/5] GloVe"]
    assert printed[-1].startswith("done in ") and printed[-1].endswith(" s (training skipped: --procs 0)")
    assert any(line.startswith("      OK: 2 shards, 1000 rows") for line in printed)
    glove = json.loads(printed[printed.index("[4/5] GloVe") + 1])
    manifest = load_manifest(tmp_path / "demo" / "shards")
    assert glove["sentences"] == manifest["splits"]["train"]["rows_nad"]  # every NAD-eligible train row, once
    assert (tmp_path / "demo" / "test.txt").is_file() and (tmp_path / "demo" / "glove" / "vectors.w2v.txt").is_file()


def test_plan_trains_nad_legnet_then_bert_pretraining_then_fine_tuning(tmp_path):
    shards, vectors = tmp_path / "shards", tmp_path / "glove" / "vectors.w2v.txt"
    runs = plan_training(options(tmp_path, models=("nad", "legnet", "bert")), shards, vectors)
    assert [run.run_dir.name for run in runs] == ["nad", "legnet", "bert-pretrain", "bert-finetune"]
    assert all(run.config.is_file() and run.config.is_relative_to(REPO_CONFIGS) for run in runs)
    assert runs[0].overrides == (f"data.shards={shards}", f"data.glove={vectors}")
    assert runs[1].overrides == (f"data.shards={shards}",) and runs[1].config == REPO_CONFIGS / "legnet" / "debug.yaml"
    assert runs[3].overrides == (f"data.shards={shards}", f"model.bert.pretrained={runs[2].run_dir / 'export'}")
    assert [run.run_dir.name for run in plan_training(options(tmp_path, models=("bert",)), shards, vectors)] == [
        "bert-pretrain", "bert-finetune"]


def test_plan_names_an_unknown_model(tmp_path):
    with pytest.raises(UserError, match=r"--models: unknown model 'gpt' \(choose from nad, legnet, bert\)"):
        plan_training(options(tmp_path, models=("nad", "gpt")), tmp_path, tmp_path)


def test_report_prints_the_record_the_trainer_kept(tmp_path, synth, capsys):
    lines = np.arange(1, 401, 7, dtype=np.uint32)
    kept = {"kind": "val", "step": 20, "epoch": 0, "loss": 0.5, "pearson": 0.61, "spearman": 0.66}
    # A later record with a higher Pearson whose checkpoint the trainer did not keep (say, best_metric=spearman):
    # the report must not choose again.
    later = {"kind": "val", "step": 40, "epoch": 1, "loss": 0.4, "pearson": 0.7, "spearman": 0.6}
    regression = fabricate_run(tmp_path / "nad", kept, [kept, later], lines)
    masked = {"kind": "val", "step": 30, "epoch": 0, "loss": 0.85, "accuracy": 0.8125, "row_accuracy": 0.396,
              "perplexity": 2.3, "tokens": 100.0}
    mlm = fabricate_run(tmp_path / "pretrain", masked, [masked | {"step": 10, "loss": 0.9}, masked])
    report([TrainingRun("NAD", Path("nad.yaml"), (), regression), TrainingRun("MLM", Path("mlm.yaml"), (), mlm)], synth)
    printed = capsys.readouterr().out.splitlines()
    oracle = oracle_on_rows(Path(synth.path), Path(synth.noise_free_path), lines)
    assert printed == [
        (f"NAD: validation Pearson 0.6100 (Spearman 0.6600) on {len(lines)} rows; oracle Pearson on the same rows "
         f"{oracle:.4f}; ratio {0.61 / oracle:.3f}"),
        "MLM: validation masked-token accuracy 0.8125 (0.3960 on the rows' own tokens), loss 0.8500",
    ]


def test_masked_lm_line_without_row_accuracy(tmp_path, synth):
    best = {"kind": "val", "step": 3, "epoch": 0, "loss": 1.25, "accuracy": 0.5}
    assert describe_best("MLM", best, tmp_path, synth) == "MLM: validation masked-token accuracy 0.5000, loss 1.2500"


def test_oracle_is_the_pearson_of_noise_free_values_with_labels_on_those_lines(synth):
    truth = np.loadtxt(synth.noise_free_path)
    labels = np.array([line.split("\t")[1] for line in Path(synth.path).read_text().splitlines()], dtype=np.float32)
    lines = np.array([1, 5, 9, 100, 222, 400])
    expected = np.corrcoef(truth[lines - 1], labels[lines - 1].astype(np.float64))[0, 1]  # the reader keeps float32
    assert oracle_on_rows(Path(synth.path), Path(synth.noise_free_path), lines) == pytest.approx(expected, abs=1e-9)


def test_report_of_a_run_without_a_best_record_names_the_file(tmp_path, synth):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"kind": "val", "step": 1, "epoch": 0, "loss": 1.0}) + "\n")
    with pytest.raises(UserError, match="best.json"):
        report([TrainingRun("NAD", Path("nad.yaml"), (), run_dir)], synth)
