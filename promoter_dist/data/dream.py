"""Reader for DREAM 2022 text files (``train_sequences.txt`` / ``test_sequences.txt``).

Format: one row per line, ``SEQUENCE<TAB>EXPRESSION``, no header, plain or gzip.
Every row is validated; a row that fails is never dropped silently: it is counted by
reason and kept, with its file line and raw text, in :class:`ReadReport`, so that
``rows_in == rows_ok + rows_rejected`` always holds. In strict mode the first bad
row stops the read with an :class:`~promoter_dist.errors.InputError` naming the
file, line and field.

Accepted: bases ``ACGTN`` in any case (folded to upper case), CRLF line ends, a
UTF-8 byte-order mark at the start of the file (stripped, with a warning), a last
line without newline. For test files (``labels="optional"``) the expression column
may be absent or empty; the label is then NaN.

Parsing is vectorised over chunks of a few MB (numpy over the raw bytes) and runs
in worker processes, so a 6.7M-row file is read in seconds. A shard build does not read
the whole file in one process: :func:`segment_bounds` cuts it into segments at line ends
and each worker reads its own with :func:`read_segment` (positioned reads, no data
shipped between processes); a gzip file is first decompressed once (:func:`decompress_to`).
"""

from __future__ import annotations

import gzip
import math
import multiprocessing as mp
import os
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from ..errors import InputError, UserError
from ..io import open_input, require_regular_file
from .alphabet import ENCODE_LUT, INVALID, N, PAD
from .hashing import sequence_hash

TAB, LF, CR = 9, 10, 13
UTF8_BOM = b"\xef\xbb\xbf"
GZIP_MAGIC = b"\x1f\x8b"

#: Stable reason identifiers (the keys of ReadReport.rejected) and the field each concerns.
REASONS = {
    "empty_line": "row",
    "column_count": "row",
    "line_too_long": "row",
    "missing_label": "expression",
    "bad_label": "expression",
    "nonfinite_label": "expression",
    "empty_sequence": "sequence",
    "invalid_base": "sequence",
    "sequence_too_long": "sequence",
}

# Characters a plain decimal label can hold; anything else goes to the per-row path.
_LABEL_CHARS = np.zeros(256, dtype=bool)
for _ch in b"0123456789+-.eE":
    _LABEL_CHARS[_ch] = True
_MAX_FAST_LABEL = 32  # longer labels take the per-row path
_RAW_KEEP = 200  # bytes of a rejected row's text kept in the report


@dataclass(frozen=True)
class ReadOptions:
    """How strictly to read a DREAM file."""

    labels: str = "required"
    """"required" (training files) or "optional" (test files: label column may be absent)."""
    strict: bool = False
    """Stop at the first bad row with an error instead of counting it."""
    max_length: int = 300
    """Longest accepted sequence in bp (real rows are 87-135 bp; longer ones are rejected)."""
    max_line_bytes: int = 1 << 16
    """A line longer than this is rejected without being held in memory."""
    max_bad_fraction: float = 0.05
    """Reject the whole file when more than this fraction of rows is bad (likely the wrong file)."""
    chunk_bytes: int = 8 << 20
    """Bytes handed to one parse task."""
    workers: int | None = None
    """Parse processes (None: one per core, 0: parse in this process)."""

    def __post_init__(self) -> None:
        if self.labels not in ("required", "optional"):
            raise UserError(f"labels must be 'required' or 'optional', not {self.labels!r}")
        if self.max_length < 1:
            raise UserError(f"max_length must be >= 1, not {self.max_length}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise UserError(f"max_bad_fraction must be in [0, 1], not {self.max_bad_fraction}")
        if self.chunk_bytes < 1:  # read(0) would end the file at once, read(-1) read it whole
            raise UserError(f"chunk_bytes must be >= 1, not {self.chunk_bytes}")


@dataclass
class Rows:
    """Validated rows, in file order."""

    codes: np.ndarray
    """uint8 (n, W) base codes (alphabet.py), PAD beyond each row's length."""
    lengths: np.ndarray
    """uint16 (n,) sequence lengths."""
    labels: np.ndarray
    """float32 (n,) expression; NaN where a test file has none."""
    integer_label: np.ndarray
    """bool (n,) label is a whole number as written (a "singleton", seen once)."""
    lines: np.ndarray
    """int64 (n,) 1-based line numbers in the source file."""
    has_n: np.ndarray
    """bool (n,) the sequence contains N."""
    hash: np.ndarray
    """uint64 (n,) hash of the sequence (hashing.sequence_hash), the key of split assignment."""

    def __len__(self) -> int:
        return len(self.lengths)

    @staticmethod
    def concatenate(parts: list["Rows"]) -> "Rows":
        """Join chunks, padding codes to the widest chunk."""
        parts = [p for p in parts if len(p)] or parts[:1]
        if not parts:
            return Rows.empty()
        width = max(p.codes.shape[1] for p in parts)
        codes = np.full((sum(len(p) for p in parts), width), PAD, dtype=np.uint8)
        at = 0
        for part in parts:
            codes[at : at + len(part), : part.codes.shape[1]] = part.codes
            at += len(part)
        return Rows(
            codes=codes,
            lengths=np.concatenate([p.lengths for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            integer_label=np.concatenate([p.integer_label for p in parts]),
            lines=np.concatenate([p.lines for p in parts]),
            has_n=np.concatenate([p.has_n for p in parts]),
            hash=np.concatenate([p.hash for p in parts]),
        )

    @staticmethod
    def empty() -> "Rows":
        return Rows(
            codes=np.zeros((0, 1), np.uint8),
            lengths=np.zeros(0, np.uint16),
            labels=np.zeros(0, np.float32),
            integer_label=np.zeros(0, bool),
            lines=np.zeros(0, np.int64),
            has_n=np.zeros(0, bool),
            hash=np.zeros(0, np.uint64),
        )


@dataclass(frozen=True)
class Rejected:
    """One bad row: where, why, and its raw text (truncated)."""

    line: int
    reason: str
    field: str
    detail: str
    raw: bytes

    def message(self, path: str) -> str:
        return f"{path}:{self.line} [{self.field}]: {self.detail}"


@dataclass
class ReadReport:
    """What a read saw: counts by reason and every rejected row."""

    path: str
    rows_in: int = 0
    rows_ok: int = 0
    rejected: Counter = field(default_factory=Counter)
    rejected_rows: list[Rejected] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    bytes_read: int = 0

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejected.values())

    def summary(self, examples: int = 3) -> str:
        """A few lines for the console: counts by reason with example locations."""
        lines = [f"{self.path}: {self.rows_in} rows read, {self.rows_ok} ok, {self.rows_rejected} rejected"]
        for reason, count in self.rejected.most_common():
            shown = [r for r in self.rejected_rows if r.reason == reason][:examples]
            lines.append(f"  {reason}: {count}")
            lines.extend(f"    {r.message(self.path)}" for r in shown)
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)

    def check_whole_file(self, options: ReadOptions) -> None:
        """Raise InputError when the file held no valid row, or more bad rows than ``options.max_bad_fraction``."""
        if self.rows_ok == 0:
            if self.rows_in == 0:
                raise InputError(self.path, "the file is empty (no rows)")
            raise InputError(self.path, "no valid row\n" + self.summary())
        if self.rows_rejected > options.max_bad_fraction * self.rows_in:
            raise InputError(
                self.path,
                f"{self.rows_rejected} of {self.rows_in} rows are bad, more than max_bad_fraction="
                f"{options.max_bad_fraction}; is this the right file?\n" + self.summary(),
            )

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "rows_in": self.rows_in,
            "rows_ok": self.rows_ok,
            "rows_rejected": self.rows_rejected,
            "rejected_by_reason": dict(sorted(self.rejected.items())),
            "warnings": list(self.warnings),
        }


# --------------------------------------------------------------------------- raw chunks


def _decompressed(handle: IO[bytes]) -> IO[bytes]:
    """The bytes of an opened file: itself if plain, a gzip stream over it if gzip (by magic bytes, not suffix)."""
    magic = handle.read(2)
    handle.seek(0)
    if magic == GZIP_MAGIC:
        return gzip.GzipFile(fileobj=handle, mode="rb")  # type: ignore[return-value]
    return handle


def _read_stream(stream: IO[bytes], size: int, path: str | os.PathLike, done: int, line: int) -> bytes:
    """``stream.read(size)``; a truncated or corrupt gzip stream is an InputError saying where it broke
    (after ``done`` decompressed bytes, near line ``line``)."""
    try:
        return stream.read(size)
    except EOFError:
        raise InputError(
            str(path),
            f"truncated gzip stream: it ends after {done} decompressed bytes "
            f"(near line {line}); the file is incomplete, fetch it again",
        ) from None
    except (gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise InputError(str(path), f"corrupt gzip data near line {line} ({exc})") from None


@dataclass
class _Chunk:
    index: int
    first_line: int  # 1-based line number of the chunk's first line
    data: bytes  # whole lines (the last one may lack its newline at end of file)
    too_long: list[tuple[int, bytes]]  # (line, head) of over-long lines skipped by the splitter


def _raw_chunks(path: Path, handle: IO[bytes], options: ReadOptions, report: ReadReport,
                first_line: int = 1, file_start: bool = True) -> Iterator[_Chunk]:
    """Cut the (decompressed) byte stream ``handle`` of ``path`` into chunks of whole lines.

    A line that outgrows ``max_line_bytes`` before its newline arrives is skipped
    here, streaming, and handed to the parser as (line number, first bytes) so it
    is reported without ever being held whole. ``handle`` may be a part of the file
    (:class:`_RangeReader`) whose first line is ``first_line``; only the part at the
    ``file_start`` may begin with a byte-order mark.
    """
    carry = b""
    line_no = first_line  # number of the first line in `carry`
    index = 0
    skipping = False
    too_long: list[tuple[int, bytes]] = []
    first = file_start
    while True:
        block = _read_stream(handle, max(options.chunk_bytes, len(UTF8_BOM)) if first else options.chunk_bytes,
                             path, report.bytes_read, line_no)
        if first:
            first = False
            if block.startswith(UTF8_BOM):
                block = block[len(UTF8_BOM) :]
                report.warnings.append("UTF-8 byte-order mark at the start of the file was ignored")
                if not block:  # the block held only the mark; not the end of the file
                    continue
        report.bytes_read += len(block)
        if skipping and block:
            cut = block.find(b"\n")
            if cut < 0:
                continue
            skipping = False
            block = block[cut + 1 :]
            if not block:
                continue
        if not block:  # end of file
            if carry or too_long:
                yield _Chunk(index, line_no, carry, too_long)
            return
        data = carry + block
        last_nl = data.rfind(b"\n")
        body, carry = (data[: last_nl + 1], data[last_nl + 1 :]) if last_nl >= 0 else (b"", data)
        if body or too_long:
            yield _Chunk(index, line_no, body, too_long)
            index += 1
            too_long = []
        line_no += body.count(b"\n")
        # +1: the carry may end with the CR of a CRLF whose LF is in the next block.
        if len(carry) > options.max_line_bytes + 1:
            too_long.append((line_no, carry[:_RAW_KEEP]))
            line_no += 1
            carry = b""
            skipping = True


# --------------------------------------------------------------------------- parsing


def _classify_label(text: bytes) -> tuple[float | None, str, str]:
    """Per-row label check for what the vectorised path cannot decide."""
    shown = text[:40].decode("utf-8", "replace")
    stripped = text.strip()
    if stripped != text or b"_" in text:  # float() would accept these; the format does not
        return None, "bad_label", f"expression is not a plain number: {shown!r}"
    try:
        value = float(text)
    except ValueError:
        return None, "bad_label", f"expression is not a number: {shown!r}"
    if not math.isfinite(value):
        return None, "nonfinite_label", f"expression {shown!r} is not finite"
    return value, "", ""


_POW10 = 10.0 ** np.arange(23)
"""Powers of ten exact in float64 (up to 1e22)."""
_POW10_INT = 10 ** np.arange(19, dtype=np.int64)
"""Powers of ten in int64 (up to 1e18)."""
_MAX_DECIMAL_DIGITS = 15
"""Digits of a label the decimal path reads: below 2**53, so the mantissa is an exact float64."""


def _plain_decimals(text: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values of the labels written as ``[+-]digits[.digits]`` (at most 15 digits), and which rows are such.

    ``text`` is (n, w) uint8, each row a label of ``lengths`` bytes then zeros. The value
    is the digits as an integer m divided by 10**k (k digits after the point): both exact
    in float64, so the one correctly rounded division gives exactly what ``float()`` reads
    (Clinger's fast path). Rows of any other form are left to the general parsers.
    """
    n = len(text)
    if not n:
        return np.zeros(0), np.zeros(0, dtype=bool)
    width = int(lengths.max())
    text = text[:, :width]
    digit = (text >= ord("0")) & (text <= ord("9"))
    dot = text == ord(".")
    negative = text[:, 0] == ord("-")
    signed = negative | (text[:, 0] == ord("+"))
    n_digits = np.count_nonzero(digit, axis=1)
    n_dots = np.count_nonzero(dot, axis=1)
    decimal = ((n_digits + n_dots + signed == lengths) & (n_dots <= 1) & (n_digits >= 1)
               & (n_digits <= _MAX_DECIMAL_DIGITS))
    mantissa = np.zeros(n, dtype=np.int64)
    after_point = np.zeros(n, dtype=np.int64)
    seen_point = np.zeros(n, dtype=bool)
    # A column at a time (labels are short, rows many), over transposed copies: each column contiguous.
    columns, digit_columns, dot_columns = (np.ascontiguousarray(a.T) for a in (text, digit, dot))
    for j in range(width):
        is_digit = digit_columns[j]
        mantissa = np.where(is_digit, mantissa * 10 + columns[j] - ord("0"), mantissa)
        after_point += is_digit & seen_point
        seen_point |= dot_columns[j]
    values = mantissa / _POW10[np.minimum(after_point, len(_POW10) - 1)]
    return np.where(negative, -values, values), decimal


_ENCODE_TABLE = ENCODE_LUT.tobytes()
"""``bytes.translate`` table of the base codes (:data:`~promoter_dist.data.alphabet.ENCODE_LUT`)."""


def gather_windows(buffer: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
    """A (len(starts), width) copy of ``buffer[s : s + width]`` for each start; ``buffer`` holds every window.

    Each window is one item of a ``width``-byte void dtype over a byte-strided view, so the
    gather copies a row with one memcpy: about twice as fast as indexing a sliding_window_view.
    """
    if width < 1:
        return np.empty((len(starts), 0), dtype=np.uint8)
    items = np.ndarray(buffer=buffer, dtype=f"V{width}", shape=(len(buffer) - width + 1,), strides=(1,))
    return items[starts].view(np.uint8).reshape(len(starts), width)


def _parse_chunk(chunk: _Chunk, options: ReadOptions) -> tuple[Rows, list[Rejected], int]:
    """Validate and encode one chunk; returns (good rows, rejected rows, rows seen)."""
    arr = np.frombuffer(chunk.data, dtype=np.uint8)
    size = len(arr)
    if size == 0:
        arr = np.frombuffer(b"\n", dtype=np.uint8)[:0]
    newlines = np.flatnonzero(arr == LF)
    ends = newlines
    if size and (len(newlines) == 0 or newlines[-1] != size - 1):
        ends = np.append(newlines, size)  # last line without newline
    starts = np.concatenate([[0], ends[:-1] + 1])[: len(ends)].astype(np.int64)
    ends = ends.astype(np.int64)
    has_cr = (ends > starts) & (arr[np.maximum(ends - 1, 0)] == CR)
    ends = ends - has_cr
    n = len(starts)
    line_numbers = chunk.first_line + np.arange(n, dtype=np.int64)

    # Tabs and invalid bases are sparse: locate them, then count per line (no full-buffer prefix sums).
    tab_pos = np.flatnonzero(arr == TAB)
    tab_line = np.searchsorted(starts, tab_pos, side="right") - 1
    in_line = tab_pos < ends[tab_line] if len(tab_pos) else np.zeros(0, bool)  # a tab after a CR is outside
    n_tabs = np.bincount(tab_line[in_line], minlength=n)[:n]
    if len(tab_pos):
        next_tab = tab_pos[np.minimum(np.searchsorted(tab_pos, starts), len(tab_pos) - 1)]
    else:
        next_tab = ends
    first_tab = np.where(n_tabs > 0, next_tab, ends)
    seq_end = np.where(n_tabs > 0, first_tab, ends)
    label_start = np.where(n_tabs > 0, first_tab + 1, ends)
    seq_len = seq_end - starts
    label_len = ends - label_start

    # Rows are gathered as fixed-width windows over the chunk (padded so every window fits): the
    # bytes as they are (labels) and as base codes (one bytes.translate of the chunk, cheaper than
    # looking up the codes of the gathered windows).
    padded = chunk.data + bytes(max(options.max_length, _MAX_FAST_LABEL) + 1)
    raw = np.frombuffer(padded, dtype=np.uint8)
    coded = np.frombuffer(padded.translate(_ENCODE_TABLE), dtype=np.uint8)  # the padding codes as invalid
    # Base codes only of the rows that reach the base check (every earlier check passed on its
    # lengths): one (rows, width) gather instead of coding and searching the whole chunk.
    candidate = np.flatnonzero((seq_len > 0) & (seq_len <= options.max_length)
                               & (ends - starts <= options.max_line_bytes))
    cand_len = seq_len[candidate]
    width = int(cand_len.max()) if len(candidate) else 1
    cand_codes = gather_windows(coded, starts[candidate], width)
    cand_codes[np.arange(width) >= cand_len[:, None]] = PAD
    bad_bases = np.zeros(n, dtype=bool)
    bad_bases[candidate] = cand_codes.max(axis=1, initial=0) == INVALID  # INVALID is the largest code

    reason = np.zeros(n, dtype=np.int8)  # 0 ok; otherwise index into _CODES
    # Order matters: the first failing check names the row's reason.
    checks = [
        ("line_too_long", ends - starts > options.max_line_bytes),
        ("empty_line", ends == starts),
        ("column_count", n_tabs > 1),
        ("missing_label", (label_len == 0) & (options.labels == "required")),
        ("empty_sequence", seq_len == 0),
        ("sequence_too_long", seq_len > options.max_length),
        ("invalid_base", bad_bases),
    ]
    names = [name for name, _ in checks]
    for code, (_, failed) in enumerate(checks, start=1):
        reason[(reason == 0) & failed] = code

    # Labels: vectorised parse of plain decimals; the rest row by row.
    labels = np.full(n, np.nan, dtype=np.float64)
    has_label = (reason == 0) & (label_len > 0)
    short = np.flatnonzero(has_label & (label_len <= _MAX_FAST_LABEL))
    text_width = int(label_len[short].max(initial=1))
    text = gather_windows(raw, label_start[short], text_width)
    text[np.arange(text_width) >= label_len[short, None]] = 0
    plain_rows = np.count_nonzero(_LABEL_CHARS[text], axis=1) == label_len[short]
    idx, text = short[plain_rows], text[plain_rows]
    slow_rows = has_label.copy()
    slow_rows[idx] = False
    values, decimal = _plain_decimals(text, label_len[idx])
    labels[idx[decimal]] = values[decimal]
    idx, text = idx[~decimal], text[~decimal]  # exponents, odd signs: numpy's parser, then row by row
    if len(idx):
        try:
            labels[idx] = np.ascontiguousarray(text).view(f"S{text_width}").ravel().astype(np.float64)
        except ValueError:  # e.g. "1.2.3" or "--4": decide those row by row
            slow_rows[idx] = True
    slow = np.flatnonzero(slow_rows)
    label_problem: dict[int, tuple[str, str]] = {}
    for i in slow:
        value, why, detail = _classify_label(chunk.data[label_start[i] : ends[i]])
        if value is None:
            label_problem[int(i)] = (why, detail)
        else:
            labels[i] = value
    # Labels are stored as float32: "1e999" (inf on the vectorised path) or "1e39" would be inf.
    with np.errstate(over="ignore"):
        overflow = np.flatnonzero(has_label & ~np.isfinite(labels.astype(np.float32)))
    for i in overflow:
        if int(i) not in label_problem:
            shown = chunk.data[label_start[i] : ends[i]][:40].decode("utf-8", "replace")
            label_problem[int(i)] = ("nonfinite_label", f"expression {shown!r} is not finite as a 32-bit float")

    rejected: list[Rejected] = []
    bad_rows = sorted(set(np.flatnonzero(reason > 0).tolist()) | set(label_problem))
    for i in bad_rows:
        raw = chunk.data[starts[i] : ends[i]][:_RAW_KEEP]
        if reason[i] > 0:
            why = names[reason[i] - 1]
            detail = _detail(why, int(seq_len[i]), int(n_tabs[i]), chunk.data[starts[i] : seq_end[i]], options)
        else:
            why, detail = label_problem[i]
        rejected.append(Rejected(int(line_numbers[i]), why, REASONS[why], detail, raw))
    for line, head in chunk.too_long:
        rejected.append(
            Rejected(line, "line_too_long", "row", f"line longer than {options.max_line_bytes} bytes", head)
        )
    rejected.sort(key=lambda r: r.line)

    ok = reason == 0
    if label_problem:
        ok[list(label_problem)] = False
    good = np.flatnonzero(ok)
    codes = cand_codes[ok[candidate]]  # every valid row is a candidate
    width = int(seq_len[good].max()) if len(good) else 1
    codes = codes[:, :width] if width < codes.shape[1] else codes
    good_labels = labels[good]
    rows = Rows(
        codes=codes,
        lengths=seq_len[good].astype(np.uint16),
        labels=good_labels.astype(np.float32),
        integer_label=np.isfinite(good_labels) & (good_labels == np.round(good_labels)),
        lines=line_numbers[good],
        has_n=(codes == N).any(axis=1),
        hash=sequence_hash(codes, seq_len[good]),
    )
    return rows, rejected, n + len(chunk.too_long)


def _detail(why: str, seq_len: int, n_tabs: int, sequence: bytes, options: ReadOptions) -> str:
    if why == "line_too_long":
        return f"line longer than {options.max_line_bytes} bytes"
    if why == "empty_line":
        return "empty line"
    if why == "column_count":
        return f"expected 2 tab-separated fields (sequence, expression), found {n_tabs + 1}"
    if why == "missing_label":
        return "no expression value (use labels='optional' / --labels optional for test files)"
    if why == "empty_sequence":
        return "empty sequence"
    if why == "sequence_too_long":
        return f"sequence of {seq_len} bp is longer than max_length={options.max_length}"
    if why == "invalid_base":
        codes = ENCODE_LUT[np.frombuffer(sequence, dtype=np.uint8)]
        pos = int(np.flatnonzero(codes == INVALID)[0])
        char = sequence[pos : pos + 1]
        shown = repr(char.decode("ascii")) if 32 < char[0] < 127 else f"byte 0x{char[0]:02x}"
        count = int((codes == INVALID).sum())
        return f"invalid base {shown} at position {pos + 1} ({count} invalid; allowed: ACGTN, any case)"
    return why


# --------------------------------------------------------------------------- public API


def _parse_task(args: tuple[_Chunk, ReadOptions]) -> tuple[int, Rows, list[Rejected], int]:
    chunk, options = args
    rows, rejected, seen = _parse_chunk(chunk, options)
    return chunk.index, rows, rejected, seen


def iter_rows(path: str | os.PathLike, options: ReadOptions = ReadOptions(), report: ReadReport | None = None) -> Iterator[Rows]:
    """Yield validated rows chunk by chunk, in file order, filling ``report`` as it goes.

    Raises InputError for a file-level problem (truncated gzip, strict-mode bad row).
    The max_bad_fraction check is left to :func:`read_dream`, which sees the whole file.
    """
    path = Path(path)
    report = report if report is not None else ReadReport(str(path))
    workers = (os.cpu_count() or 1) if options.workers is None else options.workers
    raw_error: list[Exception] = []
    # Opened here, before any worker is forked: a missing file, a folder or a device is refused at once.
    raw = open_input(path, "a DREAM text file")
    stream, pool = raw, None
    try:
        stream = _decompressed(raw)

        def guarded_tasks() -> Iterator[tuple[_Chunk, ReadOptions]]:
            # A file-level error (truncated gzip, unreadable file) is re-raised below, in this
            # process: escaping the task generator it would be shipped to a pool worker,
            # which cannot unpickle an InputError, and the read would hang.
            try:
                for chunk in _raw_chunks(path, stream, options, report):
                    yield chunk, options
            except Exception as exc:  # noqa: BLE001 - re-raised after the chunks before it
                raw_error.append(exc)

        tasks = guarded_tasks()
        if workers > 1:
            pool = mp.get_context("fork").Pool(workers)
            results = pool.imap(_parse_task, tasks)
        else:
            results = map(_parse_task, tasks)
        for _, rows, rejected, seen in results:
            if rejected and options.strict:
                first = rejected[0]
                raise InputError(str(path), first.detail, line=first.line, field=first.field)
            report.rows_in += seen
            report.rows_ok += len(rows)
            report.rejected.update(r.reason for r in rejected)
            report.rejected_rows.extend(rejected)
            yield rows
        if raw_error:
            raise raw_error[0]
    finally:
        if pool is not None:  # stops the task feeder before the file it reads is closed
            pool.terminate()
            pool.join()
        stream.close()
        raw.close()  # closing a gzip stream leaves the file under it open


def read_dream(path: str | os.PathLike, options: ReadOptions = ReadOptions(), progress: bool = False) -> tuple[Rows, ReadReport]:
    """Read and validate a whole DREAM file into memory (about 160 B per row).

    Raises InputError when the file holds no valid row, or when the bad-row
    fraction exceeds ``options.max_bad_fraction`` (the message lists the reasons).
    """
    report = ReadReport(str(path))
    parts: list[Rows] = []
    bar = None
    if progress:
        from tqdm import tqdm

        size = require_regular_file(path, "a DREAM text file").st_size  # refused before a bar is drawn
        total = None if str(path).endswith(".gz") else size
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"read {Path(path).name}", leave=False)
    last = 0
    for rows in iter_rows(path, options, report):
        parts.append(rows)
        if bar is not None:
            bar.update(report.bytes_read - last)
            last = report.bytes_read
    if bar is not None:
        bar.close()
    report.check_whole_file(options)
    return Rows.concatenate(parts), report


# --------------------------------------------------------------------------- segments
#
# A shard build cuts the (decompressed) file into segments of about ``segment_bytes``, each
# ending at a line end, and parses each in its own process. The cut depends only on the
# bytes and ``segment_bytes``, never on the number of processes, so neither does the output.


class _RangeReader:
    """``read(n)`` over the bytes ``[start, end)`` of the open file descriptor ``fd`` (positioned reads)."""

    def __init__(self, fd: int, start: int, end: int):
        self.fd, self.at, self.end = fd, start, end

    def read(self, size: int = -1) -> bytes:
        size = self.end - self.at if size < 0 else min(size, self.end - self.at)
        data = os.pread(self.fd, size, self.at) if size > 0 else b""
        self.at += len(data)
        return data


_SCAN_BYTES = 1 << 16  # read size when looking for the line end after a segment's nominal start


def _next_line_start(fd: int, target: int, size: int) -> int:
    """The first position ``q >= target`` that starts a line (``q`` is 0 or follows a newline); ``size`` if none."""
    if target <= 0:
        return 0
    at = target - 1  # a newline at target - 1 makes target itself a line start
    while at < size:
        data = os.pread(fd, min(_SCAN_BYTES, size - at), at)
        if not data:
            break
        cut = data.find(b"\n")
        if cut >= 0:
            return at + cut + 1
        at += len(data)
    return size


def segment_bounds(path: str | os.PathLike, segment_bytes: int) -> list[tuple[int, int, int]]:
    """(segment number, start, end) byte ranges of the plain file ``path``, in order, empty ones left out.

    Segment k starts at the first line start at or after ``k * segment_bytes``; a line
    longer than a segment makes the segments it covers empty (its number is skipped).
    """
    if segment_bytes < 1:
        raise UserError(f"segment_bytes must be >= 1, not {segment_bytes}")
    size = require_regular_file(path, "a DREAM text file").st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        starts = [0]
        for k in range(1, -(-size // segment_bytes)):
            target = k * segment_bytes
            # Past a long line already scanned: no line starts before the previous start.
            starts.append(starts[-1] if starts[-1] >= target else _next_line_start(fd, target, size))
    finally:
        os.close(fd)
    ends = starts[1:] + [size]
    return [(k, start, end) for k, (start, end) in enumerate(zip(starts, ends)) if end > start]


@dataclass
class SegmentRead:
    """What parsing one segment gave: its valid rows and everything its report needs."""

    rows: Rows
    rejected: list[Rejected]
    rows_in: int
    bytes_read: int
    warnings: list[str]


def read_segment(path: str | os.PathLike, start: int, end: int, first_line: int,
                 options: ReadOptions = ReadOptions()) -> SegmentRead:
    """Validate and encode the lines in the bytes ``[start, end)`` of the plain file ``path``.

    ``start`` is a line start (``segment_bounds``) whose line number is ``first_line``. The
    rows, rejections and messages are exactly those a whole-file read gives for these lines.
    """
    path = Path(path)
    report = ReadReport(str(path))
    parts: list[Rows] = []
    rejected: list[Rejected] = []
    rows_in = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        reader = _RangeReader(fd, start, end)
        for chunk in _raw_chunks(path, reader, options, report, first_line, file_start=start == 0):  # type: ignore[arg-type]
            rows, bad, seen = _parse_chunk(chunk, options)
            parts.append(rows)
            rejected.extend(bad)
            rows_in += seen
    finally:
        os.close(fd)
    return SegmentRead(Rows.concatenate(parts) if parts else Rows.empty(), rejected, rows_in, report.bytes_read,
                       report.warnings)


def is_gzip(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts with the gzip magic bytes (the suffix is not looked at)."""
    with open_input(path, "a DREAM text file") as handle:
        return handle.read(2) == GZIP_MAGIC


def decompress_to(path: str | os.PathLike, out: IO[bytes], piece: int = 8 << 20) -> int:
    """Write the decompressed bytes of the gzip file ``path`` to ``out``; their count.

    A gzip file cannot be read from an arbitrary offset, so a build reads it once, here,
    and cuts the plain copy into segments as it would the plain file. A truncated or
    corrupt stream is the InputError a whole-file read gives, naming the line near the end.
    """
    written = lines = 0
    with open_input(path, "a DREAM text file") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as stream:
        while True:
            data = _read_stream(stream, piece, path, written, lines + 1)
            if not data:
                return written
            out.write(data)
            written += len(data)
            lines += data.count(b"\n")
