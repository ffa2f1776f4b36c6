"""SYSU-SAIL 3-mer tokens: vocabulary, vector extension, frames, HF tokenizer == numpy path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from promoter_dist.data import kmer_tokenizer as kt
from promoter_dist.data.alphabet import (
    ADAPTER_3P,
    ADAPTER_5P,
    BASES,
    DOWNSTREAM_150,
    INVALID,
    PAD,
    UPSTREAM_150,
    encode,
)

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "dream2022" / "samples" / "train_first1000.txt"


@pytest.fixture(scope="module")
def rows() -> list[str]:
    with open(SAMPLE, encoding="ascii") as handle:
        return [line.split("\t")[0] for line in handle if line.strip()]


def to_codes(sequences: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(n, W) PAD-filled codes and lengths, the layout the data loader hands over."""
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    codes = np.full((len(sequences), int(lengths.max())), PAD, dtype=np.uint8)
    for i, sequence in enumerate(sequences):
        codes[i, : len(sequence)] = encode(sequence)
    return codes, lengths


def hf_batch(tok: PreTrainedTokenizerFast, sequences: list[str], **kwargs) -> tuple[np.ndarray, np.ndarray]:
    out = tok(sequences, padding=kwargs.pop("padding", True), return_tensors="np", **kwargs)
    return out["input_ids"].astype(np.int64), out["attention_mask"].astype(np.int64)


def test_vocabulary_layout() -> None:
    vocab = kt.kmer_vocabulary()
    assert kt.VOCAB_SIZE == 130 and len(vocab) == 130
    assert sorted(vocab.values()) == list(range(130))
    assert [vocab[t] for t in kt.SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert kt.SPECIAL_TOKENS == ["[PAD]", "[CLS]", "[UNK]", "[SEP]", "[MASK]"]
    assert (vocab["AAA"], vocab["AAC"], vocab["AAN"], vocab["ACA"], vocab["NNN"]) == (5, 6, 9, 10, 129)
    for kmer, token_id in vocab.items():
        if kmer not in kt.SPECIAL_TOKENS:
            c0, c1, c2 = (BASES.index(b) for b in kmer)
            assert token_id == 5 + 25 * c0 + 5 * c1 + c2
    tok = kt.build_tokenizer()
    assert tok.get_vocab() == vocab and len(tok) == 130
    assert (tok.pad_token_id, tok.cls_token_id, tok.unk_token_id, tok.sep_token_id, tok.mask_token_id) == (
        0,
        1,
        2,
        3,
        4,
    )


def test_110bp_row_extends_to_plasmid_context(rows: list[str]) -> None:
    row = next(r for r in rows if len(r) == 110 and "N" not in r)
    assert row.startswith(ADAPTER_5P) and row.endswith(ADAPTER_3P)
    extended = kt.extend_with_vector(row)
    assert len(extended) == 380
    # The row's adapters are the vector's: no base is repeated or lost.
    assert extended == UPSTREAM_150 + row[17:97] + DOWNSTREAM_150
    for frame in kt.FRAMES:
        ids = kt.build_tokenizer(frame)(row)["input_ids"]
        assert len(ids) == 126 + 2 and ids[0] == kt.CLS_ID and ids[-1] == kt.SEP_ID
        assert kt.kmer_count(len(row), frame) == 126
        kmers = kt.split_kmers(row, frame)
        assert len(kmers) == 126 and "".join(kmers) == extended[frame : frame + 378]
        assert ids[1:-1] == [kt.kmer_vocabulary()[k] for k in kmers]


def test_other_lengths_keep_their_own_bases() -> None:
    for length in (88, 111, 128):
        row = "ACGT" * 32
        row = row[:length]
        assert kt.extend_with_vector(row) == UPSTREAM_150[:133] + row + DOWNSTREAM_150[13:]
        for frame in kt.FRAMES:
            assert len(kt.build_tokenizer(frame)(row)["input_ids"]) == (270 + length - frame) // 3 + 2


@pytest.mark.parametrize("frame", kt.FRAMES)
def test_encode_codes_equals_hf_on_real_rows(rows: list[str], frame: int) -> None:
    lengths = {len(r) for r in rows}
    assert min(lengths) == 88 and max(lengths) == 128 and any("N" in r for r in rows)
    codes, row_lengths = to_codes(rows)
    ids, mask = kt.encode_codes(codes, row_lengths, frame=frame)
    hf_ids, hf_mask = hf_batch(kt.build_tokenizer(frame), rows)
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    np.testing.assert_array_equal(ids, hf_ids)
    np.testing.assert_array_equal(mask, hf_mask)
    # Rows with N tokenise to 3-mers with N, never to [UNK].
    n_rows = [i for i, r in enumerate(rows) if "N" in r]
    assert not (ids[n_rows] == kt.UNK_ID).any()
    assert np.isin(ids[n_rows], [i for t, i in kt.kmer_vocabulary().items() if "N" in t]).any(axis=1).all()


@pytest.mark.parametrize("max_tokens", [100, 128, 150])
def test_max_tokens_matches_hf_truncation_and_padding(rows: list[str], max_tokens: int) -> None:
    sample = rows[:200]
    codes, lengths = to_codes(sample)
    for frame in kt.FRAMES:
        ids, mask = kt.encode_codes(codes, lengths, frame=frame, max_tokens=max_tokens)
        assert ids.shape == (len(sample), max_tokens)
        hf_ids, hf_mask = hf_batch(
            kt.build_tokenizer(frame), sample, padding="max_length", truncation=True, max_length=max_tokens
        )
        np.testing.assert_array_equal(ids, hf_ids)
        np.testing.assert_array_equal(mask, hf_mask)
        assert (ids[np.arange(len(sample)), mask.sum(axis=1) - 1] == kt.SEP_ID).all()


def test_all_frames_stack(rows: list[str]) -> None:
    sample = [r for r in rows if len(r) in (109, 110, 111)][:50]
    codes, lengths = to_codes(sample)
    ids, mask = kt.encode_codes_all_frames(codes, lengths)
    width = ids.shape[2]
    assert ids.shape == mask.shape == (len(sample), 3, width)
    for frame in kt.FRAMES:
        one_ids, one_mask = kt.encode_codes(codes, lengths, frame=frame, max_tokens=width)
        np.testing.assert_array_equal(ids[:, frame], one_ids)
        np.testing.assert_array_equal(mask[:, frame], one_mask)
    # The three frames really differ.
    assert not np.array_equal(ids[:, 0], ids[:, 1]) and not np.array_equal(ids[:, 1], ids[:, 2])
    assert len(kt.build_frame_tokenizers()) == 3


def test_save_and_reload_offline(rows: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sample = rows[:300] + ["acgtnXacg"]
    for frame in (0, 2):
        tok = kt.build_tokenizer(frame, model_max_length=256)
        folder = tmp_path / f"frame{frame}"
        tok.save_pretrained(folder)
        loaded = AutoTokenizer.from_pretrained(folder)
        assert isinstance(loaded, PreTrainedTokenizerFast) and loaded.is_fast
        assert loaded.get_vocab() == tok.get_vocab() == kt.kmer_vocabulary()
        assert loaded.all_special_tokens == tok.all_special_tokens
        assert sorted(loaded.all_special_tokens) == sorted(kt.SPECIAL_TOKENS)
        assert (loaded.pad_token, loaded.cls_token, loaded.sep_token, loaded.mask_token, loaded.unk_token) == (
            "[PAD]",
            "[CLS]",
            "[SEP]",
            "[MASK]",
            "[UNK]",
        )
        assert loaded.model_max_length == 256
        loaded_ids, loaded_mask = hf_batch(loaded, sample)
        built_ids, built_mask = hf_batch(tok, sample)
        np.testing.assert_array_equal(loaded_ids, built_ids)
        np.testing.assert_array_equal(loaded_mask, built_mask)
        np.testing.assert_array_equal(loaded_ids[:300], kt.encode_codes(*to_codes(sample[:300]), frame)[0])
    # The frame lives in the saved tokenizer: frames 0 and 2 reload differently.
    frame0 = AutoTokenizer.from_pretrained(tmp_path / "frame0")
    frame2 = AutoTokenizer.from_pretrained(tmp_path / "frame2")
    assert frame0(rows[0])["input_ids"] != frame2(rows[0])["input_ids"]


def test_lower_case_folds(rows: list[str]) -> None:
    sample = rows[:20] + [r for r in rows if "N" in r]
    lower = [r.lower() for r in sample]
    mixed = ["".join(b.lower() if i % 2 else b for i, b in enumerate(r)) for r in sample]
    for frame in kt.FRAMES:
        tok = kt.build_tokenizer(frame)
        upper_ids, _ = hf_batch(tok, sample)
        np.testing.assert_array_equal(hf_batch(tok, lower)[0], upper_ids)
        np.testing.assert_array_equal(hf_batch(tok, mixed)[0], upper_ids)
        assert not (upper_ids == kt.UNK_ID).any()
        codes, lengths = to_codes(lower)
        np.testing.assert_array_equal(kt.encode_codes(codes, lengths, frame)[0], upper_ids)
    assert kt.split_kmers("acg") == kt.split_kmers("ACG")


@pytest.mark.parametrize("letter", ["X", "x", "-", " ", "\n", "é"])
def test_invalid_letters_give_unk(rows: list[str], letter: str) -> None:
    row = rows[0]
    position = 40
    bad = row[:position] + letter + row[position + 1 :]
    codes, lengths = to_codes([row, bad])
    assert codes[1, position] == INVALID
    for frame in kt.FRAMES:
        tok = kt.build_tokenizer(frame)
        good_ids = tok(row)["input_ids"]
        bad_ids = tok(bad)["input_ids"]
        # Extended position 133 + 40, read in frame f, after [CLS].
        hit = (133 + position - frame) // 3 + 1
        assert len(bad_ids) == len(good_ids) and bad_ids[hit] == kt.UNK_ID != good_ids[hit]
        assert bad_ids[:hit] == good_ids[:hit] and bad_ids[hit + 1 :] == good_ids[hit + 1 :]
        ids, _ = kt.encode_codes(codes, lengths, frame)
        assert ids[1].tolist() == bad_ids and ids[0].tolist() == good_ids


def test_padding_and_attention_mask_for_mixed_lengths() -> None:
    rng = np.random.default_rng(0)
    lengths = np.array([1, 2, 3, 50, 110, 128, 109, 4], dtype=np.int64)
    codes = np.full((len(lengths), 140), PAD, dtype=np.uint8)
    for i, n in enumerate(lengths):
        codes[i, :n] = rng.integers(0, 5, n)
    for frame in kt.FRAMES:
        ids, mask = kt.encode_codes(codes, lengths, frame)
        counts = (lengths + 270 - frame) // 3
        assert ids.shape == (len(lengths), counts.max() + 2)
        np.testing.assert_array_equal(mask.sum(axis=1), counts + 2)
        for i, count in enumerate(counts):
            assert ids[i, 0] == kt.CLS_ID and ids[i, count + 1] == kt.SEP_ID
            assert (ids[i, 1 : count + 1] >= 5).all() and (ids[i, count + 2 :] == kt.PAD_ID).all()
            assert mask[i, : count + 2].all() and not mask[i, count + 2 :].any()
        sequences = ["".join(BASES[c] for c in codes[i, :n]) for i, n in enumerate(lengths)]
        hf_ids, hf_mask = hf_batch(kt.build_tokenizer(frame), sequences)
        np.testing.assert_array_equal(ids, hf_ids)
        np.testing.assert_array_equal(mask, hf_mask)


def test_bad_arguments_are_refused() -> None:
    codes = np.zeros((2, 10), dtype=np.uint8)
    with pytest.raises(ValueError, match="frame"):
        kt.encode_codes(codes, np.array([10, 10]), frame=3)
    with pytest.raises(ValueError, match="frame"):
        kt.build_tokenizer(-1)
    with pytest.raises(ValueError, match="lengths"):
        kt.encode_codes(codes, np.array([10, 11]))
    with pytest.raises(ValueError, match="lengths"):
        kt.encode_codes(codes, np.array([0, 10]))
    with pytest.raises(ValueError, match="max_tokens"):
        kt.encode_codes(codes, np.array([10, 10]), max_tokens=1)
    ids, mask = kt.encode_codes(codes, np.array([10, 10]), max_tokens=2)
    assert ids.tolist() == [[kt.CLS_ID, kt.SEP_ID]] * 2 and mask.tolist() == [[1, 1]] * 2


@pytest.mark.parametrize("flank_bp", [150, 19, 20, 21, 23, 64])
def test_random_rows_of_every_length_phase_and_letter_equal_hf(flank_bp: int) -> None:
    """The row-only numpy path (constant flank 3-mers, tail placed per phase) against the HF tokenizer:
    lengths 1..140 (every phase of every frame), N, invalid letters at the row's edges, truncation; the
    published flanks and shorter ones of every length phase (2-4 vector bases before the row, 6-8 after)."""
    rng = np.random.default_rng(11)
    letters = np.array(list("ACGTNacgtnX*"))
    sequences = []
    for length in range(1, 141):
        for _ in range(2):
            chosen = rng.choice(letters, length, p=[0.2, 0.2, 0.2, 0.2, 0.04, 0.03, 0.03, 0.03, 0.03, 0.02, 0.01, 0.01])
            if rng.random() < 0.2:
                chosen[-1] = "X"  # an invalid last base: inside the 3-mer across the row's end
            sequences.append("".join(chosen))
    codes, lengths = to_codes(sequences)
    for frame in kt.FRAMES:
        tok = kt.build_tokenizer(frame, flank_bp=flank_bp)
        ids, mask = kt.encode_codes(codes, lengths, frame, flank_bp=flank_bp)
        hf_ids, hf_mask = hf_batch(tok, sequences)
        np.testing.assert_array_equal(ids, hf_ids)
        np.testing.assert_array_equal(mask, hf_mask)
        assert (mask.sum(axis=1) == kt.kmer_count(lengths, frame, flank_bp) + 2).all()
        for max_tokens in (2, 60, 127, 200):
            ids, mask = kt.encode_codes(codes, lengths, frame, max_tokens=max_tokens, flank_bp=flank_bp)
            hf_ids, hf_mask = hf_batch(tok, sequences, padding="max_length", truncation=True, max_length=max_tokens)
            np.testing.assert_array_equal(ids, hf_ids)
            np.testing.assert_array_equal(mask, hf_mask)


def _plain_ids(sequence: str, frame: int, total: int, flank_bp: int = 150) -> tuple[list[int], list[int]]:
    """The module docstring's rule, row by row on strings: flank, skip ``frame`` bases, whole 3-mers
    (any letter outside ACGTN: [UNK]), [CLS] ... [SEP], cut to keep [SEP] last, then [PAD]."""
    vocab = kt.kmer_vocabulary()
    upstream = UPSTREAM_150[: -len(ADAPTER_5P)][len(UPSTREAM_150) - flank_bp :]
    downstream = DOWNSTREAM_150[len(ADAPTER_3P) : flank_bp]
    extended = (upstream + sequence.upper() + downstream)[frame:]
    kmers = [extended[i : i + 3] for i in range(0, len(extended) - 2, 3)]
    ids = [vocab.get(kmer, kt.UNK_ID) for kmer in kmers][: total - 2]
    ids = [kt.CLS_ID, *ids, kt.SEP_ID]
    return ids + [kt.PAD_ID] * (total - len(ids)), [1] * len(ids) + [0] * (total - len(ids))


def test_loader_layout_of_random_rows_equals_a_plain_reference() -> None:
    """Rows as the loader hands them over (codes 0..4, PAD beyond each row, the batch wider than its
    longest row) and as callers may (INVALID and PAD inside a row, int64 codes): every length 1..150, every
    frame, with and without max_tokens, against :func:`_plain_ids`."""
    rng = np.random.default_rng(23)
    lengths = np.concatenate([np.arange(1, 151), rng.integers(1, 151, 150)])
    sequences = ["".join(rng.choice(list("ACGTN"), n, p=[0.24, 0.24, 0.24, 0.24, 0.04])) for n in lengths]
    sequences[::7] = [s[:-1] + "X" for s in sequences[::7]]  # invalid letters, some at the row's end
    sequences[3::11] = ["X" + s[1:] for s in sequences[3::11]]
    width = int(lengths.max()) + 9
    codes = np.full((len(sequences), width), PAD, dtype=np.uint8)
    for i, sequence in enumerate(sequences):
        codes[i, : len(sequence)] = encode(sequence)
    assert (codes == INVALID).any()
    for frame in kt.FRAMES:
        for max_tokens in (None, 2, 45, 130):
            for batch in (codes, codes.astype(np.int64)):
                ids, mask = kt.encode_codes(batch, lengths, frame, max_tokens=max_tokens)
                total = ids.shape[1]
                assert max_tokens is None or total == max_tokens
                expected = [_plain_ids(s, frame, total) for s in sequences]
                np.testing.assert_array_equal(ids, [e[0] for e in expected])
                np.testing.assert_array_equal(mask, [e[1] for e in expected])
                assert ids.dtype == mask.dtype == np.int64
    ids, mask = kt.encode_codes_all_frames(codes, lengths)
    for frame in kt.FRAMES:
        np.testing.assert_array_equal(ids[:, frame], [_plain_ids(s, frame, ids.shape[2])[0] for s in sequences])
    for flank_bp in (19, 23):
        ids, mask = kt.encode_codes_all_frames(codes, lengths, flank_bp=flank_bp)
        for frame in kt.FRAMES:
            np.testing.assert_array_equal(ids[:, frame], [_plain_ids(s, frame, ids.shape[2], flank_bp)[0]
                                                          for s in sequences])


def test_shorter_flanks_are_the_vector_bases_next_to_the_row() -> None:
    assert kt.vector_flanks() == (kt.UPSTREAM_FLANK, kt.DOWNSTREAM_FLANK)
    assert kt.extension_bp() == kt.EXTENSION == 270
    upstream, downstream = kt.vector_flanks(23)
    # The 150-bp extension either side, counted with the row's own adapters: 6 + 17 before, 13 + 10 after.
    assert len(upstream) == 6 and (upstream + ADAPTER_5P) == UPSTREAM_150[-23:]
    assert len(downstream) == 10 and (ADAPTER_3P + downstream) == DOWNSTREAM_150[:23]
    assert kt.extend_with_vector("ACGT", 23) == upstream + "ACGT" + downstream
    kmers = kt.split_kmers("A" * 110, 1, 23)
    extended = upstream + "A" * 110 + downstream  # 126 bp: frame 1 reads bases 1..123, the last two dropped
    assert kmers == [extended[i : i + 3] for i in range(1, 124, 3)]
    assert len(kmers) == kt.kmer_count(110, 1, 23) == (110 + 16 - 1) // 3
    for bad in (18, 151, 0, True, 23.0):
        with pytest.raises(ValueError, match="flank_bp"):
            kt.vector_flanks(bad)
