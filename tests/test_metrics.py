"""Pearson and Spearman against plain reference computations (no scipy), ties included."""

from __future__ import annotations

import math

import numpy as np
import pytest

from promoter_dist.metrics import pearson, rankdata, spearman


def reference_pearson(x: list[float], y: list[float]) -> float:
    """Textbook formula with exactly rounded sums."""
    n = len(x)
    mx, my = math.fsum(x) / n, math.fsum(y) / n
    sxy = math.fsum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = math.fsum((a - mx) ** 2 for a in x)
    syy = math.fsum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy)


def reference_ranks(x: list[float]) -> list[float]:
    """Double loop: 1 + (number smaller) + (number of equal others) / 2 = average rank of the tie group."""
    return [1 + sum(b < a for b in x) + (sum(b == a for b in x) - 1) / 2 for a in x]


def reference_spearman(x: list[float], y: list[float]) -> float:
    return reference_pearson(reference_ranks(x), reference_ranks(y))


CASES = {
    "normal": lambda rng: (rng.normal(size=300), rng.normal(size=300)),
    "correlated": lambda rng: (lambda a: (a + 0.5 * rng.normal(size=400), a))(rng.normal(size=400)),
    "integer_ties": lambda rng: (rng.integers(0, 5, 250).astype(float), rng.integers(0, 8, 250).astype(float)),
    "ties_one_side": lambda rng: (np.round(rng.normal(size=200), 1), rng.normal(size=200)),
    "large_offset": lambda rng: (1e6 + rng.normal(size=200), 3e5 + rng.normal(size=200)),
    "two_values": lambda rng: (np.array([1.0, 2.0]), np.array([5.0, 3.0])),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_against_reference(case):
    x, y = CASES[case](np.random.default_rng(7))
    assert pearson(x, y) == pytest.approx(reference_pearson(list(x), list(y)), abs=1e-12)
    assert spearman(x, y) == pytest.approx(reference_spearman(list(x), list(y)), abs=1e-12)


def test_rankdata_average_ties_and_nan():
    assert rankdata([10, 20, 20, 30]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert rankdata([3, 3, 3]).tolist() == [2.0, 2.0, 2.0]
    ranks = rankdata([2.0, np.nan, 1.0])
    assert ranks[0] == 2.0 and ranks[2] == 1.0 and math.isnan(ranks[1])
    values = np.random.default_rng(1).integers(0, 20, 500).astype(float)
    assert rankdata(values).tolist() == reference_ranks(list(values))


def test_invariances():
    rng = np.random.default_rng(3)
    x = rng.normal(size=1000)
    assert pearson(3 * x + 7, x) == pytest.approx(1.0, abs=1e-14)
    assert pearson(-2 * x, x) == pytest.approx(-1.0, abs=1e-14)
    assert spearman(np.exp(x), x) == 1.0  # monotone transforms keep ranks exactly
    assert spearman(-(x**3), x) == -1.0
    assert pearson(x, x) <= 1.0  # clipped: rounding never reports r > 1


@pytest.mark.parametrize(
    "x, y",
    [([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]), ([1.0, 2.0, 3.0], [4.0, 4.0, 4.0]), ([1.0], [2.0]), ([], []),
     ([1.0, np.nan, 3.0], [1.0, 2.0, 3.0]), ([1.0, 2.0, 3.0], [1.0, 2.0, np.nan])],
    ids=["constant_pred", "constant_true", "one_value", "empty", "nan_pred", "nan_true"],
)
def test_undefined_is_nan(x, y):
    assert math.isnan(pearson(x, y))
    assert math.isnan(spearman(x, y))


def test_infinity():
    # Moments of inf are undefined; ranks are not.
    assert math.isnan(pearson([1.0, 2.0, np.inf], [1.0, 2.0, 3.0]))
    assert spearman([1.0, 2.0, np.inf], [1.0, 2.0, 3.0]) == 1.0


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="differ in length: 3 vs 2"):
        pearson([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="differ in length"):
        spearman([1, 2, 3], [1, 2])


def test_inputs_float32_lists_and_column_vectors():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=500), rng.normal(size=500)
    expected = reference_pearson(list(x), list(y))
    assert pearson(x.tolist(), y.tolist()) == pytest.approx(expected, abs=1e-12)
    assert pearson(x[:, None], y) == pytest.approx(expected, abs=1e-12)  # model outputs (batch, 1)
    assert pearson(x.astype(np.float32), y.astype(np.float32)) == pytest.approx(expected, abs=1e-6)
    assert isinstance(pearson(x, y), float) and isinstance(spearman(x, y), float)


def test_torch_tensor_input():
    torch = pytest.importorskip("torch")
    x, y = torch.randn(300, generator=torch.Generator().manual_seed(0)), torch.arange(300.0)
    assert pearson(x, y) == pytest.approx(reference_pearson(x.tolist(), y.tolist()), abs=1e-6)
    assert spearman(x.requires_grad_(), y) == pytest.approx(reference_spearman(x.tolist(), y.tolist()), abs=1e-6)


def test_large_input_with_ties_matches_independent_computation():
    # 1M values with heavy ties (labels like the DREAM integers): rank by np.unique inverse + counts.
    rng = np.random.default_rng(11)
    y = rng.integers(0, 18, 1_000_000).astype(float)
    x = y + rng.normal(size=y.size)
    values, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0
    ranks_y = average_rank[inverse]
    ranks_x = np.argsort(np.argsort(x)) + 1.0  # x has no ties
    assert spearman(x, y) == pytest.approx(np.corrcoef(ranks_x, ranks_y)[0, 1], abs=1e-10)
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-10)
