"""Masked-LM pretraining task: masking statistics and determinism on real rows, evaluation
masks fixed per row, and a tiny BERT that learns in a few dozen steps."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from promoter_dist.config import load_config
from promoter_dist.data.dream import ReadOptions, read_dream
from promoter_dist.data.kmer_tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID, UNK_ID, VOCAB_SIZE, encode_codes
from promoter_dist.errors import UserError
from promoter_dist.tasks.bert_io import load_exported
from promoter_dist.tasks.mlm import IGNORE, MLMTask, mask_tokens, mask_tokens_keyed

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "dream2022" / "samples" / "train_first1000.txt"
TINY = ["model.bert.hidden=64", "model.bert.layers=2", "model.bert.heads=4", "model.bert.intermediate=128"]


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    """All 1,000 real sample rows as one loader-style batch (about 128k tokens, frame 0)."""
    rows, _ = read_dream(SAMPLE, ReadOptions(workers=0))
    ids, mask = encode_codes(rows.codes, rows.lengths, frame=0)
    return {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask),
        "y": torch.from_numpy(rows.labels),
        "line": torch.from_numpy(rows.lines),
    }


def mlm_config(*extra: str):
    return load_config(overrides=["model.name=bert", "task.name=mlm", *TINY, *extra])


def check_masking(ids: torch.Tensor, mask: torch.Tensor, masked: torch.Tensor, labels: torch.Tensor, p: float = 0.15):
    """The statistics and invariants of BERT masking on one masked batch."""
    chosen = labels != IGNORE
    candidate = mask.bool() & (ids > MASK_ID)
    special = torch.isin(ids, torch.tensor([PAD_ID, CLS_ID, UNK_ID, SEP_ID, MASK_ID])) | ~mask.bool()
    assert not (chosen & special).any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])  # nothing else is touched
    n = int(candidate.sum())
    rate = int(chosen.sum()) / n
    # Binomial sd at ~120k candidates is 0.001: +-0.006 is 6 sd.
    assert abs(rate - p) < 0.006, rate
    to_mask = chosen & (masked == MASK_ID)
    replaced = chosen & (masked != MASK_ID) & (masked != ids)
    kept = chosen & (masked == ids)
    m = int(chosen.sum())
    # A random replacement equals the original 1 time in 125: it then counts as kept.
    shares = {"mask": (to_mask, 0.8), "random": (replaced, 0.1 * 124 / 125), "kept": (kept, 0.1 + 0.1 / 125)}
    for name, (selected, expected) in shares.items():
        share = int(selected.sum()) / m
        assert abs(share - expected) < 0.015, (name, share)  # sd <= 0.003 at ~18k chosen
    assert ((masked[replaced] >= 5) & (masked[replaced] < VOCAB_SIZE)).all()
    return chosen


def test_masking_statistics_on_real_rows(batch):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert int(mask.sum()) > 100_000
    masked, labels = mask_tokens(ids, mask, 0.15, torch.Generator().manual_seed(0))
    check_masking(ids, mask, masked, labels)
    # Other rates are honoured too.
    masked, labels = mask_tokens(ids, mask, 0.3, torch.Generator().manual_seed(1))
    check_masking(ids, mask, masked, labels, p=0.3)


def test_random_replacements_cover_the_kmers_and_never_a_special(batch):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    masked, labels = mask_tokens(ids, mask, 0.9, torch.Generator().manual_seed(2))
    replaced = masked[(labels != IGNORE) & (masked != MASK_ID) & (masked != ids)]
    assert replaced.min() == 5 and replaced.max() == VOCAB_SIZE - 1
    assert len(torch.unique(replaced)) == VOCAB_SIZE - 5


def test_masking_is_deterministic_for_a_generator_and_for_the_global_seed(batch):
    ids, mask = batch["input_ids"][:64], batch["attention_mask"][:64]
    a = mask_tokens(ids, mask, generator=torch.Generator().manual_seed(7))
    b = mask_tokens(ids, mask, generator=torch.Generator().manual_seed(7))
    c = mask_tokens(ids, mask, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    # Without a generator the global RNG decides: restoring its state repeats the masks
    # (what the trainer relies on for exact resume and GSAM's second pass).
    state = torch.get_rng_state()
    d = mask_tokens(ids, mask)
    torch.set_rng_state(state)
    e = mask_tokens(ids, mask)
    assert torch.equal(d[0], e[0]) and torch.equal(d[1], e[1])


def test_at_least_one_token_per_row_and_none_in_rows_without_kmers():
    ids = torch.tensor(
        [
            [CLS_ID, 10, 11, 12, UNK_ID, SEP_ID, PAD_ID],
            [CLS_ID, 20, SEP_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID],
            [CLS_ID, UNK_ID, SEP_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID],  # nothing to predict
        ]
    )
    mask = (ids != PAD_ID).long()
    for seed in range(20):
        _, labels = mask_tokens(ids, mask, mask_prob=1e-6, generator=torch.Generator().manual_seed(seed))
        chosen = labels != IGNORE
        assert chosen.sum(1).tolist() == [1, 1, 0]
        assert chosen[0, 1:4].any() and chosen[1, 1]


def test_mask_prob_must_be_a_fraction(batch):
    with pytest.raises(ValueError, match="mask_prob"):
        mask_tokens(batch["input_ids"][:2], batch["attention_mask"][:2], mask_prob=0.0)


def test_keyed_masks_depend_only_on_the_row(batch):
    ids, mask, lines = batch["input_ids"], batch["attention_mask"], batch["line"]
    masked, labels = mask_tokens_keyed(ids, mask, lines)
    check_masking(ids, mask, masked, labels)
    # Another batch composition (reversed, a subset) masks each row the same way.
    order = torch.arange(len(ids) - 1, -1, -3)
    sub_masked, sub_labels = mask_tokens_keyed(ids[order], mask[order], lines[order])
    assert torch.equal(sub_masked, masked[order]) and torch.equal(sub_labels, labels[order])
    # No RNG is consumed or consulted.
    state = torch.get_rng_state()
    torch.manual_seed(123)
    again = mask_tokens_keyed(ids, mask, lines)
    assert torch.equal(again[0], masked)
    torch.set_rng_state(state)
    # Different keys give different masks.
    assert not torch.equal(mask_tokens_keyed(ids, mask, lines + 1)[1], labels)


def test_tiny_bert_learns_and_summaries_are_consistent(batch, tmp_path):
    config = mlm_config("data.kmer_frame=0")
    task = MLMTask(config)
    assert task.tokens == "kmer" and task.default_view == "top" and config.view == "top"
    torch.manual_seed(0)
    model = task.build_model()
    held_out = {key: value[900:] for key, value in batch.items()}
    train = {key: value[:900] for key, value in batch.items()}

    def evaluate() -> dict[str, float]:
        model.eval()
        parts = [task.evaluate_batch(model, {k: v[i : i + 50] for k, v in held_out.items()}) for i in (0, 50)]
        model.train()
        gathered = {key: torch.cat([p[key] for p in parts]).numpy() for key in parts[0]}
        return task.summarize(gathered), gathered

    before, _ = evaluate()
    assert abs(before["loss"] - math.log(VOCAB_SIZE)) < 0.5  # an untrained model is near uniform
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for step in range(30):
        rows = torch.randint(0, 900, (16,))
        loss = task.training_loss(model, {key: value[rows] for key, value in train.items()})
        assert loss.ndim == 0 and torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    after, gathered = evaluate()
    print(f"held-out masked-token loss {before['loss']:.3f} -> {after['loss']:.3f}, accuracy {after['accuracy']:.3f}")
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert after["loss"] < before["loss"] - 0.5
    # summarize is the counts' arithmetic.
    assert set(gathered) == {"loss_sum", "correct", "count"} and all(v.shape == (2,) for v in gathered.values())
    assert 0.0 <= after["accuracy"] <= 1.0
    assert after["accuracy"] == pytest.approx(gathered["correct"].sum() / gathered["count"].sum())
    assert after["loss"] == pytest.approx(gathered["loss_sum"].sum() / gathered["count"].sum())
    assert after["perplexity"] == pytest.approx(math.exp(after["loss"]))
    assert after["tokens"] == gathered["count"].sum() > 0.1 * int(held_out["attention_mask"].sum())
    # Evaluation is deterministic, and does not depend on how rows are batched.
    again, _ = evaluate()
    assert again == after
    model.eval()
    whole = task.evaluate_batch(model, held_out)
    assert int(whole["count"]) == gathered["count"].sum() and int(whole["correct"]) == gathered["correct"].sum()
    assert float(whole["loss_sum"]) == pytest.approx(gathered["loss_sum"].sum(), rel=1e-5)
    # The export reloads with the Auto classes and evaluates the same.
    task.export(model, tmp_path / "export")
    _, reloaded = load_exported(tmp_path / "export", "mlm")
    assert task.evaluate_batch(reloaded, held_out)["correct"] == whole["correct"]


def test_summarize_of_nothing_and_too_long_batches(batch):
    task = MLMTask(mlm_config("model.bert.max_tokens=128"))
    empty = task.summarize({})
    assert math.isnan(empty["loss"]) and empty["tokens"] == 0
    # Sample rows up to 128 bp give 134 tokens: a clear error, not an index error.
    with pytest.raises(UserError, match=r"model\.bert\.max_tokens=128"):
        task.training_loss(task.build_model(), batch)


@pytest.mark.parametrize("flank_bp", [150, 19, 20, 23])
@pytest.mark.parametrize("frame", [0, 1, 2])
def test_row_token_mask_marks_exactly_the_tokens_inside_the_row(frame, flank_bp):
    """All-N rows in ACGT flanks: the tokens wholly inside a row are exactly its 'NNN' tokens."""
    from promoter_dist.data.alphabet import encode
    from promoter_dist.data.kmer_tokenizer import kmer_vocabulary
    from promoter_dist.tasks.mlm import row_token_mask

    lengths = np.array([80, 110, 111, 112, 113, 150])
    codes = np.stack([np.pad(encode("N" * n), (0, 150 - n), constant_values=5) for n in lengths])
    ids, _ = encode_codes(codes, lengths, frame=frame, flank_bp=flank_bp)
    in_row = row_token_mask(torch.from_numpy(lengths), frame, ids.shape[1], flank_bp)
    assert torch.equal(in_row, torch.from_numpy(ids == kmer_vocabulary()["NNN"]))
    assert int(in_row[1].sum()) == 36  # a 110-bp row: 36 whole 3-mers in every frame (110 = 36 x 3 + 2)


def test_row_accuracy_counts_only_the_rows_own_tokens(batch):
    from promoter_dist.tasks.mlm import row_token_mask

    rows, _ = read_dream(SAMPLE, ReadOptions(workers=0))
    with_lengths = {**{k: v[:200] for k, v in batch.items()}, "lengths": torch.from_numpy(rows.lengths[:200])}
    task = MLMTask(mlm_config("data.kmer_frame=0"))
    torch.manual_seed(0)
    model = task.build_model().eval()
    out = task.evaluate_batch(model, with_lengths)
    summary = task.summarize({k: v.numpy() for k, v in out.items()})
    in_row = row_token_mask(with_lengths["lengths"], 0, with_lengths["input_ids"].shape[1])
    # A 110-bp row has 36 of its 126 3-mers wholly inside it; about 15% of those are masked.
    assert 0.2 < in_row[with_lengths["attention_mask"].bool()].float().mean() < 0.35
    assert 0 < int(out["row_count"]) < int(out["count"])
    assert summary["row_accuracy"] == pytest.approx(int(out["row_correct"]) / int(out["row_count"]))
    assert "row_accuracy" not in task.summarize({k: v.numpy() for k, v in out.items() if not k.startswith("row_")})


def test_mlm_on_all_three_frames(batch):
    """(B, 3, T) batches train and evaluate as 3B sequences; row tokens are found in each frame."""
    from promoter_dist.data.kmer_tokenizer import encode_codes_all_frames

    rows, _ = read_dream(SAMPLE, ReadOptions(workers=0))
    ids, mask = encode_codes_all_frames(rows.codes[:64], rows.lengths[:64])
    three = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
             "line": torch.from_numpy(rows.lines[:64]), "lengths": torch.from_numpy(rows.lengths[:64])}
    task = MLMTask(mlm_config("data.kmer_all_frames=true"))
    torch.manual_seed(0)
    model = task.build_model()
    assert torch.isfinite(task.training_loss(model, three))
    model.eval()
    out = task.evaluate_batch(model, three)
    # About 15% of all 3-mers of the three frames are chosen, and some of them in each row's own part.
    kmers = int(((three["input_ids"] > MASK_ID) & three["attention_mask"].bool()).sum())
    assert 0.12 < int(out["count"]) / kmers < 0.18
    assert 0 < int(out["row_count"]) < int(out["count"])
    again = task.evaluate_batch(model, three)
    assert all(torch.equal(out[k], again[k]) for k in out)  # keyed by line and frame: deterministic
