"""LegNet's input encoding: the 150-bp window, one-hot with N = 0.25, reverse complement, the loader's view."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from promoter_dist.data.alphabet import ADAPTER_5P, PAD, UPSTREAM_150, decode, encode
from promoter_dist.data.loader import LoaderConfig, ShardLoader
from promoter_dist.data.onehot import (
    WINDOW,
    one_hot,
    reverse_complement,
    reverse_complement_codes,
    window_codes,
)
from tests.conftest import DEMO_TRAIN

COMPLEMENT = {"A": "T", "C": "G", "G": "C", "T": "A", "N": "N"}


def published_window(row: str, length: int = WINDOW) -> str:
    """The team's preprocessing, on strings: vector + the row without its 5' adapter, the last ``length`` bases."""
    return (UPSTREAM_150[len(UPSTREAM_150) - length:] + row[len(ADAPTER_5P):])[-length:]


def revcomp(seq: str) -> str:
    return "".join(COMPLEMENT[base] for base in reversed(seq))


def padded(rows: list[str]) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    codes = np.full((len(rows), width), PAD, dtype=np.uint8)
    for i, row in enumerate(rows):
        codes[i, : len(row)] = encode(row)
    return codes, np.array([len(r) for r in rows], dtype=np.int64)


def channels(x: torch.Tensor) -> str:
    """Decode (4, L) one-hot back to bases (0.25 in all four -> N)."""
    out = []
    for column in x.T.tolist():
        if column == [0.25] * 4:
            out.append("N")
        else:
            assert sorted(column) == [0.0, 0.0, 0.0, 1.0], column
            out.append("ACGT"[column.index(1.0)])
    return "".join(out)


ROWS = [
    ADAPTER_5P + "ACGTNACGTACCA" * 7 + "GGTTACGGCTGTT",  # 121 bp with N
    ADAPTER_5P + "T" * 80 + "GGTTACGGCTGTT",  # the nominal 110 bp
    ADAPTER_5P + "GATTACA" * 20 + "GGTTACGGCTGTT",  # 170 bp: longer than the window after the adapter
    "ACGTACGTAC",  # shorter than the adapter: the window is all vector
    ADAPTER_5P,  # exactly the adapter
    "N" * 40,
]


def test_window_matches_the_published_preprocessing_for_every_length():
    codes, lengths = padded(ROWS)
    windows = window_codes(codes, lengths)
    assert windows.shape == (len(ROWS), WINDOW) and windows.dtype == np.uint8
    for row, window in zip(ROWS, windows):
        assert decode(window) == published_window(row), row
    # 110 bp: 57 bp of vector, then the row's last 93 bases
    assert decode(windows[1]) == UPSTREAM_150[-57:] + ROWS[1][17:]
    # the row's 3' end is always the window's last base; a long row keeps its last 150 bases
    assert decode(windows[2]) == ROWS[2][-WINDOW:]
    assert decode(windows[3]) == UPSTREAM_150
    assert window_codes(codes[:0], lengths[:0]).shape == (0, WINDOW)


@pytest.mark.parametrize("length", [1, 96, 150])
def test_window_length_is_a_parameter(length):
    codes, lengths = padded(ROWS)
    for row, window in zip(ROWS, window_codes(codes, lengths, length)):
        assert decode(window) == published_window(row, length)


def test_one_hot_channels_n_reverse_and_singleton():
    codes, lengths = padded(ROWS[:3])
    windows = torch.from_numpy(window_codes(codes, lengths))
    singleton = torch.tensor([1, 0, 1], dtype=torch.uint8)
    x = one_hot(windows, singleton, reverse=False)
    assert x.shape == (3, 6, WINDOW) and x.dtype == torch.float32
    for i, row in enumerate(ROWS[:3]):
        assert channels(x[i, :4]) == published_window(row)
    first_n = WINDOW - (len(ROWS[0]) - len(ADAPTER_5P)) + 4  # the row's first N: 4 bases after the adapter
    assert x[0, :4, first_n].tolist() == [0.25] * 4
    assert (x[:, 4] == 0).all()  # is-reverse
    assert x[:, 5, 0].tolist() == [1.0, 0.0, 1.0] and (x[:, 5] == x[:, 5, :1]).all()  # is-singleton, every position
    assert (one_hot(windows, None, reverse=True)[:, 4:] == torch.tensor([1.0, 0.0])[:, None]).all()


def test_reverse_complement_is_the_reverse_complement_of_the_window_string():
    codes, lengths = padded(ROWS)
    windows = window_codes(codes, lengths)
    flipped = reverse_complement(torch.from_numpy(windows))
    np.testing.assert_array_equal(flipped.numpy(), reverse_complement_codes(windows))
    for row, window in zip(ROWS, flipped.numpy()):
        assert decode(window) == revcomp(published_window(row))  # N stays N
    x = one_hot(flipped, None, reverse=True)
    assert channels(x[0, :4]) == revcomp(published_window(ROWS[0]))
    # twice is the identity
    np.testing.assert_array_equal(reverse_complement(flipped).numpy(), windows)


def test_loader_onehot_view_gives_windows_and_singleton_flags(small_shards: Path):
    source = {n: line.split("\t") for n, line in enumerate(DEMO_TRAIN.read_text().splitlines(), start=1)}
    config = LoaderConfig(split="val", view="all", tokens="onehot", batch_size=64, shuffle=False, drop_last=False)
    seen = 0
    for batch in ShardLoader(small_shards, config, rank=0, world_size=1):
        assert set(batch) == {"window", "singleton", "y", "line"}
        assert batch["window"].dtype == torch.uint8 and batch["window"].shape[1] == WINDOW
        for window, singleton, line in zip(batch["window"].numpy(), batch["singleton"].tolist(), batch["line"].tolist()):
            seq, label = source[line]
            assert decode(window) == published_window(seq.upper())
            assert singleton == int(float(label).is_integer())  # shard flag bit 0, as the team defined it
            seen += 1
    assert seen > 100
    assert 0 < sum(1 for seq, label in source.values() if float(label).is_integer()) < len(source)
