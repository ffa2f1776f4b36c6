"""The shard-stage benchmark's interval for a median (``benchmarks/shard_stage.py``): the ranks of the
distribution-free 95% interval, against the published table of binomial order statistics."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from shard_stage import median_interval  # noqa: E402


@pytest.mark.parametrize(("n", "ranks"), [(6, (1, 6)), (10, (2, 9)), (41, (14, 28)), (61, (23, 39)), (100, (40, 61))])
def test_the_median_interval_takes_the_order_statistics_of_the_binomial_table(n: int, ranks: tuple[int, int]) -> None:
    values = [float(v) for v in range(n, 0, -1)]  # unsorted: value v is the order statistic of rank v
    assert median_interval(values) == tuple(float(r) for r in ranks)


def test_too_few_values_give_the_whole_range() -> None:
    assert median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)
