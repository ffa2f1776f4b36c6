"""Correlation metrics: Pearson's r and Spearman's rho, numpy only, float64.

Used by the DREAM scorer (:mod:`promoter_dist.scoring`) and by the trainer at the end
of every epoch, so both are vectorised: one sort and a few passes over the data
(Spearman over 7M values takes about a second on one core).

Undefined cases return ``nan`` instead of raising, so that a training loop can log
them; a caller that must not accept ``nan`` checks with :func:`math.isfinite`:

- fewer than 2 values;
- a constant input (zero variance), on either side;
- any ``nan`` in either input (no value is dropped silently: the result is ``nan``).

``inf`` is treated like ``nan`` for Pearson (the moments are undefined) but is an
ordinary, largest/smallest value for Spearman (ranks are well defined).

Inputs of different lengths raise :class:`ValueError`: that is a programming error,
never a property of the data.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["pearson", "spearman", "rankdata"]


def _as_float64(values: Any) -> np.ndarray:
    """A flat float64 view or copy of an array-like (numpy, list, torch tensor on any device).

    Flattened so that a model output of shape (batch, 1) can be passed as is.
    """
    if hasattr(values, "detach"):  # torch tensor: avoid importing torch here
        values = values.detach().float().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        array = array.reshape(-1)
    return array


def _check_pair(pred: Any, true: Any) -> tuple[np.ndarray, np.ndarray]:
    x = _as_float64(pred)
    y = _as_float64(true)
    if x.shape != y.shape:
        raise ValueError(f"pred and true differ in length: {x.size} vs {y.size}")
    return x, y


def _pearson_float64(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r of two finite-checked float64 arrays of equal length."""
    n = x.size
    if n < 2:
        return math.nan
    # Two passes (centre, then dot products) keep full precision for data with a large
    # mean; the one-pass sum-of-squares formula loses digits when mean >> spread.
    xc = x - x.mean()
    yc = y - y.mean()
    sxx = float(np.dot(xc, xc))
    syy = float(np.dot(yc, yc))
    if not (sxx > 0.0 and syy > 0.0) or not (math.isfinite(sxx) and math.isfinite(syy)):
        return math.nan
    r = float(np.dot(xc, yc)) / math.sqrt(sxx * syy)
    # Rounding can push |r| a hair past 1 for (anti)proportional inputs.
    return max(-1.0, min(1.0, r))


def pearson(pred: Any, true: Any) -> float:
    """Pearson correlation of two equally long 1-D sequences, in float64.

    Returns ``nan`` for fewer than 2 values, a constant input, or any non-finite value.
    """
    x, y = _check_pair(pred, true)
    if x.size < 2:
        return math.nan
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return math.nan
    return _pearson_float64(x, y)


def rankdata(values: Any) -> np.ndarray:
    """1-based ranks, ties given the average of the ranks they span (float64).

    ``[10, 20, 20, 30]`` -> ``[1, 2.5, 2.5, 4]``. ``nan`` values get ``nan`` ranks.
    """
    x = _as_float64(values)
    n = x.size
    ranks = np.full(n, np.nan)
    if n == 0:
        return ranks
    order = np.argsort(x)  # nan sorts last; ties are resolved below, so no stable sort needed
    ordered = x[order]
    valid = int(n - np.isnan(ordered).sum())
    ordered = ordered[:valid]
    if valid == 0:
        return ranks
    starts_group = np.empty(valid, dtype=bool)
    starts_group[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=starts_group[1:])
    first = np.flatnonzero(starts_group)  # 0-based position where each tie group starts
    last = np.append(first[1:], valid) - 1  # and where it ends
    group_rank = (first + last) / 2.0 + 1.0  # mean of the 1-based ranks first+1 .. last+1
    group_of = np.cumsum(starts_group) - 1
    ranks[order[:valid]] = group_rank[group_of]
    return ranks


def spearman(pred: Any, true: Any) -> float:
    """Spearman rank correlation (Pearson r of average ranks), in float64.

    Returns ``nan`` for fewer than 2 values, a constant input, or any ``nan`` value.
    """
    x, y = _check_pair(pred, true)
    if x.size < 2 or np.isnan(x).any() or np.isnan(y).any():
        return math.nan
    return _pearson_float64(rankdata(x), rankdata(y))
