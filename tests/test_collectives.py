"""Collectives of promoter_dist.distributed in a single process, where no process group exists."""

from __future__ import annotations

import numpy as np
import torch

from promoter_dist.distributed import (
    all_ranks_finite,
    all_reduce_max,
    all_reduce_mean,
    any_rank,
    finite_global_sum,
    gather_arrays,
    world_size,
)


def test_finiteness_helpers_work_without_torch_distributed():
    assert all_ranks_finite(torch.tensor(2.5))
    assert not all_ranks_finite(torch.tensor(float("inf")))
    assert not all_ranks_finite(torch.tensor(float("nan")))
    assert finite_global_sum(torch.tensor(2.5)) == (True, 2.5)


def test_scalar_collectives_return_their_input_in_one_process():
    assert world_size() == 1
    assert all_reduce_max(3.5) == 3.5 and all_reduce_mean(-1.25) == -1.25
    assert any_rank(True) and not any_rank(False)
    arrays = {"pred": np.arange(3.0)}
    assert gather_arrays(arrays) is arrays
