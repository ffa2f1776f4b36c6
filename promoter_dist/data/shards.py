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
                         (110 bp, no N)
=============  ========  ====================================================

The top-expression subset is not a stored bit: its rows are those whose ``y`` is >= the
manifest's ``labels.top_threshold`` (a quantile over the whole file, known only once every
row is read, while each segment's shards are written as soon as it is parsed).

Storing bases (not model tokens) keeps one shard set for both models and ~120 B
per row; the NAD words and the 3-mer BERT tokens are vectorised lookups over the
base codes done by the loader (microseconds per block).

Rows go to a split by a hash of the sequence (so duplicated sequences never
straddle train and validation), salted with ``split_seed``. The file is cut into
segments of ``segment_bytes`` at line ends; each worker process parses one segment at a
time and writes that segment's shards (numbered from ``segment * shards_per_segment``), rows
in file order; only shard entries, counts, rejected rows and the float32 labels travel back. The
cut depends on the file and ``segment_bytes`` only, so the shards are the same bytes
for any number of workers. The build is deterministic to the byte: tar headers carry fixed
owner, mode and mtime 0. Every file is written to a temporary name and renamed;
``build-state.jsonl`` logs finished shards (one appended line each), so a killed
build resumes and ends byte-identical to an uninterrupted one. ``manifest.json`` is written last.

Writing makes the USTAR and ``.npy`` headers itself, the bytes python's ``tarfile`` and ``np.save``
write (:func:`encode_shard`, tested against :func:`encode_shard_tarfile`). Reading back parses
them itself too: ``read_block_range``
seeks to a block's offset from the manifest, parses the USTAR headers itself
(:func:`iter_tar_members`) and maps each ``.npy`` body without copying
(:func:`_load_npy`). Stock ``webdataset`` and ``tar`` read the shards too.

The manifest lists, per shard, where each block lies, how many rows of each view it
holds and the checksum of its bytes: one :class:`BlockIndex` per block, stored in JSON as
the list ``[offset, nbytes, rows, rows_nad, rows_top, max_length, checksum]``
(:data:`BLOCK_INDEX_FIELDS`).

Nothing read from a shard folder is trusted: :func:`load_manifest` validates the manifest's
shape and types (shard files must be plain names inside the folder), and
:func:`read_block_range` checks each block's xxh3-64 checksum and decoded schema before
any row leaves it; a mismatch is a :class:`~promoter_dist.errors.UserError` naming the
shard file, block and byte offset. ``shards build --overwrite`` removes only the files its
own manifest and build log list, and temporaries named as this tool names them.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import multiprocessing as mp
import os
import re
import reprlib
import stat
import tarfile
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Iterator, NoReturn, Sequence

import numpy as np
import xxhash

from .. import __version__
from ..errors import UserError
from ..io import (
    atomic_open,
    file_kind,
    fsync_file,
    fsync_folder,
    fsync_paths,
    open_input,
    require_regular_file,
    sha256_file,
    write_json_atomic,
    xxh3_128_file,
)
from .alphabet import BASES, NOMINAL_LENGTH, PAD, T
from ..errors import InputError
from .dream import (ReadOptions, ReadReport, Rows, decompress_to, gather_windows, is_gzip, read_segment,
                    segment_bounds)
from .hashing import mix64
from .nad_words import nad_eligible

FORMAT = "promoter-dist-shards"
FORMAT_VERSION = 4
"""2: a checksum per block; 3: shards written per segment, the top-expression subset selected by the
manifest's threshold (no flag bit); 4: the source identified by its xxh3-128 (``source.xxh3_128``), not sha256.
Older folders are refused by readers and rebuilt by ``--overwrite``."""
_OLD_FORMATS = {1: "shards without block checksums", 2: "shards with the top-expression subset as a flag bit",
                3: "the source identified by sha256"}
"""Why readers refuse each older format version (the message asks for a rebuild)."""
_OLD_FORMATS_SHORT = {1: "no block checksums", 2: "the top-expression subset as a flag bit",
                      3: "the source identified by sha256"}
MANIFEST = "manifest.json"
BUILD_STATE = "build-state.jsonl"
REJECTED = "rejected.tsv"
MEMBERS = ("seq", "len", "y", "line", "flags")
MEMBER_DTYPES = {"seq": "|u1", "len": "<u2", "y": "<f4", "line": "<u4", "flags": "|u1"}
"""The ``.npy`` dtype of each member, as numpy spells it in the header; readers accept no other."""
FLAG_INTEGER, FLAG_NAD = 1, 2
KNOWN_FLAGS = FLAG_INTEGER | FLAG_NAD
MAX_CODE = len(BASES) - 1
"""Largest base code stored in ``seq`` (N); PAD only ever appears in padded copies."""
MAX_MANIFEST_BYTES = 256 << 20
"""A manifest or build log larger than this is refused (a real one is a few MB)."""
VIEWS = {"all": None, "nad": FLAG_NAD, "top": None}
"""Row subsets a loader can ask for, and the flag bit that selects each ('top': ``y >= labels.top_threshold``)."""

SCHEMA = {
    "sample": "one block of rows; key '{split}-{shard:06d}_{block:04d}'",
    "seq.npy": "uint8, concatenated base codes of the block's rows (ragged; A0 C1 G2 T3 N4)",
    "len.npy": "uint16, sequence length per row; row offsets are cumsum(len)",
    "y.npy": "float32, expression per row (NaN: unlabelled)",
    "line.npy": "uint32, 1-based line of the row in the source file",
    "flags.npy": "uint8, bit0 integer label (singleton), bit1 NAD-eligible (110 bp, no N)",
    "top-expression subset": "rows with y >= labels.top_threshold (float32 comparison)",
}


@dataclass(frozen=True)
class BlockIndex:
    """Where one block lies in its shard, how many rows of each view it holds, and its checksum.

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
    """Rows in the top-expression subset (view 'top': label >= the manifest's threshold)."""
    max_length: int
    """Longest row of the block (bp)."""
    checksum: str
    """xxh3-64 of the block's ``nbytes`` bytes from ``offset``, 16 lower-case hex digits (:func:`block_checksum`)."""

    def to_list(self) -> list[int | str]:
        """The manifest's JSON form: the fields in declaration order."""
        return [getattr(self, name) for name in BLOCK_INDEX_FIELDS]

    @classmethod
    def from_list(cls, entry: object, manifest: str | os.PathLike, shard: str, block: int) -> BlockIndex:
        """Parse one manifest entry; UserError naming the manifest file, shard and block if malformed."""
        counts = len(BLOCK_INDEX_FIELDS) - 1
        where = f"{manifest}: shard {shard} block {block}"
        if (not isinstance(entry, list) or len(entry) != len(BLOCK_INDEX_FIELDS)
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in entry[:counts])
                or not isinstance(entry[counts], str) or not _CHECKSUM.fullmatch(entry[counts])):
            if isinstance(entry, list) and len(entry) == counts:
                raise UserError(f"{where}: malformed block index: no checksum (shards of format version 1); "
                                "rebuild the shards with promoter-dist shards build ... --overwrite")
            raise UserError(
                f"{where}: malformed block index {_show(entry)}; expected "
                f"[{', '.join(BLOCK_INDEX_FIELDS)}] as {counts} integers and 16 hex digits"
            )
        index = cls(*entry)
        if min(entry[:counts]) < 0 or max(index.rows_nad, index.rows_top) > index.rows:
            raise UserError(f"{where}: malformed block index {_show(entry)}: negative counts or more rows in a "
                            "view than in the block")
        return index

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
"""Field order of a manifest block entry: offset, nbytes, rows, rows_nad, rows_top, max_length, checksum."""

_CHECKSUM = re.compile(r"[0-9a-f]{16}")


def block_checksum(data: bytes | memoryview) -> str:
    """The checksum of a block's bytes as the manifest stores it: xxh3-64, 16 lower-case hex digits."""
    return xxhash.xxh3_64_hexdigest(data)


def _show(value: object, limit: int = 60) -> str:
    """A value from a file, for a one-line message: its abbreviated repr (no raw newlines), at most ``limit`` long."""
    text = reprlib.repr(value)  # abbreviates long containers and strings without building their whole repr
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shard_blocks(shard: dict, manifest: str | os.PathLike) -> list[BlockIndex]:
    """The checked block index of one shard entry of the manifest at ``manifest``.

    Blocks must follow each other from byte 0 without gaps (the loader reads a run of
    them with one read), end inside the shard and hold the shard's rows.
    """
    blocks = [BlockIndex.from_list(entry, manifest, shard["name"], i) for i, entry in enumerate(shard["blocks"])]
    end = 0
    for i, block in enumerate(blocks):
        if block.offset != end:
            raise UserError(f"{manifest}: shard {shard['name']} block {i}: offset {block.offset} does not follow the "
                            f"previous block (which ends at byte {end})")
        end += block.nbytes
    rows = sum(b.rows for b in blocks)
    if end > shard["bytes"] or rows != shard["rows"]:
        raise UserError(f"{manifest}: shard {shard['name']}: blocks end at byte {end} and hold {rows} rows; the "
                        f"shard has {shard['bytes']} bytes and {shard['rows']} rows")
    return blocks


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
    segment_bytes: int = 16 << 20
    """Bytes of (decompressed) input per segment, the unit one worker parses and writes; part of the output's
    identity (shard names and cuts), independent of the worker count. 16 MiB: ~120k rows, so a 6.7M-row file
    gives ~55 segments to spread over the cores, and a worker holds ~0.2 GB at a time."""

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
        if self.segment_bytes < 1:
            raise UserError(f"segment_bytes must be >= 1, not {self.segment_bytes}")

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


def top_threshold(labels: np.ndarray, top_fraction: float, overwrite: bool = False) -> float:
    """The (1 - top_fraction) quantile of the finite labels (ties at it join the subset).

    Equal to ``np.quantile(finite.astype(np.float64), 1 - top_fraction)`` (numpy's default
    "linear" method, its formula below), without its float64 copy: only the two order
    statistics it interpolates are found, by a partition of the float32 labels (float32 to
    float64 is exact and keeps the order). ``overwrite``: partition ``labels`` in place.
    """
    finite = np.isfinite(labels)
    if finite.all():
        values = labels if overwrite else labels.copy()
    else:
        values = labels[finite]
    n = len(values)
    if not n:
        return float("nan")
    q = np.float64(1.0 - top_fraction)
    virtual = (n - 1) * q  # numpy's virtual index for "linear"
    below = int(np.clip(np.floor(virtual), 0, n - 1))
    above = int(np.clip(below + 1, 0, n - 1))
    values.partition(sorted({below, above}))
    a, b = np.float64(values[below]), np.float64(values[above])
    gamma = np.float64(virtual - np.floor(virtual)) if 0 <= virtual < n - 1 else np.float64(0.0)
    if virtual >= n - 1:
        a = b = np.float64(values[n - 1])
    diff = b - a
    return float(b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma)  # numpy's _lerp


def row_flags(rows: Rows) -> np.ndarray:
    """The stored flag bits of each row: integer label, NAD-eligible."""
    flags = rows.integer_label.astype(np.uint8) * FLAG_INTEGER
    flags |= nad_eligible(rows.lengths, rows.has_n).astype(np.uint8) * FLAG_NAD
    return flags


# --------------------------------------------------------------------------- tar writing


def _npy_bytes(array: np.ndarray) -> bytes:
    """What ``np.save`` writes for ``array`` (the reference the fast writer is tested against)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add one member as the shards' tar headers have it (the reference the fast writer is tested against)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def encode_shard_tarfile(name: str, blocks: list[dict[str, np.ndarray]]) -> bytes:
    """The shard's bytes as python's ``tarfile`` and ``np.save`` write them: the reference for
    :func:`encode_shard`, which must give the same bytes (tests compare them)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for b, block in enumerate(blocks):
            for member in MEMBERS:
                _add_member(tar, f"{name}_{b:04d}.{member}.npy", _npy_bytes(block[member]))
    return buf.getvalue()


def _header_template() -> tuple[bytes, int]:
    """A USTAR header as ``tarfile`` writes the shards' members, with an empty name, size 0 and a blank
    checksum field, and the byte sum of that header: name, size and checksum are filled in per member."""
    info = tarfile.TarInfo("")
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0, 0o444, 0, 0, "", ""
    header = bytearray(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
    header[_SIZE_FIELD] = b"\0" * 12
    header[_CHECKSUM_FIELD] = b" " * 8  # as the checksum is computed: its own field counted as spaces
    return bytes(header), sum(header)


_NAME_FIELD, _SIZE_FIELD, _CHECKSUM_FIELD = slice(0, 100), slice(124, 136), slice(148, 156)
_HEADER, _HEADER_SUM = _header_template()
_TAR_BLOCK, _TAR_RECORD = tarfile.BLOCKSIZE, tarfile.RECORDSIZE


def _tar_header(name: bytes, size: int) -> bytes:
    """The 512-byte USTAR header of a member ``name`` (< 100 bytes) of ``size`` bytes, as ``tarfile`` writes it."""
    if len(name) > 100:  # tarfile splits such a name into the prefix field: let it write the header
        info = tarfile.TarInfo(name.decode())
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o444, 0, 0, "", ""
        return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    size_field = b"%011o\0" % size  # tarfile's itn() for a USTAR size field
    header = bytearray(_HEADER)
    header[: len(name)] = name
    header[_SIZE_FIELD] = size_field
    checksum = _HEADER_SUM + sum(name) + sum(size_field)
    header[_CHECKSUM_FIELD] = b"%06o\0 " % checksum  # tarfile: 6 octal digits, NUL, then the space left
    return bytes(header)


@lru_cache(maxsize=4096)
def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header ``np.save`` writes for a C-ordered array of ``shape`` and dtype ``descr`` (numpy's own
    writer, so the padding rules are numpy's; cached: blocks repeat the same few lengths)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def encode_shard(name: str, blocks: list[dict[str, np.ndarray]],
                 threshold: float = float("nan")) -> tuple[bytes, list[BlockIndex]]:
    """Tar bytes of one shard and the index of each of its blocks (checksums over the finished bytes).

    The bytes are those of :func:`encode_shard_tarfile` (``tarfile`` + ``np.save``), made
    without them: both cost more than the rest of the build per member, and here only a
    member's name and size vary. ``rows_top`` counts labels >= ``threshold`` (none while it
    is unknown: NaN; a build sets the counts once the whole file is read, :func:`_set_rows_top`).
    """
    parts: list[bytes | memoryview] = []
    spans: list[tuple[int, int, dict[str, np.ndarray]]] = []
    offset = 0
    for b, block in enumerate(blocks):
        start = offset
        key = f"{name}_{b:04d}"
        for member in MEMBERS:
            # As given, as np.save would write it: the build hands over MEMBER_DTYPES, readers refuse the rest.
            array = np.ascontiguousarray(block[member])
            head = _npy_header(np.lib.format.dtype_to_descr(array.dtype), array.shape)
            size = len(head) + array.nbytes
            parts += [_tar_header(f"{key}.{member}.npy".encode(), size), head, array.reshape(-1).view(np.uint8)]
            padding = -size % _TAR_BLOCK
            if padding:
                parts.append(bytes(padding))
            offset += _TAR_BLOCK + size + padding
        spans.append((start, offset - start, block))
    end = offset + 2 * _TAR_BLOCK  # end-of-archive: two zero blocks, then zeros to a whole record
    parts.append(bytes(end - offset + (-end % _TAR_RECORD)))
    data = b"".join(parts)
    view = memoryview(data)
    index = []
    for start, nbytes, block in spans:
        flags = block["flags"]
        index.append(BlockIndex(
            offset=start,
            nbytes=nbytes,
            rows=len(flags),
            rows_nad=int((flags & FLAG_NAD > 0).sum()),
            rows_top=int((block["y"] >= np.float32(threshold)).sum()),
            max_length=int(block["len"].max(initial=0)),
            checksum=block_checksum(view[start : start + nbytes]),  # exactly the bytes a reader fetches
        ))
    return data, index


def block_arrays(rows: Rows, flags: np.ndarray, idx: np.ndarray, per_block: int) -> list[dict[str, np.ndarray]]:
    """The members of each block of ``per_block`` rows of the rows ``idx`` (file order).

    The columns of all of ``idx`` are gathered at once and each block is a slice of them
    (a gather per block cost more than the rest of a shard's encoding).
    """
    lengths = rows.lengths[idx]
    codes = rows.codes[idx]
    mask = np.arange(codes.shape[1]) < lengths[:, None].astype(np.int64)
    # The dtypes readers demand (MEMBER_DTYPES), little-endian on any machine.
    columns = {
        # row-major boolean selection keeps each row contiguous
        "seq": codes[mask].astype(MEMBER_DTYPES["seq"], copy=False),
        "len": lengths.astype(MEMBER_DTYPES["len"], copy=False),
        "y": rows.labels[idx].astype(MEMBER_DTYPES["y"], copy=False),
        "line": rows.lines[idx].astype(MEMBER_DTYPES["line"], copy=False),
        "flags": flags[idx].astype(MEMBER_DTYPES["flags"], copy=False),
    }
    cuts = list(range(0, len(idx), per_block)) + [len(idx)]
    bases = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])[cuts].tolist()
    return [{member: (columns[member][bases[b] : bases[b + 1]] if member == "seq" else columns[member][lo:hi])
             for member in MEMBERS}
            for b, (lo, hi) in enumerate(itertools.pairwise(cuts))]


# Set before the worker pool forks: what every segment task needs besides its byte range.
_BUILD: dict = {}


def shards_per_segment(options: ShardOptions) -> int:
    """The most shards one segment can give a split: it numbers its shards from ``segment * this``.

    Every line of segment k starts in ``[k * segment_bytes, (k + 1) * segment_bytes)`` and a
    valid row takes at least 2 bytes (a base and the newline; the file's last line 1).
    """
    max_rows = (options.segment_bytes + 1) // 2 + 1
    return -(-max_rows // (options.rows_per_block * options.blocks_per_shard))


def shard_name(split: str, segment: int, i: int, options: ShardOptions) -> str:
    """The name of the ``i``-th shard of ``split`` written from segment ``segment``: ``{split}-{n:06d}``.

    ``n`` numbers the shards of a split in file order, with gaps between segments, and
    depends on the segment alone, so a worker names its shards without waiting for the
    segments before it; a file of one segment gets 0, 1, 2, ...
    """
    per_segment = shards_per_segment(options)
    if i >= per_segment:  # cannot happen: shards_per_segment bounds the rows of a segment
        raise RuntimeError(f"segment {segment} gives more than {per_segment} shards to {split}")
    return f"{split}-{segment * per_segment + i:06d}"


def _write_shard(out: Path, name: str, rows: Rows, flags: np.ndarray, idx: np.ndarray, per_block: int) -> dict:
    """Encode the rows ``idx`` as the shard ``name`` and write it atomically (fsynced by its segment's flush thread)."""
    blocks = block_arrays(rows, flags, idx, per_block)
    data, index = encode_shard(name, blocks)
    with atomic_open(out / f"{name}.tar", "wb", fsync=False) as handle:
        handle.write(data)  # flushed by the segment's fsync thread (_segment_task), its name by the build
    return {
        "name": name,
        "file": f"{name}.tar",
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "rows": int(len(idx)),
        "blocks": [b.to_list() for b in index],
    }


def _first_line(position: int, lines: int) -> int:
    """Publish that the segment at ``position`` (in file order) holds ``lines`` lines; wait for those before it
    and return the number of its first line.

    Segments are handed out in file order, so every earlier one is done or being parsed by
    another process, which publishes before it waits: the earliest unfinished one never waits.
    """
    counts, ready = _BUILD["line_counts"], _BUILD["lines_ready"]
    with ready:
        counts[position] = lines
        ready.notify_all()
        ready.wait_for(lambda: min(counts[:position], default=0) >= 0)
        return 1 + sum(counts[:position])


def _segment_task(task: tuple[int, int, int, int]) -> dict:
    """Parse one segment of the source and write its shards; return only entries, counts, rejections, labels.

    Line numbers are counted within the segment while parsing and shifted once the segments
    before it have published their line counts (:func:`_first_line`), so no process reads the
    file ahead of the parse just to count lines. Per split, the segment's rows in file order
    are cut into shards of ``rows_per_block * blocks_per_shard``. A shard a killed build
    finished (logged, same sha256) is kept, not rewritten. The labels come back per shard,
    float32 in row order, for the top-expression threshold and each block's count of it.
    """
    position, segment, start, end = task
    source, out, options, read_options, state = (_BUILD[k] for k in ("source", "out", "options", "read", "state"))
    read = read_segment(source, start, end, 1, read_options)
    # Every segment but the file's last ends with a newline: its lines are the rows it saw.
    shift = _first_line(position, read.rows_in) - 1
    if shift:
        read.rows.lines += shift
        read.rejected = [replace(r, line=r.line + shift) for r in read.rejected]
    result = {"segment": segment, "rows_in": read.rows_in, "rejected": read.rejected, "warnings": read.warnings,
              "bytes": end - start, "shards": [], "labels": [], "rows_integer": 0}
    if read.rejected and read_options.strict:
        return result  # the build stops at the first bad row: nothing of this segment is written
    rows = read.rows
    flags = row_flags(rows)
    result["rows_integer"] = int((flags & FLAG_INTEGER > 0).sum())
    # Each written shard is fsynced by a thread (fsync releases the GIL) while this process encodes the next,
    # and the segment is done only once all of its shards are on disk: the build's end flushes no shard bytes.
    flushed: list[Future] = []
    with ThreadPoolExecutor(1) as flusher:
        _write_segment_shards(out, state, segment, rows, flags, options, result, flusher, flushed)
    for done in flushed:
        done.result()  # an I/O error fails the build here, as the OS reports it
    return result


def _write_segment_shards(out: Path, state: dict, segment: int, rows: Rows, flags: np.ndarray,
                          options: ShardOptions, result: dict, flusher: ThreadPoolExecutor,
                          flushed: list[Future]) -> None:
    """Cut the segment's rows into shards per split (file order) and write or reuse each; the written ones
    are handed to ``flusher`` to fsync (their futures appended to ``flushed``)."""
    split_of_row = assign_splits(rows.hash, options)
    per_block = options.rows_per_block
    per_shard = per_block * options.blocks_per_shard
    for s, (split, _) in enumerate(options.splits):
        idx = np.flatnonzero(split_of_row == s)
        for i, lo in enumerate(range(0, len(idx), per_shard)):
            part = idx[lo : lo + per_shard]
            name = shard_name(split, segment, i, options)
            entry = _reusable(out, state, name, len(part), per_block)
            written = entry is None
            if written:
                entry = _write_shard(out, name, rows, flags, part, per_block)
                _log_shard(out / BUILD_STATE, entry)  # here, as soon as the shard is whole: a kill loses no more
                flushed.append(flusher.submit(fsync_file, out / entry["file"]))
            result["shards"].append((split, entry, written))
            result["labels"].append(rows.labels[part])


def _set_rows_top(entry: dict, labels: np.ndarray, threshold: float, rows_per_block: int) -> dict:
    """``entry`` with each block's ``rows_top``: its labels >= ``threshold`` (float32, as the loader compares)."""
    top = labels >= np.float32(threshold)
    blocks = []
    at = 0
    for block in entry["blocks"]:
        index = BlockIndex(*block)
        blocks.append(replace(index, rows_top=int(top[at : at + index.rows].sum())).to_list())
        at += index.rows
    return entry | {"blocks": blocks}


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


def _fingerprint(source_digest: str, read_options: ReadOptions, options: ShardOptions) -> dict:
    read = {k: v for k, v in asdict(read_options).items() if k not in ("workers", "chunk_bytes")}
    fingerprint = {"format_version": FORMAT_VERSION, "source_xxh3_128": source_digest, "read": read, "shards": asdict(options)}
    return json.loads(json.dumps(fingerprint))  # the form it takes when read back from JSON


_SHARD_NAME = re.compile(r"[^\W\d]\w*-\d{6,}")
"""A shard's name as the writer makes it: ``{split}-{i:06d}`` (:func:`shard_name`)."""
_SHARD_FILE = re.compile(r"[^\W\d]\w*-\d{6,}\.tar")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_XXH3_128 = re.compile(r"[0-9a-f]{32}")
_LABEL_MODES = re.compile("required|optional")
_TEMPORARY = re.compile(
    r"(?:manifest\.json|build-state\.jsonl|rejected\.tsv|\.write-check|source\.decompressed"
    r"|[^\W\d]\w*-\d{6,}\.tar)"
    r"\.tmp-\d+(?:-[0-9A-Za-z_-]+)?"
)
"""Temporaries this tool creates in a shard folder (``io.atomic_open``: ``<name>.tmp-<pid>-<random>``, earlier
``<name>.tmp-<pid>``; the writability probe of ``io.check_output_folder``; the plain copy of a gzip source)."""


def _read_state(path: Path) -> dict:
    """The build log: its first line is the fingerprint, each further line a finished shard.

    A line cut short by a kill, or not of the form this tool writes, is ignored (that
    shard is simply written again). A log whose first line is no fingerprint is not ours:
    its fingerprint is None and it lists no shards.
    """
    state: dict = {"fingerprint": None, "shards": {}}
    if not os.path.lexists(path):
        return state
    text = _read_small_file(path, "a shard build log")
    typed = _ManifestFields(path)
    for i, line in enumerate(text.splitlines()):
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):
            if i == 0:
                return state
            continue
        if i == 0:
            if not isinstance(entry, dict) or not isinstance(entry.get("fingerprint"), dict):
                return state
            state["fingerprint"] = entry["fingerprint"]
            continue
        try:
            typed.shard_entry(entry, f"line {i + 1}")
        except UserError:
            continue
        state["shards"][entry["name"]] = entry
    return state


def _start_state(path: Path, fingerprint: dict) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(json.dumps({"fingerprint": fingerprint}) + "\n")


def _log_shard(path: Path, entry: dict) -> None:
    """Append a finished shard to the build log: one write of one line, from whichever worker wrote the shard.

    O_APPEND places each write whole at the end, so workers logging at once do not
    interleave lines; a line cut short by a kill is ignored on resume (the shard is rewritten).
    No fsync: a lost line only means the shard is rewritten; reused shards are checked by sha256.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.write(fd, (json.dumps(entry) + "\n").encode())
    finally:
        os.close(fd)


def _reusable(out_dir: Path, state: dict, name: str, rows: int, rows_per_block: int) -> dict | None:
    """A finished shard from an interrupted build, if its log entry is well formed, holds ``rows`` rows in
    blocks of ``rows_per_block`` and its bytes are intact (sha256)."""
    entry = state.get("shards", {}).get(name)
    path = out_dir / f"{name}.tar"
    if entry is None or entry["file"] != path.name or entry["rows"] != rows or not path.is_file() \
            or path.stat().st_size != entry["bytes"]:
        return None
    try:
        blocks = shard_blocks(entry, out_dir / BUILD_STATE)
    except UserError:
        return None  # a damaged log line: the shard is simply written again
    if [b.rows for b in blocks] != [min(rows_per_block, rows - at) for at in range(0, rows, rows_per_block)]:
        return None
    return entry if sha256_file(path) == entry["sha256"] else None


def _previous_manifest(path: Path) -> dict | None:
    """The manifest of an earlier build in the output folder (any format version), None if there is none."""
    if not os.path.lexists(path):
        return None
    try:
        return check_manifest(_parse_json(path, _read_small_file(path, "a shard manifest")), path, readable=False)
    except UserError as exc:
        raise UserError(f"{exc}; shards build writes only into its own folders: choose another --out") from None


def _check_ours(out: Path, previous: dict | None, state: dict) -> None:
    """UserError unless ``out`` is a shard folder of this tool (its manifest or build log) or holds no files.

    Files are what a build could overwrite or remove; subfolders (``submit shards`` keeps its
    job files in ``slurm/`` inside the shard folder) are never touched, so they do not count.
    """
    if previous is not None or state["fingerprint"] is not None:
        return
    foreign = sorted(p.name for p in out.iterdir()
                     if not _TEMPORARY.fullmatch(p.name) and (p.is_symlink() or not p.is_dir()))
    if foreign:
        raise UserError(
            f"{out}: holds files ({_show(foreign[0])}{' ...' if len(foreign) > 1 else ''}) but no {MANIFEST} or "
            f"{BUILD_STATE} of a shard build; choose an empty or new --out (nothing was changed)"
        )


def _remove_temporaries(out: Path) -> None:
    """Delete leftovers of a killed build: only files named as this tool names its temporaries."""
    for path in out.iterdir():
        if _TEMPORARY.fullmatch(path.name) and (path.is_symlink() or not path.is_dir()):
            path.unlink(missing_ok=True)


def _listed_shards(out: Path, previous: dict | None, state: dict) -> list[str]:
    """Shard files of earlier builds that the old manifest or the build log lists and that exist."""
    names = {entry["file"] for entry in state["shards"].values()}
    if previous is not None:
        names |= {shard["file"] for info in previous["splits"].values() for shard in info["shards"]}
    return sorted(name for name in names if (out / name).is_symlink() or (out / name).is_file())


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

    ``workers`` processes (default: one per core) each parse and write one segment of
    ``options.segment_bytes`` at a time (:func:`_build_segments`); the output does not
    depend on their number. Rerunning after an interruption reuses the shards already
    finished (checked by sha256) and produces byte-identical output. An output folder built from another
    source or with other options is refused unless ``overwrite``; then only the files its
    old manifest and build log list are removed. A folder that is neither empty nor a
    shard folder of this tool is refused, ``overwrite`` or not.
    """
    t0 = time.perf_counter()
    source, out = Path(source), Path(out_dir)
    workers = (os.cpu_count() or 1) if workers is None else workers
    require_regular_file(source, "a DREAM text file")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: not a folder")
    out.mkdir(parents=True, exist_ok=True)
    manifest_path, state_path = out / MANIFEST, out / BUILD_STATE
    previous = _previous_manifest(manifest_path)
    state = _read_state(state_path)
    _check_ours(out, previous, state)
    _remove_temporaries(out)  # leftovers of a killed build, only once the folder is known to be ours

    source_digest = xxh3_128_file(source)  # not sha256: this pass is serial, before any worker starts
    fingerprint = _fingerprint(source_digest, read_options, options)
    if previous is not None and previous["fingerprint"] == fingerprint and not overwrite:
        log(f"{out}: already built from this source with these options (manifest.json); nothing to do")
        return BuildResult(str(out), previous, time.perf_counter() - t0, 0, 0, ReadReport(str(source)))
    existing = _listed_shards(out, previous, state)
    if not overwrite and existing and state.get("fingerprint") != fingerprint:
        if previous is not None and previous["format_version"] < FORMAT_VERSION:
            version = previous["format_version"]
            raise UserError(f"{out}: holds shards of format version {version} ({_OLD_FORMATS_SHORT[version]}); "
                            "pass --overwrite to rebuild them")
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

    plain = source
    if is_gzip(source):
        # A gzip stream cannot be read from an offset: one plain copy, cut as the plain file would be.
        # mkstemp: a random name opened O_CREAT|O_EXCL (mode 0600), so a link planted in a shared
        # folder is never followed nor truncated; the name still matches _TEMPORARY.
        fd, name = tempfile.mkstemp(dir=out, prefix=f"source.decompressed.tmp-{os.getpid()}-")
        plain = Path(name)
    try:
        if plain != source:
            with os.fdopen(fd, "wb") as handle:
                decompress_to(source, handle)
        report, threshold, results, reused, rows_integer = _build_segments(plain, source, out, state, options,
                                                                           read_options, workers, progress)
    finally:
        if plain != source:
            plain.unlink(missing_ok=True)

    _write_rejected(out / REJECTED, report)
    # Written shards were fsynced by their workers; reused ones may still be dirty pages of the killed build.
    fsync_paths([out / name for name in reused])
    fsync_folder(out)  # the shards' names (renamed into place by the workers)
    manifest = _manifest(source, source_digest, fingerprint, report, options, threshold, results, rows_integer)
    write_json_atomic(manifest_path, manifest)
    state_path.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    return BuildResult(str(out), manifest, seconds, len(results) - len(reused), len(reused), report)


def _build_segments(plain: Path, source: Path, out: Path, state: dict, options: ShardOptions,
                    read_options: ReadOptions, workers: int, progress: bool,
                    ) -> tuple[ReadReport, float, list[tuple[str, dict, np.ndarray]], list[str], int]:
    """Cut ``plain`` (the source, or its decompressed copy) into segments; each worker parses and writes one at
    a time. Returns the read report, the top-expression threshold, (split, entry with ``rows_top``, labels) of
    every shard in segment order, the files of the shards reused (not written) and the number of integer labels.

    Raises InputError for a strict-mode bad row (the first in the file), a file without valid
    rows or one with more bad rows than ``max_bad_fraction``.
    """
    report = ReadReport(str(source))
    bounds = segment_bounds(plain, options.segment_bytes)
    bar = pool = None
    context = mp.get_context("fork")
    line_counts = context.RawArray("q", len(bounds))  # shared: -1 until the segment is parsed
    line_counts[:] = [-1] * len(bounds)
    _BUILD.update(source=plain, out=out, options=options, read=read_options, state=state,
                  line_counts=line_counts, lines_ready=context.Condition())  # before the fork
    try:
        if workers > 1 and len(bounds) > 1:
            pool = context.Pool(workers)
        tasks = [(position, k, start, end) for position, (k, start, end) in enumerate(bounds)]
        done = pool.imap(_segment_task, tasks) if pool is not None else map(_segment_task, tasks)
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(end - start for _, start, end in bounds), unit="B", unit_scale=True,
                       desc=f"shards {source.name}")
        shards: list[tuple[str, dict, np.ndarray]] = []
        rows_integer = 0
        reused: list[str] = []
        for part in done:  # in segment order: the first bad row a strict build meets is the file's first
            if part["rejected"] and read_options.strict:
                first = part["rejected"][0]
                raise InputError(str(source), first.detail, line=first.line, field=first.field)
            report.rows_in += part["rows_in"]
            report.rejected.update(r.reason for r in part["rejected"])
            report.rejected_rows.extend(part["rejected"])
            report.warnings.extend(part["warnings"])
            report.bytes_read += part["bytes"]
            rows_integer += part["rows_integer"]
            for (split, entry, new), labels in zip(part["shards"], part["labels"]):
                report.rows_ok += entry["rows"]
                if not new:
                    reused.append(entry["file"])
                shards.append((split, entry, labels))
            if bar is not None:
                bar.update(part["bytes"])
        if pool is not None:
            pool.close()
            pool.join()
    finally:
        _BUILD.clear()
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()
    report.check_whole_file(read_options)
    labels = np.concatenate([labels for _, _, labels in shards])  # 4 B per row, partitioned in place
    threshold = top_threshold(labels, options.top_fraction, overwrite=True)
    del labels
    shards = [(split, _set_rows_top(entry, labels, threshold, options.rows_per_block), labels)
              for split, entry, labels in shards]
    return report, threshold, shards, reused, rows_integer


def _write_rejected(path: Path, report: ReadReport) -> None:
    """Every rejected row: line, reason, field, detail and its raw text (escaped, truncated)."""
    with atomic_open(path, "w") as handle:
        handle.write("line\treason\tfield\tdetail\traw\n")
        for r in report.rejected_rows:
            raw = r.raw.decode("utf-8", "backslashreplace").replace("\t", "\\t").replace("\r", "\\r")
            handle.write(f"{r.line}\t{r.reason}\t{r.field}\t{r.detail}\t{raw}\n")


def _manifest(source, source_digest, fingerprint, report, options, threshold, results, rows_integer) -> dict:
    # Entries were written by encode_shard or checked by _reusable: well formed.
    blocks = [shard_blocks(entry, MANIFEST) for _, entry, _ in results]
    splits = {}
    for split, _ in options.splits:
        mine = [i for i, (name, _, _) in enumerate(results) if name == split]
        splits[split] = {
            "rows": sum(results[i][1]["rows"] for i in mine),
            "rows_nad": sum(b.rows_nad for i in mine for b in blocks[i]),
            "rows_top": sum(b.rows_top for i in mine for b in blocks[i]),
            "shards": [results[i][1] for i in mine],
        }
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_by": f"promoter-dist {__version__}",
        "source": {"path": str(source), "name": source.name, "xxh3_128": source_digest, "bytes": source.stat().st_size},
        "fingerprint": fingerprint,
        "options": asdict(options),
        "schema": SCHEMA,
        "tokenizers": TOKENIZERS,
        "read": report.to_dict(),
        "rejected_file": REJECTED,
        "labels": {
            "top_fraction": options.top_fraction,
            "top_threshold": threshold,
            "rows_top": sum(info["rows_top"] for info in splits.values()),
            "rows_integer": rows_integer,
            "rows_nad": sum(info["rows_nad"] for info in splits.values()),
        },
        "rows": report.rows_ok,
        "max_row_length": int(max((b.max_length for index in blocks for b in index), default=0)),
        "splits": splits,
    }


# --------------------------------------------------------------------------- reading back


class ShardBlockError(UserError):
    """A block whose bytes or arrays differ from what its manifest entry says: file, block and byte offset."""

    def __init__(self, path: str | os.PathLike, block: int, offset: int, problem: str):
        self.path, self.block, self.offset, self.problem = str(path), block, offset, problem
        super().__init__(f"{path}: block {block} at byte {offset}: {problem}")

    def __reduce__(self):
        return UserError, (str(self),)  # crosses process boundaries as the plain one-line error


def _read_small_file(path: Path, expected: str, limit: int = MAX_MANIFEST_BYTES) -> bytes:
    """The bytes of the regular file ``path`` (``expected`` says what it should be); UserError for
    anything else (a FIFO, a device: see ``io.open_input``) or anything over ``limit`` bytes."""
    with open_input(path, expected) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise UserError(f"{path}: larger than {limit} bytes; not {expected}")
    return data


def _parse_json(path: Path, data: bytes) -> object:
    try:
        return json.loads(data)
    except RecursionError:
        raise UserError(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, integers too long to parse
        raise UserError(f"{path}: not valid JSON ({exc})") from None


def _kind(value: object) -> str:
    """The JSON name of a value's type, for messages."""
    if isinstance(value, bool):
        return "a boolean"
    for kind, name in ((dict, "an object"), (list, "a list"), (str, "a string"), (int, "an integer"),
                       (float, "a number")):
        if isinstance(value, kind):
            return name
    return "null" if value is None else type(value).__name__


class _ManifestFields:
    """Typed reads from a parsed manifest or build log; a failure is one UserError naming the file and field path."""

    def __init__(self, path: str | os.PathLike):
        self.path = path

    def fail(self, where: str, problem: str) -> NoReturn:
        """Raise the one-line error ``<file>: <field path>: <problem>``."""
        raise UserError(f"{self.path}: {where}: {problem}")

    def obj(self, value: object, where: str) -> dict:
        """``value`` if it is a JSON object."""
        if not isinstance(value, dict):
            self.fail(where, f"expected an object, got {_kind(value)}")
        return value

    def member(self, parent: dict, key: str, where: str) -> tuple[object, str]:
        """``parent[key]`` and its field path."""
        path = f"{where}.{key}" if where else key
        if key not in parent:
            self.fail(path, "missing")
        return parent[key], path

    def child(self, parent: dict, key: str, where: str) -> dict:
        """The object ``parent[key]``."""
        return self.obj(*self.member(parent, key, where))

    def items(self, parent: dict, key: str, where: str) -> list:
        """The list ``parent[key]``."""
        value, path = self.member(parent, key, where)
        if not isinstance(value, list):
            self.fail(path, f"expected a list, got {_kind(value)}")
        return value

    def count(self, parent: dict, key: str, where: str) -> int:
        """The non-negative integer ``parent[key]``."""
        value, path = self.member(parent, key, where)
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(path, f"expected an integer, got {_kind(value)}")
        if value < 0:
            self.fail(path, f"negative count {value}")
        return value

    def number(self, parent: dict, key: str, where: str) -> float:
        """The number ``parent[key]`` (NaN allowed: an unlabelled file has no threshold)."""
        value, path = self.member(parent, key, where)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            self.fail(path, f"expected a number, got {_kind(value)}")
        return value

    def text(self, parent: dict, key: str, where: str, pattern: re.Pattern | None = None, meaning: str = "") -> str:
        """The string ``parent[key]``, matching ``pattern`` (described by ``meaning``) if given."""
        value, path = self.member(parent, key, where)
        if not isinstance(value, str):
            self.fail(path, f"expected a string, got {_kind(value)}")
        if pattern is not None and not pattern.fullmatch(value):
            self.fail(path, f"expected {meaning}, not {_show(value)}")
        return value

    def shard_entry(self, shard: object, where: str) -> dict:
        """One shard of a split (or one line of the build log): its name, plain file name, sha256, sizes, blocks."""
        shard = self.obj(shard, where)
        self.text(shard, "name", where, _SHARD_NAME, "a shard name like train-000000")
        name, path = self.member(shard, "file", where)
        if not isinstance(name, str):
            self.fail(path, f"expected a string, got {_kind(name)}")
        if name in ("", ".", "..") or "/" in name or "\0" in name or not name.isprintable():
            self.fail(path, f"must be a plain file name inside the shard folder, not {_show(name)}")
        if not _SHARD_FILE.fullmatch(name):
            self.fail(path, f"expected a shard file name like train-000000.tar, not {_show(name)}")
        self.text(shard, "sha256", where, _SHA256, "64 lower-case hex digits")
        self.count(shard, "bytes", where)
        self.count(shard, "rows", where)
        self.items(shard, "blocks", where)  # entries: BlockIndex.from_list, where they are used
        return shard


def check_manifest(manifest: object, path: str | os.PathLike, readable: bool = True) -> dict:
    """``manifest`` (parsed JSON of the file ``path``) if it has the shape readers rely on; UserError otherwise.

    Every field a reader uses is checked for its type (counts non-negative, shard files plain
    names inside the folder); the message names the file and the field path, e.g.
    ``splits.train.shards[3].file``. Block entries are parsed where used (:func:`shard_blocks`).
    ``readable=False`` also accepts older format versions (a rebuild reads which files they list).
    """
    typed = _ManifestFields(path)
    top = typed.obj(manifest, "top level")
    if top.get("format") != FORMAT:
        raise UserError(f"{path}: not a promoter-dist shard manifest")
    version, where = typed.member(top, "format_version", "")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        typed.fail(where, f"{_show(version)} is not a format this promoter-dist reads (1 to {FORMAT_VERSION})")
    if readable and version < FORMAT_VERSION:
        raise UserError(f"{path}: format_version {version}: {_OLD_FORMATS[version]}; rebuild them "
                        "(promoter-dist shards build SOURCE --out DIR --overwrite)")
    typed.count(top, "rows", "")
    typed.count(top, "max_row_length", "")
    source = typed.child(top, "source", "")
    typed.text(source, "path", "source")
    if version >= 4:  # older folders are read only to rebuild them: which shard files they list
        typed.text(source, "xxh3_128", "source", _XXH3_128, "32 lower-case hex digits")
    fingerprint = typed.child(top, "fingerprint", "")
    typed.text(typed.child(fingerprint, "read", "fingerprint"), "labels", "fingerprint.read",
                _LABEL_MODES, "'required' or 'optional'")
    read = typed.child(top, "read", "")
    for key in ("rows_in", "rows_ok", "rows_rejected"):
        typed.count(read, key, "read")
    labels = typed.child(top, "labels", "")
    typed.number(labels, "top_threshold", "labels")
    typed.count(labels, "rows_top", "labels")
    splits = typed.child(top, "splits", "")
    for split, info in splits.items():
        if not split.isidentifier():
            typed.fail("splits", f"split name {_show(split)} is not a plain name (letters, digits, _)")
        where = f"splits.{split}"
        info = typed.obj(info, where)
        for key in ("rows", "rows_nad", "rows_top"):
            typed.count(info, key, where)
        for i, shard in enumerate(typed.items(info, "shards", where)):
            typed.shard_entry(shard, f"{where}.shards[{i}]")
    return top


def load_manifest(shard_dir: str | os.PathLike) -> dict:
    """The validated manifest of a built shard folder (UserError if missing, unreadable or malformed)."""
    path = Path(shard_dir) / MANIFEST
    if not os.path.lexists(path):
        raise UserError(f"{path}: no manifest; build the shards first (promoter-dist shards build)")
    return check_manifest(_parse_json(path, _read_small_file(path, "a shard manifest")), path)


def labels_required(manifest: dict) -> bool:
    """Whether the shards were built from a labelled file: then every stored label is finite."""
    return manifest["fingerprint"]["read"]["labels"] == "required"


def iter_tar_members(data: bytes, where: str = "", start: int = 0, end: int | None = None,
                     ) -> Iterator[tuple[str, memoryview]]:
    """(name, body) of the regular-file members of an uncompressed tar held in ``data[start:end]``.

    The reader symmetric to :func:`encode_shard`: USTAR headers, parsed directly,
    which is ~50x cheaper per member than ``tarfile``. Shards stay readable by any tar.
    A malformed header is a ValueError naming ``where`` and the byte in ``data``. Each body
    is a view into ``data``, not a copy: the block's bytes are read (hashed, decoded) in place.
    """
    end = len(data) if end is None else end
    prefix_where = f"{where}: " if where else ""
    view = memoryview(data)
    at = start
    while at + 512 <= end:
        header = data[at : at + 512]
        if header.count(0) == 512:  # end-of-archive
            return
        try:
            checksum = int(header[148:156].strip(b"\0 ") or b"-1", 8)
            size = int(header[124:136].strip(b"\0 ") or b"0", 8)
            name = header[:100].split(b"\0", 1)[0].decode()
            prefix = header[345:500].split(b"\0", 1)[0].decode()
        except ValueError:  # not octal, not UTF-8
            raise ValueError(f"{prefix_where}malformed tar header at byte {at}") from None
        if sum(header[:148]) + 8 * 32 + sum(header[156:]) != checksum:
            raise ValueError(f"{prefix_where}bad tar header checksum at byte {at}")
        body = at + 512
        if body + size > end:
            raise ValueError(f"{prefix_where}member {_show(name)} cut short at byte {end}")
        if header[156:157] in (b"0", b"\0"):
            yield (f"{prefix}/{name}" if prefix else name), view[body : body + size]
        at = body + (size + 511) // 512 * 512


_NPY_HEADER = re.compile(rb"\{'descr': '([^']+)', 'fortran_order': False, 'shape': \((\d+),\), \} *\n")
_MEMBER_NPY = {member: (descr.encode(), np.dtype(descr)) for member, descr in MEMBER_DTYPES.items()}
_SUM, _MAX = np.add.reduce, np.maximum.reduce
# Which flag values carry the NAD bit (a selector over the flag counts): summing theirs gives the view's rows.
_NAD_FLAG_SELECTOR = [bool(value & FLAG_NAD) for value in range(KNOWN_FLAGS + 1)]
# check_block tells unknown flag bits by a maximum: that needs the known bits to be the low ones.
assert KNOWN_FLAGS & (KNOWN_FLAGS + 1) == 0
# The most uint16 lengths whose sum fits uint32 exactly: 65,536 x 65,535 < 2**32.
_UINT32_EXACT_ROWS = 2**32 // 2**16
# 65,536 NAD lengths (110) as the shards store them: NAD rows' lengths are compared with a prefix of it as
# bytes, one memcmp instead of two reductions (0.2 us against 1.7 us for 850 rows).
_NOMINAL_LENGTHS = np.full(_UINT32_EXACT_ROWS, NOMINAL_LENGTH, np.dtype(MEMBER_DTYPES["len"])).tobytes()


def _load_npy(data: bytes | memoryview, member: str) -> np.ndarray:
    """The ``.npy`` payload of ``member`` as the writer makes it (1-D, its dtype), without copying the body.

    The header is matched by one regex, never evaluated (numpy's own parser also costs
    more than the rest of a block); any other header, dtype or body size is a ValueError.
    """
    descr, dtype = _MEMBER_NPY[member]
    if data[:8] != b"\x93NUMPY\x01\x00":
        raise ValueError(f"{member}: not an .npy array (format 1.0)")
    body = 10 + int.from_bytes(data[8:10], "little")
    match = _NPY_HEADER.match(data, 10, body)
    if match is None or match.end() != body:
        raise ValueError(f"{member}: not a one-dimensional .npy array as shards build writes it")
    if match.group(1) != descr:
        found = match.group(1).decode("ascii", "replace")
        raise ValueError(f"{member}: dtype {_show(found)}, expected {descr.decode()!r}")
    count = int(match.group(2))
    if body + count * dtype.itemsize != len(data):
        raise ValueError(f"{member}: {count} values of {descr.decode()} but a body of {len(data) - body} bytes")
    return np.frombuffer(data, dtype=dtype, count=count, offset=body)


def _decode_block(data: bytes, start: int, end: int) -> dict[str, np.ndarray]:
    """The member arrays of the one block held in ``data[start:end]``: exactly :data:`MEMBERS`, one key."""
    block: dict[str, np.ndarray] = {}
    stem = None
    for name, payload in iter_tar_members(data, "", start, end):
        key, _, rest = name.partition(".")
        member = rest.removesuffix(".npy")
        if rest != f"{member}.npy" or member not in MEMBER_DTYPES or member in block or stem not in (None, key):
            raise ValueError(f"unexpected tar member {_show(name)}")
        stem = key
        block[member] = _load_npy(payload, member)
    if len(block) != len(MEMBERS):
        raise ValueError(f"members {', '.join(sorted(block)) or 'none'}; expected {', '.join(MEMBERS)}")
    return block


def check_block(block: dict[str, np.ndarray], entry: BlockIndex, labelled: bool,
                top_threshold: float | None = None, view: str | None = None) -> str | None:
    """What is wrong with a decoded block against the schema and its index entry, or None.

    Vectorised, a few microseconds per block: row counts, lengths summing to the bases
    held, base codes 0..4, known flag bits, finite labels (``labelled``; else NaN marks an
    unlabelled row, never infinity) and the view counts (the top-expression count only
    given the manifest's ``top_threshold``).

    ``view``: the loader's view (a key of :data:`VIEWS`) that reads the block, which makes
    some checks itself as it lays the rows out, so they are left out here: every view counts
    its own rows as it selects them (the other views' counts play no part in its epoch plan)
    and sums the lengths as it finds where rows start (:func:`row_offsets`); the NAD view
    checks the lengths and codes of the only rows it reads (:func:`nad_row_codes`), so the
    longest row (which sets the other views' width) and the scan of the block's codes are
    left out too. That NAD-eligible rows are 110 bp of A C G T is checked there, and by
    ``shards verify``.
    """
    seq, lengths, y, flags = block["seq"], block["len"], block["y"], block["flags"]
    if not len(lengths) == len(y) == len(flags) == len(block["line"]) == entry.rows:
        return (f"row counts differ: len {len(lengths)}, y {len(y)}, line {len(block['line'])}, flags {len(flags)}; "
                f"the manifest says {entry.rows}")
    # The ufuncs' reduce directly: these arrays are small, so the per-call cost of .sum()/.max() counts.
    # uint16 lengths sum exactly in uint32 up to 65,536 rows, and that cast is cheaper than uint64's.
    if view is None:
        total = int(_SUM(lengths, dtype=np.uint32 if len(lengths) <= _UINT32_EXACT_ROWS else np.uint64))
        if total != len(seq):
            return _lengths_problem(total, len(seq))
    if view != "nad":  # the NAD view checks the only rows it reads itself (nad_row_codes): 110 bp of A C G T
        longest = int(_MAX(lengths)) if len(lengths) else 0
        if longest != entry.max_length:
            return f"longest row is {longest} bp; the manifest says {entry.max_length}"
        top_code = int(_MAX(seq)) if len(seq) else 0
        if top_code > MAX_CODE:
            return f"base code {top_code} outside 0..{MAX_CODE} (A C G T N)"
    if view is None:
        counts = np.bincount(flags, minlength=KNOWN_FLAGS + 1)
        known = len(counts) <= KNOWN_FLAGS + 1
    else:  # the known bits are the low ones, so a maximum tells (cheaper than counting)
        known = not len(flags) or int(_MAX(flags)) <= KNOWN_FLAGS
    if not known:
        unknown = int(np.bitwise_or.reduce(flags)) & ~KNOWN_FLAGS
        return f"unknown flag bits {unknown:#04x} (known: {KNOWN_FLAGS:#04x})"
    if view is None:
        nad = sum(itertools.compress(counts.tolist(), _NAD_FLAG_SELECTOR))  # four numbers: Python beats numpy calls
        top = entry.rows_top if top_threshold is None else int((y >= np.float32(top_threshold)).sum())
        if (nad, top) != (entry.rows_nad, entry.rows_top):
            return (f"{nad} NAD-eligible and {top} top-expression rows; the manifest says {entry.rows_nad} and "
                    f"{entry.rows_top}")
    if math.isfinite(_SUM(y)):  # one reduction: NaN and infinity carry through a sum (finite overflow: look closer)
        return None
    if labelled and not np.isfinite(y).all():
        row = int(np.flatnonzero(~np.isfinite(y))[0])
        return f"row {row} has label {y[row]} in shards built from a labelled file"
    if not labelled and np.isinf(y).any():
        return f"row {int(np.flatnonzero(np.isinf(y))[0])} has an infinite label"
    return None


def _lengths_problem(total: int, held: int) -> str:
    return f"row lengths sum to {total} bases but seq holds {held}"


def row_offsets(block: dict[str, np.ndarray]) -> np.ndarray:
    """Where each row of a block starts in its ``seq`` (int64); a ValueError unless the lengths sum to its size.

    Every layout of rows needs these offsets, so the lengths' sum comes with them at no cost:
    the loader's views leave that check of :func:`check_block` to this function.
    """
    lengths = block["len"].astype(np.int64)
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    if total != len(block["seq"]):
        raise ValueError(_lengths_problem(total, len(block["seq"])))
    return ends - lengths


def nad_row_codes(block: dict[str, np.ndarray], rows: np.ndarray, check: bool = True) -> np.ndarray:
    """(n, 110) base codes of a block's NAD-eligible ``rows``; ``check``: a ValueError unless each is 110 bp of A C G T.

    NAD reads its words from exactly 110 bases of A C G T: a shorter row, a longer one, an N
    or a code outside the alphabet would make word ids outside the vocabulary. As the rows
    are 110 bp, each is one copy of 110 bases from where it starts, with neither the padding
    nor the clipping of :func:`padded_codes`. The lengths' sum is checked with the offsets
    (:func:`row_offsets`), the rows' lengths before the copy (a short row would read into the
    next one; compared as bytes) and their codes after it (one reduction).
    ``check=False`` trusts the flags (only for measuring what the checks cost).
    """
    if not len(rows):
        return np.empty((0, NOMINAL_LENGTH), np.uint8)
    offsets = row_offsets(block)[rows]
    if check:
        lengths = block["len"][rows]
        if not (_NOMINAL_LENGTHS.startswith(lengths.tobytes()) if 2 * len(rows) <= len(_NOMINAL_LENGTHS)
                else bool((lengths == NOMINAL_LENGTH).all())):
            raise ValueError(f"a row flagged NAD-eligible is {int(lengths[lengths != NOMINAL_LENGTH][0])} bp, "
                             f"not {NOMINAL_LENGTH}")
    codes = gather_windows(block["seq"], offsets, NOMINAL_LENGTH)
    if check and _MAX(codes, axis=None) > T:
        if _MAX(codes, axis=None) > MAX_CODE:
            raise ValueError(f"a row flagged NAD-eligible holds a base code outside 0..{MAX_CODE} (A C G T N)")
        raise ValueError("a row flagged NAD-eligible holds an N")
    return codes


def _read_range(path: str | os.PathLike, offset: int, nbytes: int) -> bytes:
    """``nbytes`` bytes of the regular file ``path`` from ``offset``, with one pread; UserError otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO under a shard's name must not hang the reader
    except OSError as exc:
        raise UserError(f"{path}: cannot read the shard ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UserError(f"{path}: {file_kind(info.st_mode)}, not a regular file")
        if offset + nbytes > info.st_size:
            raise UserError(f"{path}: {info.st_size} bytes, but the manifest places blocks up to byte "
                            f"{offset + nbytes} (truncated shard?)")
        data = os.pread(fd, nbytes, offset)
    finally:
        os.close(fd)
    if len(data) != nbytes:
        raise UserError(f"{path}: {len(data)} bytes at {offset}, expected {nbytes} (truncated shard?)")
    return data


def read_block_range(path: str | os.PathLike, blocks: Sequence[BlockIndex], first: int = 0,
                     labelled: bool = True, verify: bool = True,
                     top_threshold: float | None = None, view: str | None = None,
                     ) -> Iterator[dict[str, np.ndarray]]:
    """Decode a run of consecutive blocks of a shard; ``blocks[0]`` is the shard's block number ``first``.

    Any block boundary is a valid tar start, so one read fetches the whole run. The tar
    is parsed by :func:`iter_tar_members` (not ``tarfile`` nor webdataset) and each
    ``.npy`` member by :func:`_load_npy`. With ``verify`` each block's bytes are hashed
    against its checksum before decoding and its arrays checked by :func:`check_block`
    (``labelled``: finite labels; ``top_threshold``: the top-expression counts too; ``view``: the
    loader's view, which makes some of them itself) before it is yielded; any difference is a
    :class:`ShardBlockError` naming the file, block and byte offset. ``verify=False``
    exists only to measure what the checks cost.
    """
    if not blocks:
        return
    start = blocks[0].offset
    data = _read_range(path, start, blocks[-1].offset + blocks[-1].nbytes - start)
    held = memoryview(data)
    for number, entry in enumerate(blocks, start=first):
        lo = entry.offset - start
        hi = lo + entry.nbytes
        if verify and block_checksum(held[lo:hi]) != entry.checksum:
            raise ShardBlockError(path, number, entry.offset, "checksum differs from the manifest (the shard is "
                                  "corrupt or was altered: rebuild or restore it)")
        try:
            block = _decode_block(data, lo, hi)
            problem = check_block(block, entry, labelled, top_threshold, view) if verify else None
        except ValueError as exc:
            problem = str(exc)
        if problem is not None:
            raise ShardBlockError(path, number, entry.offset, problem)
        yield block


def padded_codes(block: dict[str, np.ndarray], rows: np.ndarray | None = None, width: int | None = None) -> np.ndarray:
    """(n, width) PAD-padded codes for ``rows`` of a block (all rows if None); a longer row is cut at ``width``.

    Each row is one copy of ``width`` bases from where it starts in ``seq`` (:func:`gather_windows`);
    what lies beyond its length becomes PAD by ORing in a 0/255 window of a constant table and
    clipping to PAD (stored codes are 0..4, :func:`check_block`): two passes instead of a
    boolean-mask assignment, which cost more than the rest of the layout. A ValueError when the
    lengths do not sum to the bases held (:func:`row_offsets`).
    """
    offsets = row_offsets(block)
    lengths = block["len"]
    if rows is not None:
        lengths, offsets = lengths[rows], offsets[rows]
    lengths = lengths.astype(np.int64)
    width = int(lengths.max(initial=0)) if width is None else width
    seq = np.concatenate([block["seq"], np.full(max(width, 1), PAD, np.uint8)])
    codes = gather_windows(seq, offsets, width)
    np.bitwise_or(codes, gather_windows(_beyond(width), np.maximum(width - lengths, 0), width), out=codes)
    return np.minimum(codes, PAD, out=codes)


_BEYOND: dict[int, np.ndarray] = {}


def _beyond(width: int) -> np.ndarray:
    """``width`` zeros then ``width`` bytes of 255: its window at ``width - length`` masks what lies beyond a row."""
    if width not in _BEYOND:
        if len(_BEYOND) > 64:  # bounded: a few widths per run
            _BEYOND.clear()
        _BEYOND[width] = np.concatenate([np.zeros(width, np.uint8), np.full(width, 255, np.uint8)])
    return _BEYOND[width]


# --------------------------------------------------------------------------- verify


@dataclass
class VerifyResult:
    """What ``shards verify`` found: one line per bad shard."""

    ok: bool
    problems: list[str]
    shards_checked: int
    rows_checked: int


def verify_shards(shard_dir: str | os.PathLike, deep: bool = True) -> VerifyResult:
    """Check every shard against the manifest: presence, size, sha256 and (deep) every block's checksum and arrays.

    A shard whose sha256 differs is named with its first bad block when ``deep``.
    A malformed manifest is a UserError (nothing can be checked against it).
    """
    shard_dir = Path(shard_dir)
    manifest = load_manifest(shard_dir)
    labelled = labels_required(manifest)
    threshold = manifest["labels"]["top_threshold"]
    problems: list[str] = []
    shards_checked = rows_checked = 0
    manifest_path = shard_dir / MANIFEST
    for info in manifest["splits"].values():
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
                bad_block = _first_bad_block(path, shard, manifest_path, labelled, threshold) if deep else None
                located = "" if bad_block is None else \
                    f"; block {bad_block.block} at byte {bad_block.offset}: {bad_block.problem}"
                problems.append(f"{path}: corrupted: sha256 differs from the manifest{located}")
                continue
            if deep:
                try:
                    _check_blocks(path, shard_blocks(shard, manifest_path), labelled, threshold)
                except UserError as exc:
                    problems.append(str(exc))
                    continue
                rows_checked += shard["rows"]
    total = sum(info["rows"] for info in manifest["splits"].values())
    if total != manifest["rows"]:
        problems.append(f"manifest: split rows sum to {total}, total says {manifest['rows']}")
    read = manifest["read"]
    if read["rows_in"] != read["rows_ok"] + read["rows_rejected"] or read["rows_ok"] != manifest["rows"]:
        problems.append("manifest: rows_in != rows written + rows rejected")
    return VerifyResult(not problems, problems, shards_checked, rows_checked)


def _check_blocks(path: Path, blocks: list[BlockIndex], labelled: bool, top_threshold: float) -> None:
    """Every block of a shard: checksum, schema and view counts (:func:`check_block`) and NAD rows
    (:func:`nad_row_codes`)."""
    for number, (entry, block) in enumerate(zip(blocks, read_block_range(path, blocks, 0, labelled,
                                                                           top_threshold=top_threshold))):
        try:
            nad_row_codes(block, np.flatnonzero(block["flags"] & FLAG_NAD))
        except ValueError as exc:
            raise ShardBlockError(path, number, entry.offset, str(exc)) from None


def _first_bad_block(path: Path, shard: dict, manifest_path: Path, labelled: bool,
                     top_threshold: float) -> ShardBlockError | None:
    """The first block of a shard whose bytes or arrays differ from the manifest; None if the damage is elsewhere."""
    try:
        _check_blocks(path, shard_blocks(shard, manifest_path), labelled, top_threshold)
    except ShardBlockError as exc:
        return exc
    except UserError:
        return None
    return None
