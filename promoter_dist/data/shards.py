"""Block shards (WebDataset-compatible tar files of base codes): build, read back, verify.

A shard is a plain POSIX tar. Each WebDataset sample in it is a BLOCK of up to
``rows_per_block`` rows, stored column-wise as ``.npy`` members (one tar member per
row costs 2-4 KB of headers; a block costs ~3 B per row). Key schema of a block
``{split}-{shard:06d}_{block:04d}``:

=============  ========  ====================================================
member         dtype     content
=============  ========  ====================================================
``seq.npy``    uint8     the block's sequences concatenated (ragged), base codes
                         A0 C1 G2 T3 N4 (alphabet.py); row i is
                         ``seq[offsets[i]:offsets[i+1]]``, offsets = cumsum(len)
``len.npy``    uint16    sequence length of each row (bp)
``y.npy``      float32   expression; NaN for unlabelled (test) rows
``line.npy``   uint32    1-based line of the row in the source file
``flags.npy``  uint8     bit 0 integer label ("singleton"), bit 1 NAD-eligible
                         (110 bp, no N), bit 2 in the top-expression subset
=============  ========  ====================================================

Storing bases (not model tokens) keeps one shard set for both models and ~120 B
per row; the NAD words and the 3-mer BERT tokens are vectorised lookups over the
base codes done by the loader (microseconds per block).

Rows go to a split by a hash of the sequence (so duplicated sequences never
straddle train and validation), salted with ``split_seed``; within a split rows
keep file order. The build is deterministic to the byte: tar headers carry fixed
owner, mode and mtime 0. Every file is written to a temporary name and renamed;
``build-state.jsonl`` logs finished shards (one appended line each), so a killed
build resumes and ends byte-identical to an uninterrupted one. ``manifest.json`` is written last.

Writing uses python's ``tarfile`` (USTAR). Reading back does not: ``read_block_range``
seeks to a block's offset from the manifest, parses the USTAR headers itself
(:func:`iter_tar_members`) and maps each ``.npy`` body without copying
(:func:`_load_npy`). Stock ``webdataset`` and ``tar`` read the shards too.

The manifest lists, per shard, where each block lies and how many rows of each view it
holds: one :class:`BlockIndex` per block, stored in JSON as the list
``[offset, nbytes, rows, rows_nad, rows_top, max_length]`` (:data:`BLOCK_INDEX_FIELDS`).
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import re
import tarfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from .. import __version__
from ..errors import UserError
from ..io import atomic_open, fsync_paths, sha256_file, write_json_atomic
from .alphabet import BASES, PAD
from .dream import ReadOptions, ReadReport, Rows, read_dream
from .hashing import mix64
from .nad_words import nad_eligible

FORMAT = "promoter-dist-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BUILD_STATE = "build-state.jsonl"
REJECTED = "rejected.tsv"
MEMBERS = ("seq", "len", "y", "line", "flags")
FLAG_INTEGER, FLAG_NAD, FLAG_TOP = 1, 2, 4
VIEWS = {"all": None, "nad": FLAG_NAD, "top": FLAG_TOP}
"""Row subsets a loader can ask for, and the flag bit that selects each."""

SCHEMA = {
    "sample": "one block of rows; key '{split}-{shard:06d}_{block:04d}'",
    "seq.npy": "uint8, concatenated base codes of the block's rows (ragged; A0 C1 G2 T3 N4)",
    "len.npy": "uint16, sequence length per row; row offsets are cumsum(len)",
    "y.npy": "float32, expression per row (NaN: unlabelled)",
    "line.npy": "uint32, 1-based line of the row in the source file",
    "flags.npy": "uint8, bit0 integer label (singleton), bit1 NAD-eligible (110 bp, no N), bit2 top-expression subset",
}


@dataclass(frozen=True)
class BlockIndex:
    """Where one block lies in its shard and how many rows of each view it holds.

    The manifest stores it as the JSON list of its fields in this order
    (:meth:`to_list`, :data:`BLOCK_INDEX_FIELDS`); the writer (:func:`encode_shard`)
    and every reader go through this class, never through list positions.
    """

    offset: int
    """Byte offset of the block's first tar header in the shard."""
    nbytes: int
    """Bytes of the block's tar members (headers and padded bodies)."""
    rows: int
    """Rows in the block (view 'all')."""
    rows_nad: int
    """Rows with the NAD-eligible flag (view 'nad')."""
    rows_top: int
    """Rows in the top-expression subset (view 'top')."""
    max_length: int
    """Longest row of the block (bp)."""

    def to_list(self) -> list[int]:
        """The manifest's JSON form: the fields in declaration order."""
        return [getattr(self, name) for name in BLOCK_INDEX_FIELDS]

    @classmethod
    def from_list(cls, entry: object, manifest: str | os.PathLike, shard: str, block: int) -> BlockIndex:
        """Parse one manifest entry; UserError naming the manifest file, shard and block if malformed."""
        if (not isinstance(entry, list) or len(entry) != len(BLOCK_INDEX_FIELDS)
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in entry)):
            raise UserError(
                f"{manifest}: shard {shard} block {block}: malformed block index {entry!r}; expected "
                f"[{', '.join(BLOCK_INDEX_FIELDS)}] as {len(BLOCK_INDEX_FIELDS)} integers"
            )
        return cls(*entry)

    def rows_in_view(self, view: str) -> int:
        """Rows of ``view`` (a key of :data:`VIEWS`) in the block."""
        if view == "all":
            return self.rows
        if view == "nad":
            return self.rows_nad
        if view == "top":
            return self.rows_top
        raise ValueError(f"unknown view {view!r}; expected one of {sorted(VIEWS)}")


BLOCK_INDEX_FIELDS = tuple(f.name for f in fields(BlockIndex))
"""Field order of a manifest block entry: offset, nbytes, rows, rows_nad, rows_top, max_length."""


def shard_blocks(shard: dict, manifest: str | os.PathLike) -> list[BlockIndex]:
    """The checked block index of one shard entry of the manifest at ``manifest``."""
    return [BlockIndex.from_list(entry, manifest, shard["name"], i) for i, entry in enumerate(shard["blocks"])]


TOKENIZERS = {
    "bases": {"alphabet": {b: i for i, b in enumerate(BASES)} | {"PAD": PAD}, "stored": True},
    "nad_words": {
        "module": "promoter_dist.data.nad_words",
        "rule": "5-mer centred on each of the 80 random positions of a 110-bp row (adapter bases at the edges)",
        "vocab_size": 1024,
        "rows": "flag bit1 (110 bp, no N)",
    },
    "kmer3": {
        "module": "promoter_dist.data.kmer_tokenizer",
        "rule": "non-overlapping 3-mers over ACGTN of the row inside 150 bp of vector each side",
        "vocab_size": 130,
    },
}


@dataclass(frozen=True)
class ShardOptions:
    """How rows become shards."""

    splits: tuple[tuple[str, float], ...] = (("train", 0.9), ("val", 0.1))
    """(name, fraction) per split; fractions sum to 1 (NAD: 90/10)."""
    split_seed: int = 1
    """Salt of the sequence hash that assigns splits; change it to draw another split."""
    rows_per_block: int = 1024
    """Rows per WebDataset sample (tar member group)."""
    blocks_per_shard: int = 32
    """Blocks per tar file (~4 MB of 110-bp rows)."""
    top_fraction: float = 0.2
    """Top-expression subset: rows with label >= the (1 - top_fraction) quantile of the whole file."""

    def __post_init__(self) -> None:
        names = [name for name, _ in self.splits]
        if not names or len(set(names)) != len(names):
            raise UserError(f"splits: need distinct split names, got {names}")
        for name, frac in self.splits:
            if not name.isidentifier() or not 0 <= frac <= 1:
                raise UserError(f"splits: bad entry {name}={frac} (name: letters/digits/_, fraction in [0, 1])")
        total = sum(frac for _, frac in self.splits)
        if abs(total - 1.0) > 1e-9:
            raise UserError(f"splits: fractions must sum to 1, got {total:g}")
        if self.rows_per_block < 1 or self.blocks_per_shard < 1:
            raise UserError("rows_per_block and blocks_per_shard must be >= 1")
        if not 0 < self.top_fraction <= 1:
            raise UserError(f"top_fraction must be in (0, 1], not {self.top_fraction}")

    @staticmethod
    def parse_splits(text: str) -> tuple[tuple[str, float], ...]:
        """'train=0.9,val=0.1' -> (('train', 0.9), ('val', 0.1))."""
        out = []
        for part in text.split(","):
            name, sep, value = part.partition("=")
            try:
                out.append((name.strip(), float(value)))
            except ValueError:
                raise UserError(f"--splits: expected name=fraction pairs like train=0.9,val=0.1, got {text!r}") from None
            if not sep:
                raise UserError(f"--splits: expected name=fraction pairs like train=0.9,val=0.1, got {text!r}")
        return tuple(out)


# --------------------------------------------------------------------------- hashing and flags


def assign_splits(hashes: np.ndarray, options: ShardOptions) -> np.ndarray:
    """Split index per row from its hash: uniform u in [0, 1) against cumulative fractions."""
    salted = mix64(hashes ^ mix64(np.full(1, options.split_seed, dtype=np.uint64)))
    u = (salted >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    edges = np.cumsum([frac for _, frac in options.splits])[:-1]
    return np.searchsorted(edges, u, side="right").astype(np.int8)


def top_threshold(labels: np.ndarray, top_fraction: float) -> float:
    """The (1 - top_fraction) quantile of the finite labels (ties at it join the subset)."""
    finite = labels[np.isfinite(labels)]
    if not len(finite):
        return float("nan")
    return float(np.quantile(finite.astype(np.float64), 1.0 - top_fraction))


def row_flags(rows: Rows, threshold: float) -> np.ndarray:
    flags = rows.integer_label.astype(np.uint8) * FLAG_INTEGER
    flags |= nad_eligible(rows.lengths, rows.has_n).astype(np.uint8) * FLAG_NAD
    if np.isfinite(threshold):
        flags |= (rows.labels >= np.float32(threshold)).astype(np.uint8) * FLAG_TOP
    return flags


# --------------------------------------------------------------------------- tar writing


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def encode_shard(name: str, blocks: list[dict[str, np.ndarray]]) -> tuple[bytes, list[BlockIndex]]:
    """Tar bytes of one shard and the index of each of its blocks."""
    buf = io.BytesIO()
    index: list[BlockIndex] = []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for b, block in enumerate(blocks):
            start = tar.offset
            key = f"{name}_{b:04d}"
            for member in MEMBERS:
                _add_member(tar, f"{key}.{member}.npy", _npy_bytes(block[member]))
            flags = block["flags"]
            index.append(BlockIndex(
                offset=start,
                nbytes=tar.offset - start,
                rows=len(flags),
                rows_nad=int((flags & FLAG_NAD > 0).sum()),
                rows_top=int((flags & FLAG_TOP > 0).sum()),
                max_length=int(block["len"].max(initial=0)),
            ))
    return buf.getvalue(), index


def block_arrays(rows: Rows, flags: np.ndarray, idx: np.ndarray) -> dict[str, np.ndarray]:
    """The members of one block for the rows ``idx`` (file order)."""
    lengths = rows.lengths[idx]
    codes = rows.codes[idx]
    mask = np.arange(codes.shape[1]) < lengths[:, None].astype(np.int64)
    return {
        "seq": codes[mask],  # row-major boolean selection keeps each row contiguous
        "len": lengths.astype(np.uint16),
        "y": rows.labels[idx].astype(np.float32),
        "line": rows.lines[idx].astype(np.uint32),
        "flags": flags[idx].astype(np.uint8),
    }


# Set before the worker pool forks, so workers read the rows without copying them.
_BUILD: dict = {}


def _write_shard_task(task: tuple[str, str, np.ndarray]) -> dict:
    out_dir, name, idx = task
    rows, flags, per_block = _BUILD["rows"], _BUILD["flags"], _BUILD["rows_per_block"]
    blocks = [block_arrays(rows, flags, idx[i : i + per_block]) for i in range(0, len(idx), per_block)]
    data, index = encode_shard(name, blocks)
    with atomic_open(Path(out_dir) / f"{name}.tar", "wb", fsync=False) as handle:
        handle.write(data)  # flushed to disk together before the manifest is written
    return {
        "name": name,
        "file": f"{name}.tar",
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "rows": int(len(idx)),
        "blocks": [b.to_list() for b in index],
    }


# --------------------------------------------------------------------------- build


@dataclass
class BuildResult:
    """What a shard build read and wrote."""

    out_dir: str
    manifest: dict
    seconds: float
    shards_written: int
    shards_reused: int
    report: ReadReport = field(repr=False)

    def summary(self) -> str:
        """What was read, written per split and how fast (``shards build`` and the demo print it)."""
        m = self.manifest
        lines = [self.report.summary() if self.report.rows_in else f"source: {m['source']['path']}"]
        for split, info in m["splits"].items():
            lines.append(f"  {split}: {info['rows']} rows ({info['rows_nad']} NAD-eligible, {info['rows_top']} "
                         f"top-expression) in {len(info['shards'])} shards")
        total_bytes = sum(s["bytes"] for info in m["splits"].values() for s in info["shards"])
        rows = max(m["rows"], 1)
        lines.append(f"  top-expression threshold {m['labels']['top_threshold']:.4g} ({m['labels']['rows_top']} rows)")
        lines.append(f"wrote {self.shards_written} shards, reused {self.shards_reused}, in {self.seconds:.1f} s "
                     f"({rows / max(self.seconds, 1e-9):,.0f} rows/s, {total_bytes / rows:.1f} B/row) -> {self.out_dir}")
        return "\n".join(lines)


def _fingerprint(source_sha: str, read_options: ReadOptions, options: ShardOptions) -> dict:
    read = {k: v for k, v in asdict(read_options).items() if k not in ("workers", "chunk_bytes")}
    fingerprint = {"format_version": FORMAT_VERSION, "source_sha256": source_sha, "read": read, "shards": asdict(options)}
    return json.loads(json.dumps(fingerprint))  # the form it takes when read back from JSON


def _plan(split_of_row: np.ndarray, options: ShardOptions) -> list[tuple[str, np.ndarray]]:
    """(shard name, row indices) for every shard, split by split, in file order."""
    per_shard = options.rows_per_block * options.blocks_per_shard
    plan = []
    for s, (split, _) in enumerate(options.splits):
        idx = np.flatnonzero(split_of_row == s)
        for i, start in enumerate(range(0, len(idx), per_shard)):
            plan.append((f"{split}-{i:06d}", idx[start : start + per_shard]))
    return plan


def _read_state(path: Path) -> dict:
    """The build log: its first line is the fingerprint, each further line a finished shard.

    A line cut short by a kill is ignored (that shard is simply written again).
    """
    state: dict = {"fingerprint": None, "shards": {}}
    if not path.exists():
        return state
    for i, line in enumerate(path.read_text().splitlines()):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if i == 0:
            state["fingerprint"] = entry.get("fingerprint")
        elif isinstance(entry, dict) and "name" in entry:
            state["shards"][entry["name"]] = entry
    return state


def _start_state(path: Path, fingerprint: dict) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(json.dumps({"fingerprint": fingerprint}) + "\n")


def _log_shard(path: Path, entry: dict) -> None:
    # No fsync: a lost line only means the shard is rewritten; reused shards are checked by sha256.
    with open(path, "a") as handle:
        handle.write(json.dumps(entry) + "\n")


def _reusable(out_dir: Path, state: dict, name: str) -> dict | None:
    """A finished shard from an interrupted build, if its log entry is well formed and its bytes intact."""
    entry = state.get("shards", {}).get(name)
    path = out_dir / f"{name}.tar"
    if entry is None or not path.is_file() or path.stat().st_size != entry["bytes"]:
        return None
    try:
        shard_blocks(entry, out_dir / BUILD_STATE)
    except UserError:
        return None  # a damaged log line: the shard is simply written again
    return entry if sha256_file(path) == entry["sha256"] else None


def build_shards(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    options: ShardOptions = ShardOptions(),
    read_options: ReadOptions = ReadOptions(),
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log=print,
) -> BuildResult:
    """Read, validate and split ``source``; write shards, ``rejected.tsv`` and ``manifest.json``.

    Rerunning after an interruption reuses the shards already finished (checked by
    sha256) and produces byte-identical output. An output folder built from another
    source or with other options is refused unless ``overwrite``.
    """
    t0 = time.perf_counter()
    source, out = Path(source), Path(out_dir)
    workers = (os.cpu_count() or 1) if workers is None else workers
    if not source.is_file():
        raise UserError(f"{source}: no such file")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.tmp-*"):  # leftovers of a killed build
        stale.unlink()

    source_sha = sha256_file(source)
    fingerprint = _fingerprint(source_sha, read_options, options)
    manifest_path, state_path = out / MANIFEST, out / BUILD_STATE
    if manifest_path.exists():
        previous = json.loads(manifest_path.read_text())
        if previous.get("fingerprint") == fingerprint and not overwrite:
            log(f"{out}: already built from this source with these options (manifest.json); nothing to do")
            return BuildResult(str(out), previous, time.perf_counter() - t0, 0, 0, ReadReport(str(source)))
    state = _read_state(state_path)
    existing = sorted(p.name for p in out.glob("*.tar"))
    if not overwrite and existing and state.get("fingerprint") != fingerprint:
        raise UserError(
            f"{out}: holds shards from another source or other options; choose another --out or pass --overwrite"
        )
    if overwrite or state.get("fingerprint") != fingerprint:
        for name in existing:
            (out / name).unlink()
        for stale_file in (manifest_path, state_path, out / REJECTED):
            stale_file.unlink(missing_ok=True)
        state = {"fingerprint": fingerprint, "shards": {}}
        _start_state(state_path, fingerprint)

    rows, report = read_dream(source, replace(read_options, workers=workers), progress)
    threshold = top_threshold(rows.labels, options.top_fraction)
    flags = row_flags(rows, threshold)
    split_of_row = assign_splits(rows.hash, options)
    plan = _plan(split_of_row, options)

    results: dict[str, dict] = {}
    todo = []
    for name, idx in plan:
        reused = _reusable(out, state, name)
        if reused is not None:
            results[name] = reused
        else:
            todo.append((str(out), name, idx))
    shards_reused = len(results)

    _BUILD.update(rows=rows, flags=flags, rows_per_block=options.rows_per_block)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(rows), initial=sum(r["rows"] for r in results.values()), unit="row", unit_scale=True, desc="shards")
    try:
        if workers > 1 and len(todo) > 1:
            pool = mp.get_context("fork").Pool(workers)
            done_iter: Iterator[dict] = pool.imap_unordered(_write_shard_task, todo)
        else:
            pool = None
            done_iter = map(_write_shard_task, todo)
        for entry in done_iter:
            results[entry["name"]] = entry
            _log_shard(state_path, entry)
            if bar is not None:
                bar.update(entry["rows"])
        if pool is not None:
            pool.close()
            pool.join()
    finally:
        _BUILD.clear()
        if bar is not None:
            bar.close()

    _write_rejected(out / REJECTED, report)
    fsync_paths([out / entry["file"] for entry in results.values()])
    manifest = _manifest(source, source_sha, fingerprint, report, options, threshold, flags, plan, results)
    write_json_atomic(manifest_path, manifest)
    state_path.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    return BuildResult(str(out), manifest, seconds, len(todo), shards_reused, report)


def _write_rejected(path: Path, report: ReadReport) -> None:
    """Every rejected row: line, reason, field, detail and its raw text (escaped, truncated)."""
    with atomic_open(path, "w") as handle:
        handle.write("line\treason\tfield\tdetail\traw\n")
        for r in report.rejected_rows:
            raw = r.raw.decode("utf-8", "backslashreplace").replace("\t", "\\t").replace("\r", "\\r")
            handle.write(f"{r.line}\t{r.reason}\t{r.field}\t{r.detail}\t{raw}\n")


def _manifest(source, source_sha, fingerprint, report, options, threshold, flags, plan, results) -> dict:
    # Entries were written by encode_shard or checked by _reusable: well formed.
    blocks = {name: shard_blocks(entry, MANIFEST) for name, entry in results.items()}
    splits = {}
    for split, _ in options.splits:
        names = [name for name, _ in plan if name.startswith(f"{split}-")]
        splits[split] = {
            "rows": sum(results[name]["rows"] for name in names),
            "rows_nad": sum(b.rows_nad for name in names for b in blocks[name]),
            "rows_top": sum(b.rows_top for name in names for b in blocks[name]),
            "shards": [results[name] for name in names],
        }
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_by": f"promoter-dist {__version__}",
        "source": {"path": str(source), "name": source.name, "sha256": source_sha, "bytes": source.stat().st_size},
        "fingerprint": fingerprint,
        "options": asdict(options),
        "schema": SCHEMA,
        "tokenizers": TOKENIZERS,
        "read": report.to_dict(),
        "rejected_file": REJECTED,
        "labels": {
            "top_fraction": options.top_fraction,
            "top_threshold": threshold,
            "rows_top": int((flags & FLAG_TOP > 0).sum()),
            "rows_integer": int((flags & FLAG_INTEGER > 0).sum()),
            "rows_nad": int((flags & FLAG_NAD > 0).sum()),
        },
        "rows": int(len(flags)),
        "max_row_length": int(max((b.max_length for index in blocks.values() for b in index), default=0)),
        "splits": splits,
    }


# --------------------------------------------------------------------------- reading back


def load_manifest(shard_dir: str | os.PathLike) -> dict:
    """The manifest of a built shard folder (UserError if missing or unreadable)."""
    path = Path(shard_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no manifest; build the shards first (promoter-dist shards build)") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not a promoter-dist shard manifest")
    return manifest


def iter_tar_members(data: bytes, where: str = "") -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular-file members of an uncompressed tar held in memory.

    The reader symmetric to :func:`encode_shard`: USTAR headers, parsed directly,
    which is ~50x cheaper per member than ``tarfile``. Shards stay readable by any tar.
    """
    view = memoryview(data)
    at = 0
    while at + 512 <= len(data):
        header = data[at : at + 512]
        if header.count(0) == 512:  # end-of-archive
            return
        if sum(header[:148]) + 8 * 32 + sum(header[156:]) != int(header[148:156].strip(b"\0 ") or b"-1", 8):
            raise ValueError(f"{where}: bad tar header checksum at byte {at}")
        name = header[:100].split(b"\0", 1)[0].decode()
        prefix = header[345:500].split(b"\0", 1)[0].decode()
        size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        body = at + 512
        if body + size > len(data):
            raise ValueError(f"{where}: member {name!r} cut short at byte {len(data)}")
        if header[156:157] in (b"0", b"\0"):
            yield (f"{prefix}/{name}" if prefix else name), bytes(view[body : body + size])
        at = body + (size + 511) // 512 * 512


_NPY_HEADER = re.compile(rb"\{'descr': '([^']+)', 'fortran_order': (True|False), 'shape': \(([0-9, ]*)\), \}")


def _load_npy(data: bytes) -> np.ndarray:
    """An ``.npy`` payload as an array, without copying the body.

    Headers as numpy writes them are parsed with one regex (numpy's own parser
    evaluates the header as Python and costs more than the rest of a block).
    """
    if data[:6] == b"\x93NUMPY" and data[6] == 1:
        header_len = int.from_bytes(data[8:10], "little")
        match = _NPY_HEADER.match(data, 10)
        if match and match.end() <= 10 + header_len:
            shape = tuple(int(x) for x in match.group(3).split(b",") if x.strip())
            array = np.frombuffer(data, dtype=np.dtype(match.group(1).decode()), offset=10 + header_len,
                                  count=int(np.prod(shape)))
            return array.reshape(shape, order="F" if match.group(2) == b"True" else "C")
    return np.load(io.BytesIO(data), allow_pickle=False)


def read_block_range(path: str | os.PathLike, offset: int, nbytes: int) -> Iterator[dict[str, np.ndarray]]:
    """Decode the blocks stored in ``nbytes`` bytes of a shard starting at ``offset``.

    Any block boundary is a valid tar start, so one seek and one read fetch a run of
    consecutive blocks. The tar is parsed by :func:`iter_tar_members` (not ``tarfile``
    nor webdataset) and each ``.npy`` member by :func:`_load_npy`.
    """
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read(nbytes)
    if len(data) != nbytes:
        raise ValueError(f"{path}: {len(data)} bytes at {offset}, expected {nbytes} (truncated shard?)")
    block: dict[str, np.ndarray] = {}
    key = None
    for name, payload in iter_tar_members(data, str(path)):
        stem, _, member = name.partition(".")
        if stem != key and block:
            yield block
            block = {}
        key = stem
        block[member.removesuffix(".npy")] = _load_npy(payload)
    if block:
        yield block


def padded_codes(block: dict[str, np.ndarray], rows: np.ndarray | None = None, width: int | None = None) -> np.ndarray:
    """(n, width) PAD-padded codes for ``rows`` of a block (all rows if None)."""
    lengths = block["len"].astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])[:-1]
    if rows is not None:
        lengths, offsets = lengths[rows], offsets[rows]
    width = int(lengths.max(initial=0)) if width is None else width
    seq = np.concatenate([block["seq"], np.full(max(width, 1), PAD, np.uint8)])
    codes = np.lib.stride_tricks.sliding_window_view(seq, max(width, 1))[offsets, :width]
    codes[np.arange(width) >= lengths[:, None]] = PAD
    return codes


# --------------------------------------------------------------------------- verify


@dataclass
class VerifyResult:
    ok: bool
    problems: list[str]
    shards_checked: int
    rows_checked: int


def verify_shards(shard_dir: str | os.PathLike, deep: bool = True) -> VerifyResult:
    """Check every shard against the manifest: presence, size, sha256 and (deep) block contents."""
    shard_dir = Path(shard_dir)
    manifest = load_manifest(shard_dir)
    problems: list[str] = []
    shards_checked = rows_checked = 0
    manifest_path = shard_dir / MANIFEST
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            path = shard_dir / shard["file"]
            shards_checked += 1
            if not path.is_file():
                problems.append(f"{path}: missing")
                continue
            size = path.stat().st_size
            if size != shard["bytes"]:
                problems.append(f"{path}: truncated or altered: {size} bytes, manifest says {shard['bytes']}")
                continue
            if sha256_file(path) != shard["sha256"]:
                problems.append(f"{path}: corrupted: sha256 differs from the manifest")
                continue
            if deep:
                try:
                    index = shard_blocks(shard, manifest_path)
                except UserError as exc:
                    problems.append(str(exc))
                    continue
                try:
                    rows = 0
                    for entry in index:
                        for block in read_block_range(path, entry.offset, entry.nbytes):
                            if len(block["len"]) != entry.rows or int(block["len"].sum()) != len(block["seq"]):
                                raise ValueError(f"block at byte {entry.offset} has inconsistent row counts")
                            rows += entry.rows
                    if rows != shard["rows"]:
                        raise ValueError(f"{rows} rows in blocks, manifest says {shard['rows']}")
                    rows_checked += rows
                except Exception as exc:  # noqa: BLE001 - any decode failure is a corrupt shard
                    problems.append(f"{path}: unreadable: {exc}")
    total = sum(info["rows"] for info in manifest["splits"].values())
    if total != manifest["rows"]:
        problems.append(f"manifest: split rows sum to {total}, total says {manifest['rows']}")
    read = manifest["read"]
    if read["rows_in"] != read["rows_ok"] + read["rows_rejected"] or read["rows_ok"] != manifest["rows"]:
        problems.append("manifest: rows_in != rows written + rows rejected")
    return VerifyResult(not problems, problems, shards_checked, rows_checked)
