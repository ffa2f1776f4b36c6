"""``promoter-dist predict`` / ``export`` on a tiny NAD run trained here on the real demo rows.

The run is trained once per module by ``python train.py`` in a subprocess (one process,
no launcher: the test process stays free of a process group), at a size that predicts
the 2,999 sample test rows in a few seconds on a CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from promoter_dist.cli import main
from promoter_dist.data.alphabet import ADAPTER_3P, ADAPTER_5P, encode
from promoter_dist.data.dream import ReadOptions, read_dream
from promoter_dist.data.kmer_tokenizer import UPSTREAM_FLANK, encode_codes, encode_for_model
from promoter_dist.data.nad_words import words_from_codes
from promoter_dist.errors import InputError, UserError
from promoter_dist.metrics import rankdata
from promoter_dist.predict import (
    RowBatch,
    RowEncoder,
    fit_nominal,
    load_trained,
    predict_file,
    predict_with_model,
    resolve_device,
)

# most tests use the run trained once per module by train.py
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "dream2022" / "samples"
TEST_LABELLED = SAMPLES / "test_labelled_first2999.txt"
PUBLIC = REPO / "data" / "dream2022" / "public_leaderboard"
TEST_SUBSETS = REPO / "data" / "dream2022" / "test_subsets"
ROWS = 2999


def tiny_run_overrides(shards: Path, out: Path) -> list[str]:
    """configs/nad/debug.yaml shrunk to 14k parameters: checkpoints at steps 3 and 6, the best one at step 6."""
    return [f"run.out_dir={out}", f"data.shards={shards}", "data.glove=", "data.batch_size=32",
            "data.shuffle_buffer=512", "data.eval_batch_size=512", "model.nad.embed_dim=16",
            "model.nad.channels=[8,8,16,16,16]", "model.nad.fpn_dim=16", "model.nad.heads=2", "model.nad.head_dim=8",
            "model.nad.depths=[1,1,1,1]", "model.nad.residual_blocks=0", "model.nad.ff_mult=1", "run.max_steps=6",
            "run.eval_every=6", "run.checkpoint_every=3", "run.log_every=3", "run.plots=false",
            "engine.tensorboard=false", "engine.csv=false"]


def train_tiny_run(shards: Path, out: Path) -> Path:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/nad/debug.yaml"),
                           *tiny_run_overrides(shards, out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (out / "checkpoints" / "best").is_file() and (out / "checkpoints" / "latest").is_file()
    return out


@pytest.fixture(scope="module")
def run_dir(small_shards, tmp_path_factory) -> Path:
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return train_tiny_run(small_shards, tmp_path_factory.mktemp("predict") / "run")
    # Under pytest-xdist the workers of one session share the parent of their temp folders:
    # the first to get there trains, the others reuse its run (training is the slow part).
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent
    out = root / "predict_run"
    with FileLock(str(root / "predict_run.lock")):
        if not (out / "trained").is_file():
            train_tiny_run(small_shards, out)
            (out / "trained").write_text("ok\n")
    return out


@pytest.fixture(scope="module")
def submission(run_dir, tmp_path_factory) -> dict[str, float]:
    """The raw submission of the whole sample test file, written through the command."""
    out = tmp_path_factory.mktemp("submission") / "sub" / "submission.json"  # parent made by the writer
    assert main(["predict", "--checkpoint", str(run_dir), "--input", str(TEST_LABELLED), "--out", str(out),
                 "--device", "cpu", "--no-progress"]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def trained(run_dir):
    return load_trained(run_dir, "best", "cpu")


def write_rows(path: Path, sequences: list[str]) -> Path:
    path.write_text("".join(f"{s}\t\n" for s in sequences))
    return path


def sample_sequences(n: int) -> list[str]:
    return [line.split("\t")[0] for line in TEST_LABELLED.read_text().splitlines()[:n]]


# --------------------------------------------------------------------------- the submission


def test_submission_has_a_finite_value_for_every_line(submission):
    assert list(submission) == [str(i) for i in range(ROWS)]
    values = np.array(list(submission.values()))
    assert np.isfinite(values).all()
    assert values.std() > 0  # a trained model does not predict a constant


def test_predictions_equal_the_models_own_outputs(submission, trained):
    task, model, _ = trained
    rows, _ = read_dream(TEST_LABELLED, ReadOptions(labels="optional", workers=0))
    assert len(rows) == ROWS and (rows.lines == np.arange(1, ROWS + 1)).all()
    picked = np.r_[0:100, 1500:1600, ROWS - 100:ROWS]  # rows from the first, a middle and the last batch
    words = torch.from_numpy(words_from_codes(rows.codes[picked]).astype(np.int64))
    with torch.no_grad():
        direct = task.predict(model, {"words": words}).numpy()
    predicted = np.array([submission[str(i)] for i in picked])
    np.testing.assert_allclose(predicted, direct, rtol=1e-5, atol=1e-5)


def test_rank_mode_gives_ranks_over_n_consistent_with_raw(run_dir, submission, tmp_path, capsys):
    head = tmp_path / "head300.txt"
    head.write_text("".join(TEST_LABELLED.read_text().splitlines(keepends=True)[:300]))
    out = tmp_path / "rank.json"
    assert main(["predict", "--checkpoint", str(run_dir), "--input", str(head), "--out", str(out), "--rank",
                 "--batch-size", "64", "--no-progress"]) == 0
    assert "wrote 300 predictions (rank)" in capsys.readouterr().out
    ranks = json.loads(out.read_text())
    assert list(ranks) == [str(i) for i in range(300)]
    values = np.array(list(ranks.values()))
    assert values.min() > 0 and values.max() == 1.0
    raw = np.array([submission[str(i)] for i in range(300)])  # each row's prediction does not depend on the others
    np.testing.assert_allclose(values, rankdata(raw) / 300, atol=1e-6)


def test_batch_size_does_not_change_the_predictions(trained, submission, tmp_path):
    task, model, config = trained
    head = write_rows(tmp_path / "head.txt", sample_sequences(40))
    values = predict_with_model(task, model, config, head, batch_size=16)  # 2 full batches and a short one
    np.testing.assert_allclose(values, [submission[str(i)] for i in range(40)], rtol=1e-5, atol=1e-5)
    bf16 = predict_with_model(task, model, config, head, precision="bf16")  # autocast works on a CPU too
    assert np.isfinite(bf16).all() and np.abs(bf16 - values).max() < 0.05 * np.abs(values).max()


def test_scoring_the_submission(run_dir, submission, tmp_path, capsys):
    path = tmp_path / "submission.json"
    path.write_text(json.dumps(submission))
    # The public leaderboard scores 9,045 rows up to row 71,102: a 2,999-row submission misses most.
    assert main(["score", "--predictions", str(path), "--truth-dir", str(PUBLIC)]) == 2
    err = capsys.readouterr().err
    assert "promoter-dist: error:" in err and "have no prediction" in err and "of the 9045 rows scored" in err
    # Against the labelled sample itself every row is scored (a partial score: the subsets it holds).
    assert main(["score", "--predictions", str(path), "--test-file", str(TEST_LABELLED),
                 "--subsets-dir", str(TEST_SUBSETS)]) == 0
    out = capsys.readouterr().out
    assert f"({ROWS} keys, 0 ignored)" in out and "PARTIAL" in out


# --------------------------------------------------------------------------- rows the model cannot take


def test_invalid_base_is_an_error_naming_file_and_line(run_dir, trained, tmp_path, capsys):
    task, model, config = trained
    sequences = sample_sequences(4)
    sequences[2] = sequences[2][:50] + "X" + sequences[2][51:]
    bad = write_rows(tmp_path / "bad.txt", sequences)
    with pytest.raises(InputError, match=rf"{bad}:3 \[sequence\]: invalid base 'X' at position 51"):
        predict_with_model(task, model, config, bad)
    out = tmp_path / "never.json"
    assert main(["predict", "--checkpoint", str(run_dir), "--input", str(bad), "--out", str(out),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"promoter-dist: error: {bad}:3 [sequence]: invalid base" in err and "Traceback" not in err
    assert not out.exists()


def test_nad_refuses_other_lengths_unless_padded(trained, tmp_path):
    task, model, config = trained
    seq = sample_sequences(1)[0]
    short = seq[:60] + seq[70:]  # 100 bp, adapters intact
    long = seq[:60] + "ACGTACGTAC" + seq[60:]  # 120 bp
    mixed = write_rows(tmp_path / "mixed.txt", [seq, short, long])
    with pytest.raises(InputError, match=rf"{mixed}:2 \[sequence\]: sequence of 100 bp: NAD's model takes exactly "
                                         r"110 bp .*--pad"):
        predict_with_model(task, model, config, mixed)
    padded = predict_with_model(task, model, config, mixed, pad=True)
    # --pad is the same as fitting the rows by hand: vector bases before a short row, a long row's 3' 110 bp.
    fitted = [seq, UPSTREAM_FLANK[-10:] + short, long[-110:]]
    expected = predict_with_model(task, model, config, write_rows(tmp_path / "fitted.txt", fitted))
    np.testing.assert_allclose(padded, expected, rtol=1e-6, atol=1e-6)
    with_n = write_rows(tmp_path / "n.txt", [seq, seq[:40] + "N" + seq[41:]])
    with pytest.raises(InputError, match=rf"{with_n}:2 \[sequence\]: sequence contains N"):
        predict_with_model(task, model, config, with_n, pad=True)


def test_fit_nominal_keeps_the_3prime_end_and_prepends_vector_sequence():
    random = "ACGT" * 20
    rows = [ADAPTER_5P + random + ADAPTER_3P, ADAPTER_5P + random[:75] + ADAPTER_3P,
            "GG" + ADAPTER_5P + random + ADAPTER_3P]
    codes = np.full((3, 112), 5, np.uint8)
    for i, row in enumerate(rows):
        codes[i, : len(row)] = encode(row)
    fitted = fit_nominal(codes, np.array([len(r) for r in rows]))
    assert fitted.shape == (3, 110)
    assert (fitted[0] == encode(rows[0])).all()
    assert (fitted[1] == encode(UPSTREAM_FLANK[-5:] + rows[1])).all()
    assert (fitted[2] == encode(rows[2][-110:])).all()


def test_empty_and_missing_inputs(trained, tmp_path):
    task, model, config = trained
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(InputError, match="empty"):
        predict_with_model(task, model, config, empty)
    with pytest.raises(UserError, match="no such file"):
        predict_with_model(task, model, config, tmp_path / "absent.txt")
    with pytest.raises(UserError, match="batch size"):
        predict_with_model(task, model, config, TEST_LABELLED, batch_size=0)


def test_bert_rows_are_encoded_like_the_loader_and_too_long_rows_refused(tmp_path):
    from promoter_dist.config import load_config

    config = load_config(REPO / "configs" / "bert" / "finetune_debug.yaml",
                         ["model.bert.pretrained=", "model.bert.max_tokens=128", "data.kmer_frame=1",
                          "data.kmer_all_frames=false", "data.kmer_flank_bp=150"])  # the published encoding
    encoder = RowEncoder(config, "rows.txt", pad=False)
    seqs = sample_sequences(2)
    seqs[1] = seqs[1][:100]
    codes = np.full((2, 110), 5, np.uint8)
    for i, s in enumerate(seqs):
        codes[i, : len(s)] = encode(s)
    lengths = np.array([len(s) for s in seqs])
    encoder.check(codes, lengths, np.zeros(2, bool), np.array([1, 2]))  # 110 bp fits 128 tokens
    inputs = encoder.inputs(RowBatch(codes, lengths, np.array([1, 2])))
    ids, mask = encode_codes(codes, lengths, frame=1)
    assert (inputs["input_ids"].numpy() == ids).all() and (inputs["attention_mask"].numpy() == mask).all()
    with pytest.raises(InputError, match=r"rows.txt:7 \[sequence\]: sequence of 120 bp gives 131 tokens; the model "
                                         r"takes at most 128"):
        encoder.check(codes, np.array([110, 120]), np.zeros(2, bool), np.array([6, 7]))


def test_bert_run_predicts_rows_of_any_length_like_one_at_a_time(tmp_path):
    """A BERT regression run (weights in DeepSpeed's ZeRO-0 layout): rows of 80-190 bp padded per batch."""
    from promoter_dist.config import dump_yaml, load_config
    from promoter_dist.tasks import build_task

    run = tmp_path / "bert"
    # The pretrained export the run started from is gone: predicting must not need it.
    config = load_config(REPO / "configs" / "bert" / "finetune_debug.yaml",
                         ["model.bert.pretrained=runs/gone/export", "model.bert.hidden=16", "model.bert.layers=1",
                          "model.bert.heads=2", "model.bert.intermediate=32", f"run.out_dir={run}"])
    (run / "checkpoints" / "step00000001").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_yaml(config))
    config.model.bert.pretrained = ""
    torch.manual_seed(0)
    weights = build_task(config).build_model().state_dict()
    torch.save({"module": weights}, run / "checkpoints" / "step00000001" / "mp_rank_00_model_states.pt")
    (run / "checkpoints" / "latest").write_text("step00000001\n")

    task, model, config = load_trained(run, "latest")
    seqs = [s[: 80 + 3 * i] if i < 10 else s + "ACGT" * (i - 9) for i, s in enumerate(sample_sequences(30))]
    values = predict_with_model(task, model, config, write_rows(tmp_path / "rows.txt", seqs), batch_size=8)
    data = config.data  # the recipe's encoding: every frame, short vector flanks
    with torch.no_grad():
        one_by_one = [task.predict(model, dict(zip(("input_ids", "attention_mask"), map(
            torch.from_numpy, encode_for_model(encode(s)[None], np.array([len(s)]), data.kmer_frame,
                                               data.kmer_all_frames, data.kmer_flank_bp))))).item() for s in seqs]
    np.testing.assert_allclose(values, one_by_one, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- checkpoints, devices, export


def test_missing_run_folder_or_checkpoint_is_a_clear_error(run_dir, tmp_path, capsys):
    with pytest.raises(UserError, match="no such run folder"):
        predict_file(tmp_path / "nowhere", TEST_LABELLED, device="cpu")
    with pytest.raises(UserError, match=r"checkpoints/step00000099: no such checkpoint pointer or tag \(found: "):
        load_trained(run_dir, "step00000099")
    (tmp_path / "not_a_run").mkdir()
    assert main(["predict", "--checkpoint", str(tmp_path / "not_a_run"), "--input", str(TEST_LABELLED),
                 "--out", str(tmp_path / "x.json")]) == 2
    assert "not a run folder (no config.yaml" in capsys.readouterr().err


def test_which_selects_a_checkpoint(run_dir, trained, tmp_path):
    tags = {p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir()}
    assert {"step00000003", "step00000006"} <= tags
    head = write_rows(tmp_path / "head.txt", sample_sequences(20))
    early = predict_file(run_dir, head, which="step00000003", device="cpu")
    latest = predict_file(run_dir, head, which="latest", device="cpu")
    assert early.shape == latest.shape == (20,)
    assert not np.allclose(early, latest)  # three more optimizer steps moved the weights


def test_device_choice():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="device must be one of"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_export_writes_weights_that_load_strictly(run_dir, trained, tmp_path, capsys):
    task, model, _ = trained
    from safetensors.torch import load_file

    out = tmp_path / "deep" / "model.safetensors"
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(out)]) == 0
    assert "wrote the fp32 weights of checkpoint best-step" in capsys.readouterr().out
    state = load_file(out)
    fresh = task.build_model()
    fresh.load_state_dict(state, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value.cpu()), key
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())


def test_predict_runs_from_an_export_as_from_the_run(run_dir, tmp_path):
    exported = tmp_path / "model.safetensors"
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(exported)]) == 0
    from_run = predict_file(run_dir, TEST_LABELLED, device="cpu")
    from_export = predict_file(exported, TEST_LABELLED, device="cpu")
    np.testing.assert_array_equal(from_run, from_export)
    out = tmp_path / "sub.json"
    assert main(["predict", "--checkpoint", str(exported), "--input", str(TEST_LABELLED), "--out", str(out),
                 "--no-progress"]) == 0
    assert len(json.loads(out.read_text())) == len(from_run)


def test_console_script_errors_without_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "promoter_dist.cli", "predict", "--checkpoint",
                           str(tmp_path / "missing"), "--input", str(TEST_LABELLED), "--out", str(tmp_path / "s.json")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert done.stderr.strip() == f"promoter-dist: error: {tmp_path / 'missing'}: no such run folder " \
                                  f"(expected the run.out_dir of a training run)"
