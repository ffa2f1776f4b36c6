"""Collectives of promoter_dist.distributed in a single process, where no process group exists."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from promoter_dist.distributed import (
    all_reduce_max,
    all_reduce_mean,
    any_rank,
    finite_global_sum,
    gather_arrays,
    world_size,
)


def test_finiteness_helpers_work_without_torch_distributed():
    assert finite_global_sum(torch.tensor(2.5)) == (True, 2.5)
    for bad in (float("inf"), float("nan")):
        finite, total = finite_global_sum(torch.tensor(bad))
        assert not finite and np.isnan(total)


def test_scalar_collectives_return_their_input_in_one_process():
    assert world_size() == 1
    assert all_reduce_max(3.5) == 3.5 and all_reduce_mean(-1.25) == -1.25
    assert any_rank(True) and not any_rank(False)
    arrays = {"pred": np.arange(3.0)}
    assert gather_arrays(arrays) is arrays


# --------------------------------------------------------------------------- the GPU of a rank


def _env(local_rank: int, local_world: int, nodes: int = 1):
    from promoter_dist.launch.environment import DistEnv

    return DistEnv(rank=local_rank, local_rank=local_rank, world_size=local_world * nodes, local_world_size=local_world,
                   node_rank=0, num_nodes=nodes, master_addr="n1", master_port=29500)


@pytest.mark.parametrize("local_rank", [0, 1, 2, 3])
def test_all_gpus_of_the_node_visible_gives_the_local_rank(local_rank):
    from promoter_dist.distributed import device_index

    assert device_index(_env(local_rank, 4), visible=4) == local_rank
    assert device_index(_env(local_rank, 4), visible=8) == local_rank  # a site listing more than the job uses


@pytest.mark.parametrize("local_rank", [0, 1, 3])
def test_one_gpu_per_task_gives_that_gpu(local_rank):
    """--gpus-per-task=1 / --gpu-bind: each task sees one GPU, at index 0 whatever its local rank."""
    from promoter_dist.distributed import device_index

    assert device_index(_env(local_rank, 4), visible=1, visible_list=str(local_rank)) == 0


def test_more_tasks_than_gpus_is_a_clear_error():
    from promoter_dist.distributed import device_index
    from promoter_dist.errors import UserError

    with pytest.raises(UserError, match=r"4 tasks on this node but 2 GPUs visible to each \(CUDA_VISIBLE_DEVICES=0,1\)"):
        device_index(_env(3, 4), visible=2, visible_list="0,1")
    with pytest.raises(UserError, match="no GPU visible"):
        device_index(_env(0, 1), visible=0, visible_list="")
