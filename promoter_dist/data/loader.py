"""Streaming loader: block shards -> model-ready batches, the same global order on every shape.

The caller says which rank this is and how many there are (``ShardLoader(shard_dir,
config, rank, world_size)``); the loader reads no environment. The pipeline is a chain
of small generator stages (composed with ``webdataset.DataPipeline``).

Training (``drop_last``): the global order. The sequence of global batches (the rows of each
optimizer step, and their order) is a function of the shards, the seed, the epoch and the
global batch G = batch_size x ranks x grad_accum only (:class:`LanePlan`):

    units of `chunk_blocks` consecutive blocks, permuted per epoch
    -> laid end to end and cut into L lanes of equal rows (L = gcd(config.lanes, G))
    -> per lane: read_pieces (each block checked) -> shuffle_rows (a buffer of shuffle_buffer / L
       rows, random stream keyed by seed, epoch and lane)
    -> global batch t: the next G / L rows of lane 0, then of lane 1, ...

Ranks, accumulation steps and DataLoader workers only consume it: micro batch j of a step
(j = rank x grad_accum + a) is the run of lanes [j L/(R A), (j+1) L/(R A)), so R x A must
divide L; a rank's workers each read every W-th of its lanes and hand over one item per
step, which the rank puts back in lane order, cuts into its micro batches and turns into
model inputs (to_model_inputs: NAD words, 3-mer BERT ids, LegNet windows or raw codes).
Every lane, rank and worker has the same number of steps, computed from the manifest's row
counts alone; at most G rows per epoch are left out. ``state_dict()`` is (epoch, steps
done); a loader resumed on any shape with the same G replays its lanes up to that step
without building tensors.

Evaluation (no ``drop_last``): every row once. Units are split over ranks, then workers,
balanced by rows; each worker's last batch may be partial and ranks may differ by a few
batches (read_units -> select_view -> batch_rows -> to_model_inputs).

Units come from the manifest's block index (``shards.BlockIndex``): its row count of the
view, byte offset, size and checksum; webdataset only chains the stages. Nothing read is
trusted: a block whose bytes differ from its checksum, or whose arrays break the schema, is
a ``UserError`` naming the shard file, block and byte offset on the rank that reads it (from
a DataLoader worker too, as the same one line).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from multiprocessing.sharedctypes import RawArray
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Literal

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
    nad_row_codes,
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
    kmer_flank_bp: int = 150
    """Vector extension on each side of a row for the 3-mer tokens, its adapters included (kmer_tokenizer.vector_flanks)."""
    onehot_window: int = 150
    """Length (bp) of the 'onehot' windows: vector sequence + the row without its 5' adapter, the last this many."""
    grad_accum: int = 1
    """Micro batches per optimizer step on each rank: the global batch is batch_size x ranks x grad_accum."""
    lanes: int = 64
    """Most lanes of the training order: it has gcd(lanes, global batch); ranks x grad_accum must divide that."""
    pin_memory: bool = False
    """Page-locked batches, so that a copy to the GPU with ``non_blocking=True`` overlaps compute (GPU ranks)."""
    persistent_workers: bool = True
    """Keep the worker processes from one epoch (or evaluation) to the next instead of forking new ones."""

    LEAST: ClassVar[dict[str, int]] = {"batch_size": 1, "shuffle_buffer": 1, "chunk_blocks": 1, "grad_accum": 1,
                                       "lanes": 1, "num_workers": 0}
    """The least value of each count; the run config's sections check their copies of these fields here too."""

    def __post_init__(self) -> None:
        # Built in code, not through the config coercer: the choices are checked here, from the types.
        check_choice_fields(self, "loader")
        if self.tokens == "nad" and self.view != "nad":
            raise ConfigError("loader.tokens='nad' needs loader.view='nad' (NAD words exist only for 110-bp rows without N)")
        self.check_counts({key: getattr(self, key) for key in self.LEAST}, "loader")

    @classmethod
    def check_counts(cls, values: dict[str, int], prefix: str) -> None:
        """Each of ``values`` (fields of :data:`LEAST`) at least its least value; else a ConfigError naming ``prefix.key``."""
        for key, value in values.items():
            if value < cls.LEAST[key]:
                raise ConfigError(f"{prefix}.{key} must be >= {cls.LEAST[key]}, not {value}")


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
        path = str(Path(shard_dir) / shard["file"])  # once per shard, not per unit: thousands per epoch
        for i, block in enumerate(blocks):
            if block.max_length > manifest["max_row_length"]:  # rows are laid out at that width
                raise UserError(f"{manifest_path}: shard {shard['name']} block {i}: max_length {block.max_length} "
                                f"exceeds the manifest's max_row_length {manifest['max_row_length']}")
        for i in range(0, len(blocks), config.chunk_blocks):
            run = tuple(blocks[i : i + config.chunk_blocks])
            rows = sum(b.rows_in_view(config.view) for b in run)
            if rows:
                units.append(Unit(path, i, run, rows))
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


@dataclass(frozen=True)
class EpochPlan:
    """Evaluation: who reads what, and how many batches each worker yields (every row once)."""

    units: list[list[list[Unit]]]  # [rank][worker] -> units
    steps_per_rank: list[int]  # batches per rank (ranks may differ by a few)
    quotas: list[list[int]]  # [rank][worker] -> batches, the last one partial


def plan_epoch(manifest: dict, shard_dir: str, config: LoaderConfig, epoch: int, world_size: int) -> EpochPlan:
    """Every row of the split once: units split over ranks, then workers, each balanced by rows."""
    workers = max(config.num_workers, 1)
    units = epoch_units(manifest, shard_dir, config, epoch)
    per_rank = [balanced_split(rank_units, workers) for rank_units in balanced_split(units, world_size)]
    quotas = [[-(-sum(u.rows for u in w) // config.batch_size) for w in r] for r in per_rank]
    return EpochPlan(per_rank, [sum(q) for q in quotas], quotas)


# --------------------------------------------------------------------------- training: the global order


def lane_count(lanes: int, global_batch: int) -> int:
    """Lanes of the global order: the most that split every global batch evenly (gcd with ``lanes``)."""
    return math.gcd(lanes, global_batch)


@dataclass(frozen=True)
class LanePiece:
    """Part of a lane: the view rows ``[start, stop)`` of one unit."""

    unit: Unit
    start: int
    stop: int


@dataclass(frozen=True)
class LanePlan:
    """The global sample order of one training epoch, for every shape that keeps the global batch.

    The epoch's units, permuted, are laid end to end and cut into ``lanes`` runs of equal rows;
    each lane shuffles its own rows (a buffer and a random stream keyed by seed, epoch and lane).
    Global batch t is, lane by lane in order, the next ``rows_per_lane`` rows of every lane.
    """

    lanes: int
    rows_per_lane: int
    """Rows each lane gives to one global batch: global batch / lanes."""
    pieces: list[list[LanePiece]]
    """[lane] -> the unit ranges it reads, in order."""
    steps: int
    """Global batches in the epoch: the same for every lane, rank and worker."""


def plan_lanes(manifest: dict, shard_dir: str, config: LoaderConfig, epoch: int, global_batch: int) -> LanePlan:
    """The epoch's :class:`LanePlan`: a function of the shards, the config, ``epoch`` and the global batch only."""
    lanes = lane_count(config.lanes, global_batch)
    units = epoch_units(manifest, shard_dir, config, epoch)
    ends = np.cumsum([u.rows for u in units], dtype=np.int64)
    total = int(ends[-1]) if len(units) else 0
    starts = ends - np.array([u.rows for u in units], dtype=np.int64)
    cuts = [total * lane // lanes for lane in range(lanes + 1)]  # equal rows per lane, +-1
    pieces: list[list[LanePiece]] = []
    for lane in range(lanes):
        lo, hi = cuts[lane], cuts[lane + 1]
        first = int(np.searchsorted(ends, lo, side="right"))
        run = []
        for i in range(first, len(units)):
            if starts[i] >= hi:
                break
            run.append(LanePiece(units[i], max(lo - int(starts[i]), 0), min(hi, int(ends[i])) - int(starts[i])))
        pieces.append(run)
    rows_per_lane = global_batch // lanes
    steps = min(cuts[lane + 1] - cuts[lane] for lane in range(lanes)) // rows_per_lane
    return LanePlan(lanes, rows_per_lane, pieces, steps)


def micro_batch_lanes(lanes: int, world_size: int, grad_accum: int, rank: int) -> list[range]:
    """The lanes of each of ``rank``'s micro batches in a step: micro batch a is number rank x A + a.

    A step's ``world_size x grad_accum`` micro batches split the lanes into equal runs, so
    their count must divide the lanes (a :class:`UserError` naming the shapes that would).
    """
    consumers = world_size * grad_accum
    if lanes % consumers:
        fitting = [c for c in range(1, lanes + 1) if lanes % c == 0]
        raise UserError(
            f"loader: {world_size} rank(s) x {grad_accum} accumulation step(s) = {consumers} micro batches per "
            f"step do not divide the {lanes} lanes of this global batch (gcd of data.lanes and the global batch); "
            f"ranks x engine.grad_accum must be one of {', '.join(map(str, fitting))}")
    per = lanes // consumers
    return [range((rank * grad_accum + a) * per, (rank * grad_accum + a + 1) * per) for a in range(grad_accum)]


def read_pieces(unit_reader, view_stage):
    """Stage: a lane's pieces -> its view rows in order (each unit read once, trimmed to the piece).

    ``unit_reader``: a :func:`read_units` stage; ``view_stage``: a :func:`select_view` stage;
    both shared by the lanes of a worker.
    """

    def stage(pieces: Iterable[LanePiece]) -> Iterator[dict[str, np.ndarray]]:
        for piece in pieces:
            seen = 0
            for rows in view_stage(unit_reader([piece.unit])):
                n = len(rows["len"])
                lo, hi = max(piece.start - seen, 0), min(piece.stop - seen, n)
                seen += n
                if lo < hi:
                    yield rows if (lo, hi) == (0, n) else _take(rows, slice(lo, hi))
                if seen >= piece.stop:
                    break

    return stage


class RowTaker:
    """Exactly ``n`` rows at a time from a stream of row chunks."""

    def __init__(self, chunks: Iterator[dict[str, np.ndarray]]):
        self.chunks = chunks
        self.pending: list[dict[str, np.ndarray]] = []
        self.held = 0

    def take(self, n: int) -> dict[str, np.ndarray]:
        while self.held < n:
            chunk = next(self.chunks, None)
            if chunk is None:
                raise RuntimeError(f"a lane ran out {n - self.held} rows early: the shards differ from their manifest")
            self.pending.append(chunk)
            self.held += len(chunk["len"])
        rows = self.pending[0] if len(self.pending) == 1 else _concat(self.pending)
        rest = len(rows["len"]) - n
        self.pending, self.held = ([_take(rows, slice(n, None))], rest) if rest else ([], 0)
        return _take(rows, slice(0, n)) if rest else rows


MIN_LANE_BUFFER = 1024
"""Fewest rows a lane's shuffle buffer holds (one block): smaller buffers cost more per row than they save."""
STEP_CHUNK_ROWS = 16384
"""Rows a worker takes from its lanes at a time (several steps): the per-step work is then views."""


class _LaneStream(IterableDataset):
    """One rank's share of the global order: per step, the rows of its lanes; a worker reads some lanes.

    Each pass yields one item per step from every worker that holds lanes: the rows of its lanes
    for that step with their lane numbers. The rank puts a step's items together (see
    :class:`ShardLoader`). The pass's epoch and resume step sit in shared memory, for persistent
    workers.
    """

    def __init__(self, manifest: dict, shard_dir: str, config: LoaderConfig, rank: int, world_size: int,
                 width: int, verify: bool = True):
        self.manifest, self.shard_dir, self.config = manifest, shard_dir, config
        self.rank, self.world_size, self.width, self.verify = rank, world_size, width, verify
        self.global_batch = config.batch_size * world_size * config.grad_accum
        self._position = RawArray("q", 2)  # (epoch, first step) of the next pass
        self._plan: tuple[int, LanePlan] | None = None

    def plan(self, epoch: int) -> LanePlan:
        """The epoch's :func:`plan_lanes`, made once: the loader's length, the start of a pass and the reader
        all ask for it, and making it parses every block entry of the manifest."""
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, plan_lanes(self.manifest, self.shard_dir, self.config, epoch, self.global_batch))
        return self._plan[1]

    def start_pass(self, epoch: int, start_step: int) -> LanePlan:
        self._position[0], self._position[1] = epoch, start_step
        return self.plan(epoch)

    def rank_lanes(self, lanes: int) -> list[int]:
        slots = micro_batch_lanes(lanes, self.world_size, self.config.grad_accum, self.rank)
        return [lane for slot in slots for lane in slot]

    def worker_lanes(self, lanes: int, worker: int) -> list[int]:
        """The lanes worker ``worker`` of this rank reads: every W-th of the rank's."""
        return self.rank_lanes(lanes)[worker :: max(self.config.num_workers, 1)]

    def __iter__(self) -> Iterator[dict[str, np.ndarray] | _WorkerFailure]:
        import webdataset as wds

        info = get_worker_info()
        try:
            epoch, start = self._position[0], self._position[1]
            plan = self.plan(epoch)
            mine = self.worker_lanes(plan.lanes, 0 if info is None else info.id)
            if not mine:
                return
            cfg, q = self.config, plan.rows_per_lane
            capacity = max(cfg.shuffle_buffer // plan.lanes, MIN_LANE_BUFFER)
            takers = []
            unit_reader = read_units(labels_required(self.manifest), cfg.view, self.verify)
            view_stage = select_view(cfg.view, self.width, self.verify)
            for lane in mine:
                rng = np.random.default_rng([cfg.seed, epoch, 0x1A4E, lane]) if cfg.shuffle else None
                pipeline = wds.DataPipeline(lambda lane=lane: iter(plan.pieces[lane]),
                                            read_pieces(unit_reader, view_stage),
                                            shuffle_rows(capacity, rng))
                takers.append(RowTaker(iter(pipeline)))
            lane_ids = np.repeat(np.asarray(mine, dtype=np.int32), q)
            per_take = max(STEP_CHUNK_ROWS // (q * len(mine)), 1)
            for first in range(0, plan.steps, per_take):
                k = min(per_take, plan.steps - first)
                taken = [taker.take(k * q) for taker in takers]
                if first + k <= start:
                    continue  # replayed to rebuild the buffers' state; nothing is built
                # (lanes, k x q, ...) -> (k, lanes x q, ...): step t's rows, lane by lane
                steps = {key: np.stack([t[key] for t in taken]).reshape(len(mine), k, q, *taken[0][key].shape[1:])
                         .swapaxes(0, 1).reshape(k, len(mine) * q, *taken[0][key].shape[1:]) for key in taken[0]}
                for t in range(max(start - first, 0), k):
                    yield {"step": first + t, "lane": lane_ids, **{key: value[t] for key, value in steps.items()}}
        except UserError as exc:
            if info is None:
                raise
            yield _WorkerFailure(str(exc))


# --------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class BlockAt:
    """Where a decoded block comes from: its shard file, number in the shard and index entry (for checks and messages)."""

    path: str
    number: int
    entry: BlockIndex

    @property
    def offset(self) -> int:
        """Byte offset of the block in its shard."""
        return self.entry.offset


def read_units(labelled: bool, view: str, verify: bool = True):
    """Stage: each unit's decoded blocks, in order, as (where, block); every block checked (checksum, schema).

    ``labelled``: every label must be finite (shards built from a labelled file). The checks
    that :func:`select_view` makes for ``view`` as it lays the rows out are left to it
    (``shards.check_block``): the view counts, the lengths' sum and, for the NAD view, the
    lengths and codes of the only rows it reads.
    ``verify=False`` skips the checks; only the benchmark that measures their cost uses it.
    """

    def stage(units: Iterable[Unit]) -> Iterator[tuple[BlockAt, dict[str, np.ndarray]]]:
        for unit in units:
            decoded = read_block_range(unit.path, unit.blocks, unit.first_block, labelled, verify, view=view)
            for number, (entry, block) in enumerate(zip(unit.blocks, decoded), start=unit.first_block):
                yield BlockAt(unit.path, number, entry), block

    return stage


def select_view(view: str, width: int, verify: bool = True):
    """Stage: keep the rows of ``view`` and lay them out as fixed-width row arrays.

    Every view's layout checks the lengths' sum (``shards.row_offsets``). With ``verify``,
    the NAD view's rows must number the block's ``rows_nad`` and are checked to be 110 bp
    of A C G T as they are laid out (``shards.nad_row_codes``) before words are made of
    them. The top view keeps the rows whose label is >= the
    manifest's ``labels.top_threshold`` (compared as float32, as the build counted them;
    no bit is stored); with ``verify`` their count must be the block's ``rows_top``. The
    epoch plan rests on these counts.
    """
    bit = VIEWS[view]
    folders: dict[str, tuple[np.float32, dict[str, list[int]]]] = {}

    def top_of(path: str) -> tuple[np.float32, dict[str, list[int]]]:
        # Read once per shard folder: the threshold and every block's rows_top, by shard file.
        folder = os.path.dirname(path)
        if folder not in folders:
            manifest = load_manifest(folder)
            counts = {shard["file"]: [b.rows_top for b in shard_blocks(shard, Path(folder) / MANIFEST)]
                      for info in manifest["splits"].values() for shard in info["shards"]}
            folders[folder] = (np.float32(manifest["labels"]["top_threshold"]), counts)
        return folders[folder]

    def stage(blocks: Iterable[tuple[BlockAt, dict[str, np.ndarray]]]) -> Iterator[dict[str, np.ndarray]]:
        for where, block in blocks:
            if view == "top":
                threshold, counts = top_of(where.path)
                rows = np.flatnonzero(block["y"] >= threshold)
                expected = counts.get(os.path.basename(where.path), [])
                if verify and (where.number >= len(expected) or len(rows) != expected[where.number]):
                    said = expected[where.number] if where.number < len(expected) else "nothing"
                    raise ShardBlockError(where.path, where.number, where.offset,
                                          f"{len(rows)} top-expression rows (label >= {threshold}); the manifest "
                                          f"says {said}")
            else:
                rows = np.flatnonzero(block["flags"] & bit) if bit else None
                if verify and bit == FLAG_NAD and len(rows) != where.entry.rows_nad:
                    raise ShardBlockError(where.path, where.number, where.offset,
                                          f"{len(rows)} NAD-eligible rows; the manifest says {where.entry.rows_nad}")
            if rows is not None and not len(rows):
                continue
            try:
                codes = nad_row_codes(block, rows, verify) if bit == FLAG_NAD else padded_codes(block, rows, width)
            except ValueError as exc:
                raise ShardBlockError(where.path, where.number, where.offset, str(exc)) from None
            pick = slice(None) if rows is None else rows
            yield {"codes": codes, "len": block["len"][pick].astype(np.int64), "y": block["y"][pick],
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


def to_model_inputs(tokens: str, kmer_frame: int, kmer_all_frames: bool = False, onehot_window: int = 150,
                    kmer_flank_bp: int = 150):
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

                ids, mask = encode_for_model(rows["codes"], rows["len"], kmer_frame, kmer_all_frames, kmer_flank_bp)
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
    """Evaluation: one rank's batches, one pass over its rows; under a DataLoader each worker streams its part.

    The pass's epoch and resume step sit in shared memory: the rank sets them before each pass,
    and persistent workers, forked once, read them when the pass starts.
    """

    def __init__(self, manifest: dict, shard_dir: str, config: LoaderConfig, rank: int, world_size: int,
                 width: int, verify: bool = True):
        self.manifest, self.shard_dir, self.config = manifest, shard_dir, config
        self.rank, self.world_size, self.width = rank, world_size, width
        self.verify = verify
        self._position = RawArray("q", 2)  # (epoch, start step) of the next pass
        self._plan: tuple[int, EpochPlan] | None = None

    def plan(self, epoch: int) -> EpochPlan:
        """The epoch's :func:`plan_epoch`, made once (the loader's length, the pass and its reader ask for it)."""
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, plan_epoch(self.manifest, self.shard_dir, self.config, epoch, self.world_size))
        return self._plan[1]

    def start_pass(self, epoch: int, start_step: int) -> EpochPlan:
        """Set the next pass to ``epoch`` from batch ``start_step`` on; returns its plan."""
        self._position[0], self._position[1] = epoch, start_step
        return self.plan(epoch)

    def worker_stream(self, worker_slot: int) -> Iterator[dict[str, torch.Tensor] | None]:
        """The batches of logical worker ``(slot + start_step) % W`` from its resume point on."""
        import webdataset as wds

        epoch, start_step = self._position[0], self._position[1]
        plan = self.plan(epoch)
        workers = max(self.config.num_workers, 1)
        logical = (worker_slot + start_step) % workers
        skip = len(range(logical, start_step, workers))  # its batches already consumed
        quota = plan.quotas[self.rank][logical]
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, epoch, self.rank, logical]) if cfg.shuffle else None
        units = plan.units[self.rank][logical]
        pipeline = wds.DataPipeline(
            lambda: iter(units),
            read_units(labels_required(self.manifest), cfg.view, self.verify),
            select_view(cfg.view, self.width, self.verify),
            shuffle_rows(cfg.shuffle_buffer, rng),
            batch_rows(cfg.batch_size, quota, skip, partial_last=not cfg.drop_last),
            to_model_inputs(cfg.tokens, cfg.kmer_frame, cfg.kmer_all_frames, cfg.onehot_window, cfg.kmer_flank_bp),
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
    """The loader settings that decide which rows make each global batch (not how ranks share them)."""
    per_shape = ("pin_memory", "persistent_workers", "num_workers", "batch_size", "grad_accum")
    return {k: v for k, v in config.items() if k not in per_shape}


class ShardLoader:
    """Iterable over model-ready batches of one split, for rank ``rank`` of ``world_size``, epoch after epoch.

    Training (``drop_last``): each step's ``grad_accum`` micro batches of this rank, cut from the
    global order (:class:`LanePlan`), which depends on the global batch and not on the shape.
    Evaluation: every row of the split once, shared over ranks and workers.

    ``for batch in loader`` runs the current epoch from its current position and then
    advances to the next epoch. ``state_dict()`` after any step and ``load_state_dict()`` on
    a fresh loader continue exactly from that step, on this or any other shape with the same
    global batch.
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
        """Micro batches taken in the current epoch."""
        self.training = config.drop_last
        self.global_batch = config.batch_size * world_size * config.grad_accum
        stream_type = _LaneStream if self.training else _RankStream
        self._stream = stream_type(self.manifest, self.shard_dir, config, rank, world_size, self.width, verify)
        self._batches: Iterable | None = None  # the DataLoader, made at the first pass and kept
        if self.training:
            lanes = lane_count(config.lanes, self.global_batch)
            micro_batch_lanes(lanes, world_size, config.grad_accum, rank)  # a shape that cannot share it is refused
            self.lanes = lanes
        # Training needs a full global batch; evaluation only some row somewhere (a rank may hold none).
        if self.training:
            empty = self.steps_per_epoch(0) == 0
        else:
            empty = not any(self._stream.plan(0).steps_per_rank)
        if empty:
            raise UserError(
                f"{self.shard_dir}: split {config.split!r} (view {config.view!r}) has too few rows for one batch of "
                f"{config.batch_size} on each of {self.world_size} rank(s)"
                + (f" x {config.grad_accum} accumulation step(s)" if self.training else ""))

    def steps_per_epoch(self, epoch: int | None = None) -> int:
        """Batches this rank yields in an epoch (training: global steps x grad_accum, the same on every rank)."""
        epoch = self.epoch if epoch is None else epoch
        if self.training:
            return self._stream.plan(epoch).steps * self.config.grad_accum
        return self._stream.plan(epoch).steps_per_rank[self.rank]

    def __len__(self) -> int:
        return self.steps_per_epoch()

    def batches(self) -> Iterable:
        """The item source: the stream itself, or a DataLoader of workers over it."""
        cfg = self.config
        if self._batches is None:
            if cfg.num_workers > 0:
                self._batches = DataLoader(self._stream, batch_size=None, num_workers=cfg.num_workers,
                                           pin_memory=cfg.pin_memory and not self.training,
                                           persistent_workers=cfg.persistent_workers)
            else:
                self._batches = self._stream
        return self._batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.training:
            yield from self._training_epoch()
            return
        total = self._stream.start_pass(self.epoch, self.step).steps_per_rank[self.rank]
        pin_here = self.config.pin_memory and self.config.num_workers == 0  # else the DataLoader pins
        for batch in self.batches():
            if isinstance(batch, _WorkerFailure):
                raise UserError(batch.message)
            self.step += 1
            yield {k: v.pin_memory() for k, v in batch.items()} if pin_here else batch
        if self.step != total:
            raise RuntimeError(f"rank {self.rank} yielded {self.step} batches in epoch {self.epoch}, planned {total}")
        self.epoch += 1
        self.step = 0

    def _training_epoch(self) -> Iterator[dict[str, torch.Tensor]]:
        """The rest of the epoch's micro batches: each step's rows from every worker, cut by lane into micro batches."""
        cfg, accum = self.config, self.config.grad_accum
        if self.step % accum:
            raise RuntimeError(f"loader: resumed at micro batch {self.step}, inside a step of {accum}")
        plan = self._stream.start_pass(self.epoch, self.step // accum)
        readers = max(cfg.num_workers, 1)
        rank_lanes = self._stream.rank_lanes(plan.lanes)
        pieces_per_step = min(readers, len(rank_lanes))
        to_inputs = to_model_inputs(cfg.tokens, cfg.kmer_frame, cfg.kmer_all_frames, cfg.onehot_window,
                                    cfg.kmer_flank_bp)
        per_micro = len(rank_lanes) // accum * plan.rows_per_lane
        pending: list[dict[str, np.ndarray]] = []
        for item in self.batches():
            if isinstance(item, _WorkerFailure):
                raise UserError(item.message)
            pending.append({k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in item.items()})
            if len(pending) < pieces_per_step:
                continue
            step = {int(p.pop("step")) for p in pending}
            if step != {self.step // accum}:
                raise RuntimeError(f"loader: step {sorted(step)} from the workers, expected {self.step // accum}")
            rows = pending[0] if len(pending) == 1 else _concat(pending)
            pending = []
            if pieces_per_step > 1:  # the global order: lane by lane, whichever worker read it
                rows = _take(rows, np.argsort(rows["lane"], kind="stable"))
            for a in range(accum):
                micro = _take(rows, slice(a * per_micro, (a + 1) * per_micro))
                batch = next(to_inputs([micro]))
                if cfg.pin_memory:
                    batch = {k: v.pin_memory() for k, v in batch.items()}
                self.step += 1
                yield batch
        total = plan.steps * accum
        if self.step != total:
            raise RuntimeError(f"rank {self.rank} yielded {self.step} batches in epoch {self.epoch}, planned {total}")
        self.epoch += 1
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch taken from the iterator, and what the order depends on."""
        return {
            "epoch": self.epoch, "step": self.step, "global_step": self.step // self.config.grad_accum,
            "global_batch": self.global_batch, "world_size": self.world_size,
            "num_workers": self.config.num_workers, "config": asdict(self.config),
            "source_xxh3_128": self.manifest["source"]["xxh3_128"],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the same shards, order settings and global batch; any shape that shares it."""
        saved_config = state.get("config")
        checks = (("global_batch", state.get("global_batch"), self.global_batch),
                  ("config", _layout(saved_config) if isinstance(saved_config, dict) else saved_config,
                   _layout(asdict(self.config))),
                  ("source_xxh3_128", state.get("source_xxh3_128"), self.manifest["source"]["xxh3_128"]))
        for key, saved, mine in checks:
            if saved != mine:
                raise UserError(
                    f"loader state: {key} differs ({saved!r} saved, {mine!r} now); resuming the same sample order "
                    "needs the same shards, loader settings and global batch (data.batch_size x ranks x "
                    "engine.grad_accum)")
        self.epoch, self.step = int(state["epoch"]), int(state["global_step"]) * self.config.grad_accum
