"""Streaming loader: block shards -> model-ready batches, equal steps on every rank.

The caller says which rank this is and how many there are (``ShardLoader(shard_dir,
config, rank, world_size)``); the loader reads no environment. The pipeline is a chain
of small generator stages (composed with ``webdataset.DataPipeline``); each consumer
(one DataLoader worker of one rank) runs it over its own share of the data:

    units of `chunk_blocks` consecutive blocks, permuted per epoch (same on every rank)
    -> split over ranks, then over workers  (explicit: balanced_split by row count)
    -> read_units     (one read per unit; each block's checksum and arrays checked; shards.read_block_range)
    -> select_view    (all rows / NAD-eligible / top-expression subset, padded to one width)
    -> shuffle_rows   (a vectorised shuffle buffer of `shuffle_buffer` rows; off without shuffle)
    -> batch_rows     (exactly this worker's quota of batches)
    -> to_model_inputs (NAD words, 3-mer BERT ids, LegNet windows or raw codes, as torch tensors)

Units come from the manifest's block index (``shards.BlockIndex``): its row count
of the view, byte offset, size and checksum; webdataset only chains the stages.

Nothing read is trusted: a block whose bytes differ from its checksum, or whose arrays
break the schema, is a ``UserError`` naming the shard file, block and byte offset on the
rank that reads it (from a DataLoader worker too, as the same one line).

Equal steps (``drop_last``, training): the number of batches per epoch is computed
from the manifest's row counts alone, identically on every rank, as the largest count
that every worker of every rank can fill; no rank ever waits on another that ran dry.
Rows beyond it (at most about one block per worker plus a batch) are skipped for that
epoch only: the next epoch permutes differently. Without ``drop_last`` (evaluation)
every row comes once, each worker's last batch may be partial and ranks may differ
by a few batches.

Determinism and exact resume: everything is a function of the shards, the config,
epoch, rank and world size. With ``drop_last``, worker w yields batches w, w+W,
w+2W, ... of its rank's sequence (quotas never increase with w, so torch's in-order
round robin delivers exactly that order). ``state_dict()`` is (epoch, batches
consumed); a resumed loader replays each worker's stream up to its position without
building tensors, and rotates worker roles so the next batch is the one that would
have come next.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from multiprocessing.sharedctypes import RawArray
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..choices import check_choice_fields
from ..errors import ConfigError, UserError
from .alphabet import NOMINAL_LENGTH
from .nad_words import words_from_codes
from .onehot import window_codes
from .shards import (
    FLAG_INTEGER,
    FLAG_NAD,
    MANIFEST,
    VIEWS,
    BlockIndex,
    ShardBlockError,
    check_nad_rows,
    labels_required,
    load_manifest,
    padded_codes,
    read_block_range,
    shard_blocks,
)

View = Literal["all", "nad", "top"]
"""Row subsets a loader streams: the keys of ``shards.VIEWS``."""
Tokens = Literal["nad", "kmer", "bases", "onehot"]
"""Model inputs a loader makes: NAD 5-mer word ids, 3-mer BERT ids, base codes or LegNet's one-hot windows."""
KmerFrame = Literal[0, 1, 2]
"""Reading frame of the 3-mer tokens."""


@dataclass(frozen=True)
class LoaderConfig:
    """What to stream and how."""

    split: str = "train"
    """Split folder entry in the manifest (train / val / test)."""
    view: View = "all"
    """Row subset: 'all', 'nad' (110 bp, no N) or 'top' (top-expression subset)."""
    tokens: Tokens = "bases"
    """Model inputs: 'nad' (5-mer word ids), 'kmer' (3-mer BERT ids), 'bases' (codes) or 'onehot' (LegNet's windows)."""
    batch_size: int = 256
    """Rows per batch on each rank."""
    shuffle: bool = True
    """Permute units per epoch and shuffle rows through the buffer."""
    shuffle_buffer: int = 16384
    """Rows held by the shuffle buffer of each worker."""
    chunk_blocks: int = 1
    """Consecutive blocks read with one seek; the unit of splitting over ranks and workers."""
    drop_last: bool = True
    """Equal full batches on every rank (training). False: every row once, last batch partial (evaluation)."""
    seed: int = 0
    """Seed of the permutation and the shuffle buffer."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0: stream in the training process)."""
    kmer_frame: KmerFrame = 0
    """Reading frame of the 3-mer tokens."""
    kmer_all_frames: bool = False
    """3-mer tokens in all three frames: input_ids and attention_mask (B, 3, T) instead of (B, T)."""
    onehot_window: int = 150
    """Length (bp) of the 'onehot' windows: vector sequence + the row without its 5' adapter, the last this many."""
    pin_memory: bool = False
    """Page-locked batches, so that a copy to the GPU with ``non_blocking=True`` overlaps compute (GPU ranks)."""
    persistent_workers: bool = True
    """Keep the worker processes from one epoch (or evaluation) to the next instead of forking new ones."""

    def __post_init__(self) -> None:
        # Built in code, not through the config coercer: the choices are checked here, from the types.
        check_choice_fields(self, "loader")
        if self.tokens == "nad" and self.view != "nad":
            raise ConfigError("loader.tokens='nad' needs loader.view='nad' (NAD words exist only for 110-bp rows without N)")
        for key in ("batch_size", "shuffle_buffer", "chunk_blocks"):
            if getattr(self, key) < 1:
                raise ConfigError(f"loader.{key} must be >= 1, not {getattr(self, key)}")
        if self.num_workers < 0:
            raise ConfigError(f"loader.num_workers must be >= 0, not {self.num_workers}")


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Unit:
    """A run of consecutive blocks of one shard: the unit of work."""

    path: str
    first_block: int  # number of blocks[0] in its shard, for messages
    blocks: tuple[BlockIndex, ...]
    rows: int  # rows of the requested view


def epoch_units(manifest: dict, shard_dir: str, config: LoaderConfig, epoch: int) -> list[Unit]:
    """All units of the split, permuted for ``epoch`` when shuffling (same on every rank)."""
    if config.split not in manifest["splits"]:
        raise UserError(f"split {config.split!r} not in the shards (have: {', '.join(manifest['splits'])})")
    manifest_path = Path(shard_dir) / MANIFEST
    units = []
    for shard in manifest["splits"][config.split]["shards"]:
        blocks = shard_blocks(shard, manifest_path)
        for i, block in enumerate(blocks):
            if block.max_length > manifest["max_row_length"]:  # rows are laid out at that width
                raise UserError(f"{manifest_path}: shard {shard['name']} block {i}: max_length {block.max_length} "
                                f"exceeds the manifest's max_row_length {manifest['max_row_length']}")
        for i in range(0, len(blocks), config.chunk_blocks):
            run = tuple(blocks[i : i + config.chunk_blocks])
            rows = sum(b.rows_in_view(config.view) for b in run)
            if rows:
                units.append(Unit(str(Path(shard_dir) / shard["file"]), i, run, rows))
    if config.shuffle:
        order = np.random.default_rng([config.seed, epoch, 0x5EED]).permutation(len(units))
        units = [units[i] for i in order]
    return units


def balanced_split(units: list[Unit], parts: int) -> list[list[Unit]]:
    """Deal units to ``parts`` consumers, each to the one with the fewest rows so far."""
    out: list[list[Unit]] = [[] for _ in range(parts)]
    load = np.zeros(parts, dtype=np.int64)
    for unit in units:
        target = int(np.argmin(load))  # ties go to the lowest index: deterministic
        out[target].append(unit)
        load[target] += unit.rows
    return out


def worker_quotas(workers: int, total: int) -> list[int]:
    """Batches per worker when the rank yields ``total``: batch j comes from worker j % W."""
    return [total // workers + (1 if w < total % workers else 0) for w in range(workers)]


def _rank_capacity(rows_per_worker: list[int], batch_size: int) -> int:
    """Most batches a rank can yield in round-robin order with these worker rows."""
    full = [r // batch_size for r in rows_per_worker]
    q = min(full)
    t = 0
    while t < len(full) and full[t] > q:
        t += 1
    return q * len(full) + t


@dataclass(frozen=True)
class EpochPlan:
    """Who reads what in one epoch, and how many batches each yields."""

    units: list[list[list[Unit]]]  # [rank][worker] -> units
    steps: int  # batches per rank (drop_last) ...
    steps_per_rank: list[int]  # ... or per rank when not dropping the last batch
    quotas: list[list[int]]  # [rank][worker] -> batches


def plan_epoch(manifest: dict, shard_dir: str, config: LoaderConfig, epoch: int, world_size: int) -> EpochPlan:
    workers = max(config.num_workers, 1)
    units = epoch_units(manifest, shard_dir, config, epoch)
    # Node split, then worker split: each balanced once, identically on every rank.
    per_rank = [balanced_split(rank_units, workers) for rank_units in balanced_split(units, world_size)]
    rows = [[sum(u.rows for u in w) for w in r] for r in per_rank]
    if config.drop_last:
        steps = min(_rank_capacity(r, config.batch_size) for r in rows)
        quotas = [worker_quotas(workers, steps) for _ in rows]
        return EpochPlan(per_rank, steps, [steps] * world_size, quotas)
    # Evaluation: every row once; each worker's last batch may be partial.
    quotas = [[-(-n // config.batch_size) for n in r] for r in rows]
    return EpochPlan(per_rank, max(sum(q) for q in quotas), [sum(q) for q in quotas], quotas)


# --------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class BlockAt:
    """Where a decoded block comes from: its shard file, number in the shard and byte offset (for messages)."""

    path: str
    number: int
    offset: int


def read_units(labelled: bool, verify: bool = True):
    """Stage: each unit's decoded blocks, in order, as (where, block); every block checked (checksum, schema).

    ``labelled``: every label must be finite (shards built from a labelled file).
    ``verify=False`` skips the checks; only the benchmark that measures their cost uses it.
    """

    def stage(units: Iterable[Unit]) -> Iterator[tuple[BlockAt, dict[str, np.ndarray]]]:
        for unit in units:
            decoded = read_block_range(unit.path, unit.blocks, unit.first_block, labelled, verify)
            for number, (entry, block) in enumerate(zip(unit.blocks, decoded), start=unit.first_block):
                yield BlockAt(unit.path, number, entry.offset), block

    return stage


def select_view(view: str, width: int, verify: bool = True):
    """Stage: keep the rows of ``view`` and lay them out as fixed-width row arrays.

    With ``verify``, the NAD view's rows are checked to be 110 bp of A C G T on their
    padded codes (``shards.check_nad_rows``) before words are made of them.
    """
    bit = VIEWS[view]

    def stage(blocks: Iterable[tuple[BlockAt, dict[str, np.ndarray]]]) -> Iterator[dict[str, np.ndarray]]:
        for where, block in blocks:
            rows = np.flatnonzero(block["flags"] & bit) if bit else None
            if rows is not None and not len(rows):
                continue
            pick = slice(None) if rows is None else rows
            codes = padded_codes(block, rows, width)
            lengths = block["len"][pick].astype(np.int64)
            if verify and bit == FLAG_NAD:
                problem = check_nad_rows(codes, lengths)
                if problem is not None:
                    raise ShardBlockError(where.path, where.number, where.offset, problem)
            yield {"codes": codes, "len": lengths, "y": block["y"][pick],
                   "line": block["line"][pick].astype(np.int64), "flags": block["flags"][pick]}

    return stage


def _take(rows: dict[str, np.ndarray], idx) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in rows.items()}


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def shuffle_rows(capacity: int, rng: np.random.Generator | None):
    """Stage: a shuffle buffer over rows, vectorised per block.

    Once full, each incoming block of b rows evicts b slots drawn at random and takes
    their place; at the end the rest leaves in random order. Every row leaves once.
    """

    def stage(chunks: Iterable[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
        if rng is None:
            yield from chunks
            return
        buffer: dict[str, np.ndarray] | None = None
        size = 0
        for chunk in chunks:
            n = len(chunk["len"])
            start = 0
            if buffer is None:
                buffer = {k: np.empty((capacity,) + v.shape[1:], v.dtype) for k, v in chunk.items()}
            while start < n:
                if size < capacity:  # filling
                    take = min(capacity - size, n - start)
                    for k, v in chunk.items():
                        buffer[k][size : size + take] = v[start : start + take]
                    size += take
                    start += take
                    continue
                take = min(capacity, n - start)
                slots = rng.permutation(capacity)[:take]
                out = _take(buffer, slots)
                for k, v in chunk.items():
                    buffer[k][slots] = v[start : start + take]
                start += take
                yield out
        if buffer is not None and size:
            yield _take(buffer, rng.permutation(size))

    return stage


def batch_rows(batch_size: int, quota: int, skip: int, partial_last: bool):
    """Stage: cut rows into ``quota`` batches; the first ``skip`` are only counted (resume)."""

    def stage(chunks: Iterable[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray] | None]:
        pending: list[dict[str, np.ndarray]] = []
        held = 0
        made = 0
        for chunk in chunks:
            if made >= quota:
                return
            pending.append(chunk)
            held += len(chunk["len"])
            if held < batch_size:
                continue
            rows = _concat(pending)
            at = 0
            while held - at >= batch_size and made < quota:
                yield None if made < skip else _take(rows, slice(at, at + batch_size))
                at += batch_size
                made += 1
            pending = [_take(rows, slice(at, None))]
            held -= at
        if partial_last and held and made < quota:
            rows = _concat(pending)
            yield None if made < skip else rows
            made += 1
        if made < quota:
            raise RuntimeError(f"loader made {made} batches, planned {quota}: the shards differ from their manifest")

    return stage


def to_model_inputs(tokens: str, kmer_frame: int, kmer_all_frames: bool = False, onehot_window: int = 150):
    """Stage: row arrays -> torch tensors for the model (None passes through: skipped batch)."""

    def stage(batches: Iterable[dict[str, np.ndarray] | None]) -> Iterator[dict[str, torch.Tensor] | None]:
        for rows in batches:
            if rows is None:
                yield None
                continue
            out = {"y": torch.from_numpy(np.ascontiguousarray(rows["y"])), "line": torch.from_numpy(rows["line"])}
            if tokens == "nad":
                out["words"] = torch.from_numpy(words_from_codes(rows["codes"]).astype(np.int64))
            elif tokens == "kmer":
                from .kmer_tokenizer import encode_for_model

                ids, mask = encode_for_model(rows["codes"], rows["len"], kmer_frame, kmer_all_frames)
                out["input_ids"], out["attention_mask"] = torch.from_numpy(ids), torch.from_numpy(mask)
                out["lengths"] = torch.from_numpy(rows["len"])  # where the row's own tokens are
            elif tokens == "onehot":
                # Window codes and the singleton flag; data.onehot.one_hot expands them on the model's device.
                out["window"] = torch.from_numpy(window_codes(rows["codes"], rows["len"], onehot_window))
                out["singleton"] = torch.from_numpy((rows["flags"] & FLAG_INTEGER).astype(np.uint8))
            else:
                width = int(rows["len"].max(initial=0))
                out["codes"] = torch.from_numpy(rows["codes"][:, :width].astype(np.int64))
                out["lengths"] = torch.from_numpy(rows["len"])
            yield out

    return stage


# --------------------------------------------------------------------------- dataset and loader


@dataclass(frozen=True)
class _WorkerFailure:
    """A UserError raised in a DataLoader worker, carried to the rank as data.

    torch re-raises a worker's exception with its traceback folded into the message;
    the rank raises ``UserError(message)`` instead, the same one line as without workers.
    """

    message: str


class _RankStream(IterableDataset):
    """One rank's batches, one epoch per pass; under a DataLoader each worker streams its part.

    The pass's epoch and resume step sit in shared memory: the rank sets them before each pass,
    and persistent workers, forked once, read them when the pass starts.
    """

    def __init__(self, manifest: dict, shard_dir: str, config: LoaderConfig, rank: int, world_size: int,
                 width: int, verify: bool = True):
        self.manifest, self.shard_dir, self.config = manifest, shard_dir, config
        self.rank, self.world_size, self.width = rank, world_size, width
        self.verify = verify
        self._position = RawArray("q", 2)  # (epoch, start step) of the next pass

    def start_pass(self, epoch: int, start_step: int) -> EpochPlan:
        """Set the next pass to ``epoch`` from batch ``start_step`` on; returns its plan."""
        self._position[0], self._position[1] = epoch, start_step
        return plan_epoch(self.manifest, self.shard_dir, self.config, epoch, self.world_size)

    def worker_stream(self, worker_slot: int) -> Iterator[dict[str, torch.Tensor] | None]:
        """The batches of logical worker ``(slot + start_step) % W`` from its resume point on."""
        import webdataset as wds

        epoch, start_step = self._position[0], self._position[1]
        plan = plan_epoch(self.manifest, self.shard_dir, self.config, epoch, self.world_size)
        workers = max(self.config.num_workers, 1)
        logical = (worker_slot + start_step) % workers
        skip = len(range(logical, start_step, workers))  # its batches already consumed
        quota = plan.quotas[self.rank][logical]
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, epoch, self.rank, logical]) if cfg.shuffle else None
        units = plan.units[self.rank][logical]
        pipeline = wds.DataPipeline(
            lambda: iter(units),
            read_units(labels_required(self.manifest), self.verify),
            select_view(cfg.view, self.width, self.verify),
            shuffle_rows(cfg.shuffle_buffer, rng),
            batch_rows(cfg.batch_size, quota, skip, partial_last=not cfg.drop_last),
            to_model_inputs(cfg.tokens, cfg.kmer_frame, cfg.kmer_all_frames, cfg.onehot_window),
        )
        return iter(pipeline)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor] | _WorkerFailure]:
        info = get_worker_info()
        slot = 0 if info is None else info.id
        try:
            for batch in self.worker_stream(slot):
                if batch is not None:
                    yield batch
        except UserError as exc:
            if info is None:
                raise
            yield _WorkerFailure(str(exc))


def _layout(config: dict) -> dict:
    """The loader settings that decide which rows come when (not how they reach the device)."""
    return {k: v for k, v in config.items() if k not in ("pin_memory", "persistent_workers")}


class ShardLoader:
    """Iterable over model-ready batches of one split, for rank ``rank`` of ``world_size``, epoch after epoch.

    ``for batch in loader`` runs the current epoch from its current position and then
    advances to the next epoch. ``state_dict()`` after any batch and
    ``load_state_dict()`` on a fresh loader continue exactly from that batch.
    """

    def __init__(self, shard_dir: str | os.PathLike, config: LoaderConfig, rank: int, world_size: int,
                 verify: bool = True):
        """``verify=False`` skips the per-block checksum and schema checks: only to measure what they cost."""
        if not 0 <= rank < world_size:
            raise UserError(f"loader: rank {rank} is not in [0, world_size={world_size})")
        self.rank = rank
        self.world_size = world_size
        self.shard_dir = str(shard_dir)
        self.config = config
        self.verify = verify
        self.manifest = load_manifest(shard_dir)
        # Rows are laid out at the widest row the view can hold: 110 bp for NAD, else the data's longest.
        self.width = NOMINAL_LENGTH if config.view == "nad" else max(int(self.manifest["max_row_length"]), 1)
        self.epoch = 0
        self.step = 0
        self._stream = _RankStream(self.manifest, self.shard_dir, config, rank, world_size, self.width, verify)
        self._batches: Iterable | None = None  # the DataLoader, made at the first pass and kept
        # Training needs a full batch on every rank; evaluation only some row somewhere (a rank may hold none).
        if plan_epoch(self.manifest, self.shard_dir, config, 0, self.world_size).steps == 0:
            raise UserError(
                f"{self.shard_dir}: split {config.split!r} (view {config.view!r}) has too few rows for one batch of "
                f"{config.batch_size} on each of {self.world_size} rank(s) x {max(config.num_workers, 1)} worker(s)"
            )

    def steps_per_epoch(self, epoch: int | None = None) -> int:
        """Batches this rank yields in an epoch (the same on every rank when drop_last)."""
        plan = plan_epoch(self.manifest, self.shard_dir, self.config, self.epoch if epoch is None else epoch, self.world_size)
        return plan.steps_per_rank[self.rank]

    def __len__(self) -> int:
        return self.steps_per_epoch()

    def batches(self) -> Iterable:
        """The batch source: the stream itself, or a DataLoader over it (workers, pinned memory)."""
        cfg = self.config
        if self._batches is None:
            if cfg.num_workers > 0 or cfg.pin_memory:
                self._batches = DataLoader(self._stream, batch_size=None, num_workers=cfg.num_workers,
                                           pin_memory=cfg.pin_memory,
                                           persistent_workers=cfg.persistent_workers and cfg.num_workers > 0)
            else:
                self._batches = self._stream
        return self._batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        total = self._stream.start_pass(self.epoch, self.step).steps_per_rank[self.rank]
        for batch in self.batches():
            if isinstance(batch, _WorkerFailure):
                raise UserError(batch.message)
            self.step += 1
            yield batch
        if self.step != total:
            raise RuntimeError(f"rank {self.rank} yielded {self.step} batches in epoch {self.epoch}, planned {total}")
        self.epoch += 1
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch taken from the iterator."""
        return {
            "epoch": self.epoch, "step": self.step, "world_size": self.world_size,
            "num_workers": self.config.num_workers, "config": asdict(self.config),
            "source_sha256": self.manifest["source"]["sha256"],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; the data layout (world size, workers, config) must match."""
        for key, mine in (("world_size", self.world_size), ("num_workers", self.config.num_workers),
                          ("config", _layout(asdict(self.config))),
                          ("source_sha256", self.manifest["source"]["sha256"])):
            saved = _layout(state.get(key)) if key == "config" and isinstance(state.get(key), dict) else state.get(key)
            if saved != mine:
                raise UserError(
                    f"loader state: {key} differs ({saved!r} saved, {mine!r} now); an exact resume needs "
                    "the same shards, world size, workers and loader config"
                )
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
