"""Streaming loader: node/worker split, equal steps, determinism, exact resume, views, tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from promoter_dist.data.alphabet import encode
from promoter_dist.data.kmer_tokenizer import build_tokenizer
from promoter_dist.data.loader import LoaderConfig, ShardLoader
from promoter_dist.data.nad_words import words_from_codes
from promoter_dist.data.shards import ShardOptions, build_shards, load_manifest
from promoter_dist.errors import UserError
from tests.conftest import DEMO_TRAIN

NAD = LoaderConfig(view="nad", tokens="nad", batch_size=32, shuffle_buffer=600, seed=3)


def _source() -> dict[int, tuple[str, float]]:
    rows = {}
    for number, line in enumerate(DEMO_TRAIN.read_text().splitlines(), start=1):
        seq, y = line.split("\t")
        rows[number] = (seq, float(y))
    return rows


def _lines(batches) -> list[np.ndarray]:
    return [b["line"].numpy().copy() for b in batches]


@pytest.mark.parametrize("workers", [0, 2])
def test_uneven_shards_two_ranks_equal_steps_no_duplicates(small_shards: Path, workers: int) -> None:
    config = LoaderConfig(**{**NAD.__dict__, "num_workers": workers})
    manifest = load_manifest(small_shards)
    shard_rows = [s["rows"] for s in manifest["splits"]["train"]["shards"]]
    assert len(set(shard_rows)) > 1  # the fixture's shards are uneven
    per_rank = []
    for rank in range(2):
        loader = ShardLoader(small_shards, config, rank=rank, world_size=2)
        batches = list(loader)
        assert len(batches) == loader.steps_per_epoch(epoch=0) > 0
        assert all(b["words"].shape == (32, 80) and b["y"].shape == (32,) for b in batches)
        per_rank.append(np.concatenate(_lines(batches)))
    assert len(per_rank[0]) == len(per_rank[1])  # same number of steps on both ranks
    seen = np.concatenate(per_rank)
    assert len(np.unique(seen)) == len(seen)  # no row twice in an epoch
    nad_rows = manifest["splits"]["train"]["rows_nad"]
    assert nad_rows - len(seen) < 2 * 32  # rows left out of an epoch: less than one global batch


def test_rank_and_world_size_come_from_the_caller_only(small_shards: Path, monkeypatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TypeError):
        ShardLoader(small_shards, NAD)  # no fallback to the environment
    with pytest.raises(TypeError):
        ShardLoader(small_shards, NAD, rank=0)
    positional = ShardLoader(small_shards, NAD, 1, 2)
    keyword = ShardLoader(small_shards, NAD, rank=1, world_size=2)
    assert (positional.rank, positional.world_size) == (1, 2)
    assert all(np.array_equal(a, b) for a, b in zip(_lines(positional), _lines(keyword)))
    with pytest.raises(UserError, match=r"rank 2 is not in \[0, world_size=2\)"):
        ShardLoader(small_shards, NAD, rank=2, world_size=2)


def test_deterministic_for_a_seed_and_new_order_each_epoch(small_shards: Path) -> None:
    a = ShardLoader(small_shards, NAD, rank=0, world_size=1)
    b = ShardLoader(small_shards, NAD, rank=0, world_size=1)
    epoch0_a, epoch0_b = _lines(a), _lines(b)
    assert all(np.array_equal(x, y) for x, y in zip(epoch0_a, epoch0_b))
    epoch1 = _lines(a)
    assert a.epoch == 2
    assert not np.array_equal(np.concatenate(epoch0_a), np.concatenate(epoch1))
    other_seed = ShardLoader(small_shards, LoaderConfig(**{**NAD.__dict__, "seed": 4}), rank=0, world_size=1)
    assert not np.array_equal(np.concatenate(_lines(other_seed)), np.concatenate(epoch0_a))
    # shuffling mixes rows across blocks, not only block order
    first = epoch0_a[0]
    assert len(np.unique(first // 128)) > 3


@pytest.mark.parametrize("workers,stop", [(0, 7), (2, 5), (2, 6), (3, 10)])
def test_resume_mid_epoch_is_exact(small_shards: Path, workers: int, stop: int) -> None:
    config = LoaderConfig(**{**NAD.__dict__, "num_workers": workers})
    reference = ShardLoader(small_shards, config, rank=1, world_size=2)
    full = _lines(reference) + _lines(reference)  # two epochs
    interrupted = ShardLoader(small_shards, config, rank=1, world_size=2)
    taken = []
    for batch in interrupted:
        taken.append(batch["line"].numpy().copy())
        if len(taken) == stop:
            break
    state = interrupted.state_dict()
    assert (state["epoch"], state["step"]) == (0, stop)
    resumed = ShardLoader(small_shards, config, rank=1, world_size=2)
    resumed.load_state_dict(state)
    rest = _lines(resumed) + _lines(resumed)
    continued = taken + rest  # the rest of epoch 0, then all of epoch 1
    assert len(continued) == len(full)
    assert all(np.array_equal(x, y) for x, y in zip(continued, full))


def test_resume_with_another_global_batch_is_refused(small_shards: Path) -> None:
    loader = ShardLoader(small_shards, NAD, rank=0, world_size=2)
    state = loader.state_dict()
    with pytest.raises(UserError, match=r"global_batch differs \(64 saved, 32 now\).*engine.grad_accum"):
        ShardLoader(small_shards, NAD, rank=0, world_size=1).load_state_dict(state)
    with pytest.raises(UserError, match="seed"):
        ShardLoader(small_shards, LoaderConfig(**{**NAD.__dict__, "seed": 4}), 0, 2).load_state_dict(state)


def test_resume_on_shards_of_another_source_is_refused(small_shards: Path, tmp_path: Path) -> None:
    """The loader's state names the source by the manifest's xxh3-128: shards of a file with one base changed
    (the same size, the same options) are another order."""
    text = bytearray(DEMO_TRAIN.read_bytes())
    text[20] = ord("A") if text[20] != ord("A") else ord("C")
    (tmp_path / "edited.txt").write_bytes(bytes(text))
    other = build_shards(tmp_path / "edited.txt", tmp_path / "shards", _options_of(small_shards),
                         progress=False).out_dir
    state = ShardLoader(small_shards, NAD, rank=0, world_size=1).state_dict()
    assert state["source_xxh3_128"] == load_manifest(small_shards)["source"]["xxh3_128"]
    with pytest.raises(UserError, match=r"source_xxh3_128 differs"):
        ShardLoader(other, NAD, rank=0, world_size=1).load_state_dict(state)


def _options_of(shards: Path) -> ShardOptions:
    """The ShardOptions a shard folder was built with (from its manifest)."""
    options = load_manifest(shards)["options"]
    return ShardOptions(**{**options, "splits": tuple(tuple(pair) for pair in options["splits"])})


def _global_batches(shards: Path, config: LoaderConfig, world_size: int, grad_accum: int,
                    steps: int | None = None, state: dict | None = None) -> list[np.ndarray]:
    """The sorted row lines of each global batch, from every rank of one shape (two epochs)."""
    shaped = LoaderConfig(**{**config.__dict__, "grad_accum": grad_accum})
    per_rank = []
    for rank in range(world_size):
        loader = ShardLoader(shards, shaped, rank=rank, world_size=world_size)
        if state is not None:
            loader.load_state_dict(state)
        lines = _lines(loader) + _lines(loader)
        per_rank.append([np.concatenate(lines[i:i + grad_accum]) for i in range(0, len(lines), grad_accum)])
    return [np.sort(np.concatenate(parts)) for parts in zip(*per_rank)][:steps]


@pytest.mark.parametrize("config", [NAD, pytest.param(LoaderConfig(view="all", tokens="kmer", batch_size=24,
                                                                    shuffle_buffer=500, chunk_blocks=2, seed=5),
                                                       marks=pytest.mark.slow)])  # 6 to 11 s: every row, every shape
def test_every_shape_sees_the_same_global_batches(small_shards: Path, config: LoaderConfig) -> None:
    """(1 rank x 2 accumulation), (2 x 1), (2 x 1 with 2 workers), (1 x 2 with 3 workers), (4 x 1):
    the same rows in every global batch, step by step, over two epochs (micro batch = half or a quarter)."""
    half = LoaderConfig(**{**config.__dict__, "batch_size": config.batch_size // 2})
    reference = _global_batches(small_shards, config, 1, 2)
    assert len(reference) > 100
    for shards_config, world, accum, workers in ((config, 2, 1, 0), (config, 2, 1, 2), (config, 1, 2, 3),
                                                 (half, 4, 1, 0), (half, 2, 2, 1)):
        shaped = LoaderConfig(**{**shards_config.__dict__, "num_workers": workers})
        got = _global_batches(small_shards, shaped, world, accum)
        assert len(got) == len(reference), (world, accum, workers)
        for step, (a, b) in enumerate(zip(got, reference)):
            assert np.array_equal(a, b), (world, accum, workers, step)


def test_a_run_saved_on_two_ranks_resumes_on_one_with_the_same_batches(small_shards: Path) -> None:
    """The state of 2 ranks x 1 at step 37 continues on 1 rank x 2 accumulation (and 3 workers) with the
    global batches the 2-rank run would have had: the rest of epoch 0, then epoch 1."""
    two = [ShardLoader(small_shards, NAD, rank=r, world_size=2) for r in range(2)]
    streams = [iter(loader) for loader in two]
    for _ in range(37):
        for stream in streams:
            next(stream)
    state = two[0].state_dict()
    assert state["global_step"] == 37 and two[1].state_dict()["global_step"] == 37
    uninterrupted = _global_batches(small_shards, NAD, 2, 1)
    resumed = _global_batches(small_shards, LoaderConfig(**{**NAD.__dict__, "num_workers": 3}), 1, 2, state=state)
    assert len(resumed) == len(uninterrupted) - 37
    assert all(np.array_equal(a, b) for a, b in zip(resumed, uninterrupted[37:]))


def test_a_shape_that_cannot_share_the_lanes_is_refused_naming_the_shapes_that_can(small_shards: Path) -> None:
    config = LoaderConfig(**{**NAD.__dict__, "batch_size": 8, "lanes": 8})  # global batch 24: gcd 8 lanes
    with pytest.raises(UserError) as caught:
        ShardLoader(small_shards, config, rank=0, world_size=3)
    message = str(caught.value)
    assert "3 rank(s) x 1 accumulation step(s) = 3 micro batches" in message and "one of 1, 2, 4, 8" in message


def test_nad_words_and_labels_match_the_source(small_shards: Path) -> None:
    source = _source()
    batch = next(iter(ShardLoader(small_shards, NAD, rank=0, world_size=1)))
    for i, line in enumerate(batch["line"].tolist()):
        seq, y = source[line]
        assert len(seq) == 110 and "N" not in seq
        assert np.array_equal(batch["words"][i].numpy(), words_from_codes(encode(seq)[None])[0])
        assert batch["y"][i].item() == pytest.approx(y, rel=1e-6)


@pytest.mark.parametrize("flank_bp", [150, 23])
def test_kmer_tokens_equal_the_hf_tokenizer(small_shards: Path, flank_bp: int) -> None:
    source = _source()
    config = LoaderConfig(view="all", tokens="kmer", batch_size=64, shuffle=False, kmer_flank_bp=flank_bp)
    batch = next(iter(ShardLoader(small_shards, config, rank=0, world_size=1)))
    tokenizer = build_tokenizer(flank_bp=flank_bp)
    for i, line in enumerate(batch["line"].tolist()):
        expected = tokenizer(source[line][0])["input_ids"]
        got = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
        assert got == expected


def test_top_view_and_bases(small_shards: Path) -> None:
    manifest = load_manifest(small_shards)
    threshold = manifest["labels"]["top_threshold"]
    config = LoaderConfig(view="top", tokens="bases", batch_size=16, shuffle=False, drop_last=False)
    loader = ShardLoader(small_shards, config, rank=0, world_size=1)
    ys = torch.cat([b["y"] for b in loader])
    assert len(ys) == manifest["splits"]["train"]["rows_top"]
    assert bool((ys >= threshold).all())


def test_evaluation_mode_sees_every_row_once(small_shards: Path) -> None:
    manifest = load_manifest(small_shards)
    config = LoaderConfig(split="val", batch_size=50, shuffle=False, drop_last=False, num_workers=2)
    lines = []
    for rank in range(2):
        lines += [b["line"] for b in ShardLoader(small_shards, config, rank=rank, world_size=2)]
    lines = torch.cat(lines).numpy()
    assert sorted(lines.tolist()) == sorted(set(lines.tolist())) and len(lines) == manifest["splits"]["val"]["rows"]


@pytest.mark.parametrize("config", [NAD, LoaderConfig(tokens="kmer", batch_size=64, chunk_blocks=3)])
def test_block_checks_change_no_batch(small_shards: Path, config: LoaderConfig) -> None:
    checked = list(ShardLoader(small_shards, config, rank=0, world_size=1))
    unchecked = list(ShardLoader(small_shards, config, rank=0, world_size=1, verify=False))
    assert len(checked) == len(unchecked) > 0
    for a, b in zip(checked, unchecked):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lanes_hold_equal_rows_whatever_the_shape(small_shards: Path) -> None:
    from promoter_dist.data.loader import plan_lanes

    manifest = load_manifest(small_shards)
    plan = plan_lanes(manifest, str(small_shards), NAD, epoch=0, global_batch=96)
    assert plan.lanes == 32 and plan.rows_per_lane == 3  # gcd(64, 96)
    rows = [sum(p.stop - p.start for p in lane) for lane in plan.pieces]
    assert max(rows) - min(rows) <= 1 and sum(rows) == manifest["splits"]["train"]["rows_nad"]
    assert plan.steps == min(rows) // 3
    for lane in plan.pieces:  # pieces are row ranges inside their units
        assert all(0 <= p.start < p.stop <= p.unit.rows for p in lane)


def test_too_little_data_is_a_clear_error(small_shards: Path) -> None:
    with pytest.raises(UserError, match="too few rows"):
        ShardLoader(small_shards, LoaderConfig(split="val", batch_size=4096), rank=0, world_size=1)
    with pytest.raises(UserError, match="view='nad'"):
        LoaderConfig(tokens="nad")
    with pytest.raises(UserError, match="split 'nope'"):
        ShardLoader(small_shards, LoaderConfig(split="nope"), rank=0, world_size=1)


def _children() -> set[int]:
    import os

    pid = os.getpid()
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def test_persistent_workers_serve_every_epoch_and_evaluation_reads_with_workers(small_shards: Path) -> None:
    """Workers are forked once and kept: the second epoch comes from the same processes, in the
    same order a loader without workers would give; evaluation with workers sees every row once."""
    config = LoaderConfig(**{**NAD.__dict__, "num_workers": 2})
    loader = ShardLoader(small_shards, config, rank=0, world_size=1)
    before = _children()
    first = _lines(loader)
    workers = _children() - before
    assert len(workers) == 2
    second = _lines(loader)
    assert _children() - before == workers  # the same two processes, still alive
    fresh = ShardLoader(small_shards, LoaderConfig(**{**config.__dict__, "persistent_workers": False}), 0, 1)
    reference = _lines(fresh) + _lines(fresh)
    assert len(reference) == len(first) + len(second)
    assert all(np.array_equal(a, b) for a, b in zip(first + second, reference))
    evaluation = LoaderConfig(split="val", batch_size=50, shuffle=False, drop_last=False, num_workers=2)
    val = ShardLoader(small_shards, evaluation, rank=0, world_size=1)
    for _ in range(2):  # two evaluations from the same workers
        lines = np.concatenate(_lines(val))
        assert len(lines) == len(set(lines.tolist())) == load_manifest(small_shards)["splits"]["val"]["rows"]


def test_resume_ignores_how_batches_reach_the_device(small_shards: Path) -> None:
    loader = ShardLoader(small_shards, NAD, rank=0, world_size=1)
    next(iter(loader))
    state = loader.state_dict()
    on_gpu = LoaderConfig(**{**NAD.__dict__, "pin_memory": True, "persistent_workers": False})
    resumed = ShardLoader(small_shards, on_gpu, rank=0, world_size=1)
    resumed.load_state_dict(state)  # a run moved from CPU ranks to GPU ranks
    assert (resumed.epoch, resumed.step) == (0, 1)
    moved = ShardLoader(small_shards, LoaderConfig(**{**NAD.__dict__, "batch_size": 16, "grad_accum": 2}), 0, 1)
    moved.load_state_dict(state)  # the same global batch of 32 in two micro batches: step 1 is micro batch 2
    assert (moved.epoch, moved.step) == (0, 2)
