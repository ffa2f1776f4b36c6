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
