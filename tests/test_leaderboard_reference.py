"""The leaderboard's composition-only reference row (``benchmarks/models.py``): overlapping k-mer
counts and a ridge regression on them, checked against counts made by hand and planted signals."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from models import kmer_counts, kmer_ridge_pearson  # noqa: E402

from promoter_dist.data.alphabet import PAD, encode  # noqa: E402


def codes_of(*rows: str) -> np.ndarray:
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), PAD, dtype=np.uint8)
    for i, row in enumerate(rows):
        out[i, : len(row)] = encode(row)
    return out


def test_counts_skip_windows_with_n_or_padding() -> None:
    counts = kmer_counts(codes_of("ACGTNAC", "AAA"), k=2)
    # Row 0: AC, CG, GT, then TN and NA are skipped, then AC again; row 1: AA twice, A+padding skipped.
    expected0 = {"AC": 2, "CG": 1, "GT": 1}
    expected1 = {"AA": 2}
    for row, expected in ((0, expected0), (1, expected1)):
        got = {"ACGT"[i // 4] + "ACGT"[i % 4]: int(c) for i, c in enumerate(counts[row]) if c}
        assert got == expected


@pytest.mark.parametrize("k", [1, 3, 4])
def test_counts_match_a_string_count(k: int) -> None:
    rng = np.random.default_rng(k)
    rows = ["".join(rng.choice(list("ACGTN"), size=int(rng.integers(k, 40)))) for _ in range(30)]
    counts = kmer_counts(codes_of(*rows), k=k)
    for r, row in enumerate(rows):
        for index in rng.integers(0, 4**k, size=8):
            kmer = "".join("ACGT"[(int(index) // 4 ** (k - 1 - j)) % 4] for j in range(k))
            by_hand = sum(row[i : i + k] == kmer for i in range(len(row) - k + 1))
            assert counts[r, index] == by_hand


def test_ridge_finds_a_composition_signal_and_not_a_positional_one() -> None:
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 4, size=(4000, 60)).astype(np.uint8)
    composition = kmer_counts(codes, k=4)[:, 27] * 1.0  # the count of one 4-mer (AGTT)
    positional = (codes[:, 30] == 2).astype(np.float64)  # G at one position: invisible to counts
    train, test = slice(0, 3000), slice(3000, None)
    assert kmer_ridge_pearson(codes[train], composition[train], codes[test], composition[test]) > 0.99
    assert abs(kmer_ridge_pearson(codes[train], positional[train], codes[test], positional[test])) < 0.15
