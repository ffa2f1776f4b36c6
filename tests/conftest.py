"""Shared fixtures: the real sample files and small shard folders built from them."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "dream2022" / "samples"
DEMO_TRAIN = SAMPLES / "demo_train_6370.txt"
TRAIN_FIRST_1000 = SAMPLES / "train_first1000.txt"
TEST_LABELLED = SAMPLES / "test_labelled_first2999.txt"
NAD_VECTORS = REPO / "data" / "dream2022" / "nad_glove" / "vectors.txt"


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One torch thread per test process: pytest-xdist already runs a process per core, and
    oversubscribed cores made the small models several times slower. Restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> Path:
    """The 6,370 real demo rows in small blocks: 9 uneven train shards and 1 val shard."""
    from promoter_dist.data.shards import ShardOptions, build_shards

    out = tmp_path_factory.mktemp("small_shards")
    build_shards(DEMO_TRAIN, out, ShardOptions(rows_per_block=128, blocks_per_shard=5), workers=2, progress=False)
    return out


LAUNCHER_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def lone_process_group():
    """This test process as one rank alone with a DeepSpeed process group, as plain ``python train.py``
    runs; yields its DistEnv. The environment, thread count, process group and log handlers are
    restored after (``train.main`` called in the module finds the group and uses it)."""
    import logging
    import os

    import deepspeed.comm as ds_comm
    import torch

    from promoter_dist import distributed as dist
    from promoter_dist.launch.environment import from_launcher

    saved, threads = dict(os.environ), torch.get_num_threads()
    for key in LAUNCHER_KEYS:
        os.environ.pop(key, None)
    started = not dist.initialized()
    try:
        env = from_launcher()
        dist.init_distributed(env)
        yield env
    finally:
        if started and torch.distributed.is_initialized():
            ds_comm.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)
        torch.set_num_threads(threads)  # init_distributed sizes the CPU thread pool per rank
        logger = logging.getLogger("promoter_dist")
        for handler in list(logger.handlers):
            handler.close()
            logger.removeHandler(handler)
