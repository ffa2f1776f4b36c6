"""The DREAM text reader: real sample files, malformed input, chunking invariance."""

from __future__ import annotations

import gzip
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from promoter_dist.data.alphabet import PAD, decode
from promoter_dist.data.dream import REASONS, ReadOptions, ReadReport, Rows, iter_rows, read_dream
from promoter_dist.errors import InputError, UserError

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "dream2022" / "samples"
TRAIN_SAMPLES = ["demo_train_6370.txt", "train_first1000.txt"]
TEST_SAMPLE = "test_labelled_first2999.txt"
ALL_SAMPLES = TRAIN_SAMPLES + [TEST_SAMPLE]

# A real 110-bp row shape: 17-bp 5' adapter, 80 random bases, 13-bp 3' adapter.
SEQ = "TGCATTTTTTTCACATC" + "ACGTTGCAAGCTTAGCCATG" * 4 + "GGTTACGGCTGTT"
INTEGER = re.compile(r"[+-]?\d+")


# --------------------------------------------------------------------------- helpers


def write_bytes(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def write_lines(tmp_path: Path, name: str, lines: list[str | bytes], eol: bytes = b"\n", final_eol: bool = True) -> Path:
    raw = [line.encode("ascii") if isinstance(line, str) else line for line in lines]
    return write_bytes(tmp_path, name, eol.join(raw) + (eol if final_eol else b""))


def good_row(i: int, seq: str = SEQ) -> str:
    """A valid row whose label is ``i`` (tests use the file line number)."""
    return f"{seq}\t{i}"


def scan(path: Path, **kw) -> tuple[Rows, ReadReport]:
    """Every row of ``path`` with its report, without the whole-file bad-fraction check."""
    kw.setdefault("workers", 0)
    report = ReadReport(str(path))
    rows = Rows.concatenate(list(iter_rows(path, ReadOptions(**kw), report)))
    assert_consistent(rows, report)
    return rows, report


def assert_consistent(rows: Rows, report: ReadReport) -> None:
    assert report.rows_in == report.rows_ok + report.rows_rejected
    assert report.rows_ok == len(rows)
    assert len(report.rejected_rows) == report.rows_rejected
    assert sum(report.rejected.values()) == report.rows_rejected
    for r in report.rejected_rows:
        assert r.reason in REASONS and r.field == REASONS[r.reason]
    # Every line is either a row or a rejection, exactly once.
    seen = sorted(rows.lines.tolist() + [r.line for r in report.rejected_rows])
    assert seen == list(range(1, report.rows_in + 1))


_READ_IN_CHILD = """
import json, sys
from promoter_dist.data.dream import ReadOptions, read_dream
from promoter_dist.errors import UserError
try:
    read_dream(sys.argv[1], ReadOptions(**json.loads(sys.argv[2])), progress=sys.argv[3] == "1")
except UserError as exc:
    print(type(exc).__name__ + ":" + str(exc), end="")
"""


def read_error(path: Path, progress: bool = False, **kw) -> tuple[str, str]:
    """(error class, message) of reading ``path`` in a child process, which must not hang.

    Errors met while the worker pool runs are checked this way, so that a read left
    waiting on its pool fails the test instead of stopping the suite.
    """
    args = [sys.executable, "-c", _READ_IN_CHILD, str(path), json.dumps(kw), "1" if progress else "0"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    kind, _, message = done.stdout.partition(":")
    return kind, message


def rejections(report: ReadReport) -> list[tuple[int, str, str]]:
    return [(r.line, r.reason, r.field) for r in report.rejected_rows]


def sequences(rows: Rows) -> list[str]:
    return [decode(rows.codes[i, : rows.lengths[i]]) for i in range(len(rows))]


def plain_parse(path: Path) -> list[tuple[str, str]]:
    """(sequence, expression text) per line, by plain Python."""
    text = path.read_bytes().decode("ascii")
    return [tuple(line.split("\t")) for line in text.splitlines()]


def snapshot(rows: Rows, report: ReadReport) -> tuple:
    """Everything a read produced, in comparable form."""
    return (
        rows.codes.shape,
        rows.codes.tobytes(),
        rows.lengths.tolist(),
        rows.labels.tobytes(),
        rows.integer_label.tolist(),
        rows.lines.tolist(),
        [(r.line, r.reason, r.field, r.detail) for r in report.rejected_rows],
        report.rows_in,
        report.rows_ok,
        dict(report.rejected),
        report.warnings,
    )


def assert_same_rows(a: Rows, b: Rows) -> None:
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.lengths, b.lengths)
    np.testing.assert_array_equal(a.labels, b.labels)  # NaN == NaN here
    np.testing.assert_array_equal(a.integer_label, b.integer_label)
    np.testing.assert_array_equal(a.lines, b.lines)


# --------------------------------------------------------------------------- real samples


@pytest.mark.parametrize("name", TRAIN_SAMPLES)
def test_real_training_sample_matches_plain_parse(name):
    path = SAMPLES / name
    expected = plain_parse(path)
    rows, report = read_dream(path, ReadOptions())

    assert report.rows_rejected == 0 and not report.rejected_rows and not report.warnings
    assert report.rows_in == report.rows_ok == len(rows) == len(expected)
    assert sequences(rows) == [seq for seq, _ in expected]
    np.testing.assert_array_equal(rows.lengths, [len(seq) for seq, _ in expected])
    np.testing.assert_array_equal(rows.labels, np.array([float(lab) for _, lab in expected], dtype=np.float32))
    np.testing.assert_array_equal(rows.lines, np.arange(1, len(expected) + 1))
    written_integer = np.array([bool(INTEGER.fullmatch(lab)) for _, lab in expected])
    np.testing.assert_array_equal(rows.integer_label, written_integer)
    assert rows.integer_label.mean() == pytest.approx(written_integer.mean())
    assert 0.3 < written_integer.mean() < 0.8  # both kinds of label are present
    assert rows.codes.dtype == np.uint8 and (rows.codes[:, : rows.lengths.min()] != PAD).all()


def test_demo_sample_shape():
    raw = (SAMPLES / "demo_train_6370.txt").read_bytes()
    assert not raw.endswith(b"\n")  # the last row has no newline and must still be read
    rows, report = read_dream(SAMPLES / "demo_train_6370.txt", ReadOptions(workers=0))
    assert len(rows) == 6370 and report.rows_in == 6370
    last_seq, last_label = raw.rsplit(b"\n", 1)[1].decode().split("\t")
    assert sequences(rows)[-1] == last_seq and rows.labels[-1] == np.float32(last_label)
    assert (87, 135) == (rows.lengths.min(), rows.lengths.max())


def test_real_test_sample_with_optional_labels():
    path = SAMPLES / TEST_SAMPLE
    expected = plain_parse(path)
    rows, report = read_dream(path, ReadOptions(labels="optional"))
    assert len(expected) == 2999
    assert report.rows_rejected == 0 and report.rows_in == len(rows) == 2999
    assert sequences(rows) == [seq for seq, _ in expected]
    np.testing.assert_array_equal(rows.labels, np.array([float(lab) for _, lab in expected], dtype=np.float32))
    assert np.isfinite(rows.labels).all() and -2 < rows.labels.min() < rows.labels.max() < 2
    assert not rows.integer_label.any()


@pytest.mark.parametrize("name", ALL_SAMPLES)
@pytest.mark.parametrize("suffix", [".txt.gz", ".txt"])  # gzip is found by magic bytes, whatever the name
def test_gzip_copy_gives_identical_arrays(tmp_path, name, suffix):
    options = ReadOptions(labels="optional", workers=0)
    plain, plain_report = read_dream(SAMPLES / name, options)
    packed = write_bytes(tmp_path, "copy" + suffix, gzip.compress((SAMPLES / name).read_bytes()))
    rows, report = read_dream(packed, options)
    assert_same_rows(rows, plain)
    assert report.rows_in == plain_report.rows_in and report.rows_rejected == 0
    assert report.bytes_read == plain_report.bytes_read == (SAMPLES / name).stat().st_size


@pytest.mark.parametrize("name", ALL_SAMPLES)
def test_crlf_copy_gives_identical_arrays(tmp_path, name):
    raw = (SAMPLES / name).read_bytes()
    crlf = write_bytes(tmp_path, "crlf.txt", raw.replace(b"\n", b"\r\n"))
    options = ReadOptions(labels="optional", chunk_bytes=4096, workers=2)
    plain, _ = read_dream(SAMPLES / name, options)
    rows, report = read_dream(crlf, options)
    assert_same_rows(rows, plain)
    assert report.rows_rejected == 0


@pytest.mark.parametrize("name", ALL_SAMPLES)
def test_lower_case_copy_folds_to_same_codes(tmp_path, name):
    raw = (SAMPLES / name).read_bytes()
    lines = raw.split(b"\n")
    # Lower-case every other row fully and the rest half, to mix cases within rows.
    mixed = [
        (line.lower() if i % 2 else line[: len(line) // 4].lower() + line[len(line) // 4 :])
        for i, line in enumerate(lines)
    ]
    lower = write_bytes(tmp_path, "lower.txt", b"\n".join(mixed))
    assert lower.read_bytes() != raw
    plain, _ = read_dream(SAMPLES / name, ReadOptions(labels="optional", workers=0))
    rows, report = read_dream(lower, ReadOptions(labels="optional", workers=0))
    assert_same_rows(rows, plain)
    assert report.rows_rejected == 0


def test_real_sample_in_small_chunks_and_workers():
    reference = snapshot(*scan(SAMPLES / "demo_train_6370.txt", chunk_bytes=8 << 20, workers=0))
    assert snapshot(*scan(SAMPLES / "demo_train_6370.txt", chunk_bytes=3001, workers=2)) == reference


# --------------------------------------------------------------------------- malformed rows

# Each case: (id, bad row bytes, options, expected reason). The bad row is written at
# line 4 of a file whose other rows are valid, so line numbers before and after it count.
ROW_CASES = [
    ("one_field_required", SEQ.encode(), {}, "missing_label"),
    ("empty_label", SEQ.encode() + b"\t", {}, "missing_label"),
    ("three_fields", SEQ.encode() + b"\t1.5\t2", {}, "column_count"),
    ("four_fields", SEQ.encode() + b"\t\t\t", {}, "column_count"),
    ("three_fields_optional", SEQ.encode() + b"\t1\t2", {"labels": "optional"}, "column_count"),
    ("space_instead_of_tab", SEQ.encode() + b" 5", {}, "missing_label"),
    ("space_instead_of_tab_optional", SEQ.encode() + b" 5", {"labels": "optional"}, "invalid_base"),
    ("decimal_comma", SEQ.encode() + b"\t12,5", {}, "bad_label"),
    ("two_points", SEQ.encode() + b"\t1.2.3", {}, "bad_label"),
    ("letters", SEQ.encode() + b"\tabc", {}, "bad_label"),
    ("underscore", SEQ.encode() + b"\t1_000", {}, "bad_label"),
    ("double_minus", SEQ.encode() + b"\t--4", {}, "bad_label"),
    ("lone_point", SEQ.encode() + b"\t.", {}, "bad_label"),
    ("lone_exponent", SEQ.encode() + b"\t1e", {}, "bad_label"),
    ("hex", SEQ.encode() + b"\t0x10", {}, "bad_label"),
    ("leading_space", SEQ.encode() + b"\t 5", {}, "bad_label"),
    ("trailing_space", SEQ.encode() + b"\t5 ", {}, "bad_label"),
    ("unit_suffix", SEQ.encode() + "\t5\u00b5".encode(), {}, "bad_label"),
    ("nan", SEQ.encode() + b"\tNaN", {}, "nonfinite_label"),
    ("nan_lower", SEQ.encode() + b"\tnan", {}, "nonfinite_label"),
    ("inf", SEQ.encode() + b"\tinf", {}, "nonfinite_label"),
    ("minus_inf", SEQ.encode() + b"\t-inf", {}, "nonfinite_label"),
    ("infinity", SEQ.encode() + b"\tInfinity", {}, "nonfinite_label"),
    ("overflow_float64", SEQ.encode() + b"\t1e999", {}, "nonfinite_label"),
    ("overflow_float32", SEQ.encode() + b"\t-1e39", {}, "nonfinite_label"),
    ("long_digit_string", SEQ.encode() + b"\t" + b"9" * 45, {}, "nonfinite_label"),
    ("digit_in_sequence", SEQ[:30].encode() + b"7" + SEQ[31:].encode() + b"\t3", {}, "invalid_base"),
    ("latin1_byte", SEQ[:30].encode() + b"\xe9" + SEQ[31:].encode() + b"\t3", {}, "invalid_base"),
    ("utf8_letter", SEQ[:30].encode() + "\u00e9".encode() + SEQ[31:].encode() + b"\t3", {}, "invalid_base"),
    ("nul_byte", SEQ[:30].encode() + b"\x00" + SEQ[31:].encode() + b"\t3", {}, "invalid_base"),
    ("dash_gap", SEQ[:30].encode() + b"-" + SEQ[31:].encode() + b"\t3", {}, "invalid_base"),
    ("empty_sequence", b"\t5", {}, "empty_sequence"),
    ("empty_sequence_optional", b"\t5", {"labels": "optional"}, "empty_sequence"),
    ("sequence_too_long", (SEQ + "A" * 11).encode() + b"\t5", {"max_length": 120}, "sequence_too_long"),
    ("blank_line", b"", {}, "empty_line"),
    ("lone_cr", b"\r", {}, "empty_line"),
    ("line_too_long_in_chunk", (SEQ * 3).encode() + b"\t5", {"max_line_bytes": 200}, "line_too_long"),
]


@pytest.mark.parametrize("bad, options, reason", [c[1:] for c in ROW_CASES], ids=[c[0] for c in ROW_CASES])
def test_malformed_row_is_located(tmp_path, bad, options, reason):
    lines = [good_row(1), good_row(2), good_row(3), bad, good_row(5), good_row(6)]
    path = write_lines(tmp_path, "rows.txt", lines)
    rows, report = scan(path, **options)

    assert rejections(report) == [(4, reason, REASONS[reason])]
    assert report.rows_in == 6 and report.rows_ok == 5 and report.rows_rejected == 1
    assert dict(report.rejected) == {reason: 1}
    np.testing.assert_array_equal(rows.lines, [1, 2, 3, 5, 6])
    np.testing.assert_array_equal(rows.labels, rows.lines.astype(np.float32))
    rejected = report.rejected_rows[0]
    assert rejected.raw == bad.rstrip(b"\r")[:200]
    assert rejected.message(str(path)).startswith(f"{path}:4 [{REASONS[reason]}]: ")
    # The same row in strict mode stops the read at that line and field.
    with pytest.raises(InputError) as info:
        scan(path, strict=True, **options)
    assert (info.value.path, info.value.line, info.value.field) == (str(path), 4, REASONS[reason])
    assert str(info.value).startswith(f"{path}:4 [{REASONS[reason]}]: ")


@pytest.mark.parametrize("letter", list("RYKMSWBDHVU") + list("ryx"))
def test_iupac_and_other_letters_are_invalid_bases(tmp_path, letter):
    seq = SEQ[:40] + letter + SEQ[41:60] + letter + SEQ[61:]
    path = write_lines(tmp_path, "iupac.txt", [good_row(1), f"{seq}\t2", good_row(3)])
    _, report = scan(path)
    assert rejections(report) == [(2, "invalid_base", "sequence")]
    assert f"invalid base {letter!r} at position 41 (2 invalid" in report.rejected_rows[0].detail


@pytest.mark.parametrize("byte, shown", [(b"\xe9", "byte 0xe9"), (b"\x00", "byte 0x00"), (b" ", "byte 0x20"), (b"7", "'7'")])
def test_invalid_base_detail_names_the_byte(tmp_path, byte, shown):
    path = write_bytes(tmp_path, "b.txt", b"ACGT" + byte + b"ACGT\t1\n")
    _, report = scan(path)
    assert report.rejected_rows[0].detail.startswith(f"invalid base {shown} at position 5 ")


def test_sequence_at_max_length_is_accepted(tmp_path):
    path = write_lines(tmp_path, "len.txt", [f"{'A' * 120}\t1", f"{'C' * 121}\t2", f"{'n' * 1}\t3"])
    rows, report = scan(path, max_length=120)
    assert rejections(report) == [(2, "sequence_too_long", "sequence")]
    assert "121 bp is longer than max_length=120" in report.rejected_rows[0].detail
    assert rows.lengths.tolist() == [120, 1] and sequences(rows) == ["A" * 120, "N"]


def test_label_forms_that_are_accepted(tmp_path):
    labels = ["0", "-3", "+4", "12.", ".5", "-0.25", "1e3", "2E-2", "1e-999", "3.4e38", "007"]
    path = write_lines(tmp_path, "labels.txt", [f"{SEQ}\t{lab}" for lab in labels])
    rows, report = scan(path)
    assert report.rows_rejected == 0
    np.testing.assert_array_equal(rows.labels, np.array([float(x) for x in labels], dtype=np.float32))
    for text, flag in zip(labels, rows.integer_label.tolist()):
        if INTEGER.fullmatch(text):
            assert flag, text
        elif not float(text).is_integer():
            assert not flag, text


# --------------------------------------------------------------------------- whole-file problems


def test_empty_file_is_an_input_error(tmp_path):
    path = write_bytes(tmp_path, "empty.txt", b"")
    with pytest.raises(InputError, match="empty") as info:
        read_dream(path, ReadOptions(workers=0))
    assert info.value.path == str(path) and info.value.line is None
    rows, report = scan(path)
    assert report.rows_in == 0 and len(rows) == 0


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"])
def test_file_of_blank_lines(tmp_path, eol):
    path = write_bytes(tmp_path, "blank.txt", eol * 7)
    with pytest.raises(InputError, match="no valid row") as info:
        read_dream(path, ReadOptions(workers=0))
    assert "empty_line: 7" in str(info.value) and f"{path}:1 [row]: empty line" in str(info.value)
    _, report = scan(path)
    assert rejections(report) == [(i, "empty_line", "row") for i in range(1, 8)]


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 4, 64, 8 << 20])
def test_utf8_bom_is_stripped_with_a_warning(tmp_path, chunk_bytes):
    path = write_bytes(tmp_path, "bom.txt", b"\xef\xbb\xbf" + f"{good_row(1)}\n{good_row(2)}\n".encode())
    rows, report = scan(path, chunk_bytes=chunk_bytes)
    assert report.rows_rejected == 0 and len(rows) == 2
    assert sequences(rows) == [SEQ, SEQ] and rows.lines.tolist() == [1, 2]
    assert len(report.warnings) == 1 and "byte-order mark" in report.warnings[0]
    assert "warning: UTF-8 byte-order mark" in report.summary()


def test_bom_only_in_gzip_and_not_elsewhere(tmp_path):
    # A BOM is stripped inside gzip too; a BOM-like byte run later in the file is not.
    data = b"\xef\xbb\xbf" + f"{good_row(1)}\n".encode() + b"\xef\xbb\xbfACGT\t2\n"
    path = write_bytes(tmp_path, "bom.gz", gzip.compress(data))
    rows, report = scan(path)
    assert len(report.warnings) == 1 and len(rows) == 1
    assert rejections(report) == [(2, "invalid_base", "sequence")]


@pytest.mark.parametrize(
    "length, where",
    [
        (3000, "middle"),  # longer than max_line_bytes, shorter than a chunk
        (5000, "middle"),  # longer than a chunk
        (20000, "middle"),  # several chunks
        (20000, "first"),
        (20000, "last"),  # last line, no newline
        (3000, "last"),
        (4095, "middle"),  # around the chunk size
        (4096, "middle"),
        (4097, "middle"),
    ],
)
@pytest.mark.parametrize("eol", [b"\n", b"\r\n"])
def test_over_long_line_is_rejected_and_counted(tmp_path, length, where, eol):
    long_row = b"A" * (length - 2) + b"\t1"
    rows_before = {"first": 0, "middle": 30, "last": 60}[where]
    lines: list[bytes] = [good_row(i + 1).encode() for i in range(rows_before)]
    lines.append(long_row)
    lines += [good_row(i).encode() for i in range(rows_before + 2, 62 if where != "last" else rows_before + 2)]
    path = write_lines(tmp_path, "long.txt", lines, eol=eol, final_eol=where != "last")
    rows, report = scan(path, max_line_bytes=1000, chunk_bytes=4096)
    line = rows_before + 1
    assert rejections(report) == [(line, "line_too_long", "row")]
    assert report.rejected_rows[0].detail == "line longer than 1000 bytes"
    assert report.rejected_rows[0].raw.startswith(b"AAAA") and len(report.rejected_rows[0].raw) <= 200
    assert report.rows_in == len(lines)
    np.testing.assert_array_equal(rows.labels, rows.lines.astype(np.float32))  # numbering after it is right


def test_line_of_exactly_max_line_bytes_with_crlf_in_any_chunking(tmp_path):
    exact = "A" * 98 + "\t1"  # 100 bytes without its CRLF
    over = "C" * 99 + "\t2"  # 101 bytes
    path = write_lines(tmp_path, "edge.txt", [exact, over, exact, "ACGT\t4"], eol=b"\r\n")
    expected = [(2, "line_too_long", "row")]
    for chunk_bytes in range(1, 260):
        rows, report = scan(path, max_line_bytes=100, chunk_bytes=chunk_bytes)
        assert rejections(report) == expected, chunk_bytes
        assert rows.lines.tolist() == [1, 3, 4], chunk_bytes


@pytest.mark.parametrize("cut", [0.5, -20])
def test_truncated_gzip_names_the_file(tmp_path, cut):
    packed = gzip.compress((SAMPLES / "train_first1000.txt").read_bytes())
    path = write_bytes(tmp_path, "train.txt.gz", packed[: int(len(packed) * cut) if cut > 0 else cut])
    with pytest.raises(InputError) as info:
        read_dream(path, ReadOptions(workers=0, chunk_bytes=4096))
    assert str(info.value).startswith(f"{path}: truncated gzip stream")
    assert "incomplete" in str(info.value) and info.value.path == str(path)
    # The same error comes back from a read on worker processes.
    assert read_error(path, workers=2, chunk_bytes=4096) == ("InputError", str(info.value))


@pytest.mark.parametrize(
    "damage",
    [
        lambda packed: packed[:10] + bytes(range(256)) * 4,  # garbage after a valid header
        lambda packed: packed[:-8] + b"\0\0\0\0" + packed[-4:],  # wrong CRC
        lambda packed: packed + b"junk after the stream",
    ],
    ids=["garbage_after_header", "bad_crc", "trailing_junk"],
)
def test_corrupt_gzip_is_an_input_error(tmp_path, damage):
    packed = gzip.compress("".join(good_row(i) + "\n" for i in range(1, 300)).encode())
    path = write_bytes(tmp_path, "bad.gz", damage(packed))
    with pytest.raises(InputError) as info:
        read_dream(path, ReadOptions(workers=0, chunk_bytes=1024))
    assert str(info.value).startswith(f"{path}: corrupt gzip data near line ")
    assert read_error(path, workers=2, chunk_bytes=1024) == ("InputError", str(info.value))


def test_gzip_header_only_is_truncated(tmp_path):
    path = write_bytes(tmp_path, "head.gz", gzip.compress(b"ACGT\t1\n")[:5])
    with pytest.raises(InputError, match="truncated"):
        read_dream(path, ReadOptions(workers=0))


def test_directory_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="is a directory") as info:
        read_dream(tmp_path, ReadOptions(workers=0))
    assert str(info.value) == f"{tmp_path}: is a directory, expected a DREAM text file"
    assert read_error(tmp_path, workers=2) == ("UserError", str(info.value))
    missing = tmp_path / "nope.txt"
    for progress in (False, True):
        with pytest.raises(UserError, match="no such file") as info:
            read_dream(missing, ReadOptions(workers=0), progress=progress)
        assert str(info.value) == f"{missing}: no such file"
    assert read_error(missing, progress=True, workers=2) == ("UserError", f"{missing}: no such file")


def test_binary_file_is_refused(tmp_path):
    rng = np.random.default_rng(5)
    blob = b"\x7fELF\x02\x01\x01\x00\t\x00\x00\x00\n" + rng.integers(0, 256, 20000, dtype=np.uint8).tobytes()
    path = write_bytes(tmp_path, "a.out", blob)
    with pytest.raises(InputError) as info:
        read_dream(path, ReadOptions(workers=0))
    assert str(info.value).startswith(f"{path}: ")
    assert "rows are bad" in str(info.value) or "no valid row" in str(info.value)
    _, report = scan(path, chunk_bytes=512)
    assert report.rejected_rows[0].line == 1 and report.rejected_rows[0].reason == "invalid_base"
    assert "byte 0x7f at position 1" in report.rejected_rows[0].detail
    assert report.rows_in == blob.count(b"\n") + (not blob.endswith(b"\n"))


def test_mostly_bad_file_is_refused_with_reasons(tmp_path):
    lines = []
    for i in range(1, 21):
        lines.append(good_row(i) if i % 2 else (f"{SEQ}\tx{i}" if i % 4 else f"{SEQ[:9]}R{SEQ[10:]}\t{i}"))
    path = write_lines(tmp_path, "wrong.txt", lines)
    with pytest.raises(InputError) as info:
        read_dream(path, ReadOptions(workers=0))
    message = str(info.value)
    assert message.startswith(f"{path}: 10 of 20 rows are bad, more than max_bad_fraction=0.05")
    assert "bad_label: 5" in message and "invalid_base: 5" in message
    assert f"{path}:2 [expression]" in message and f"{path}:4 [sequence]" in message
    rows, report = read_dream(path, ReadOptions(workers=0, max_bad_fraction=0.5))
    assert len(rows) == 10 and report.rows_rejected == 10


def test_bad_fraction_boundary(tmp_path):
    lines = [good_row(i) for i in range(1, 21)]
    lines[6] = f"{SEQ}\tbad"
    path = write_lines(tmp_path, "one_bad.txt", lines)
    rows, report = read_dream(path, ReadOptions(workers=0))  # 1 of 20 == 0.05 is still accepted
    assert len(rows) == 19 and rejections(report) == [(7, "bad_label", "expression")]
    lines[7] = f"{SEQ}\tbad"
    write_lines(tmp_path, "one_bad.txt", lines)
    with pytest.raises(InputError, match="2 of 20 rows are bad"):
        read_dream(path, ReadOptions(workers=0))


@pytest.mark.parametrize("workers", [0, 2])
def test_strict_mode_names_first_bad_row_in_a_later_chunk(tmp_path, workers):
    lines = [good_row(i) for i in range(1, 401)]
    lines[312] = f"{SEQ[:50]}X{SEQ[51:]}\t313"  # line 313: first problem, far past the first chunk
    lines[313] = f"{SEQ}\t\t"
    lines[350] = "\t5"
    path = write_lines(tmp_path, "strict.txt", lines)
    with pytest.raises(InputError) as info:
        read_dream(path, ReadOptions(strict=True, workers=workers, chunk_bytes=1024))
    assert (info.value.line, info.value.field) == (313, "sequence")
    assert str(info.value) == f"{path}:313 [sequence]: invalid base 'X' at position 51 (1 invalid; allowed: ACGTN, any case)"
    # Without strict, all three are counted.
    _, report = scan(path, workers=workers, chunk_bytes=1024)
    assert rejections(report) == [(313, "invalid_base", "sequence"), (314, "column_count", "row"), (351, "empty_sequence", "sequence")]


def test_strict_mode_stops_at_over_long_line(tmp_path):
    lines = [good_row(i) for i in range(1, 50)] + ["A" * 9000 + "\t1"] + [good_row(i) for i in range(51, 60)]
    path = write_lines(tmp_path, "strict_long.txt", lines)
    with pytest.raises(InputError) as info:
        read_dream(path, ReadOptions(strict=True, max_line_bytes=1000, chunk_bytes=512, workers=0))
    assert str(info.value) == f"{path}:50 [row]: line longer than 1000 bytes"


def test_optional_labels_accept_unlabelled_rows(tmp_path):
    lines = [good_row(1), SEQ, f"{SEQ}\t", good_row(4), f"{SEQ}\tabc", f"{SEQ}\tnan", f"{SEQ}\t1\t2"]
    path = write_lines(tmp_path, "test.txt", lines, final_eol=False)
    rows, report = scan(path, labels="optional")
    assert rows.lines.tolist() == [1, 2, 3, 4]
    assert rows.labels[0] == 1 and rows.labels[3] == 4 and np.isnan(rows.labels[1:3]).all()
    assert rows.integer_label.tolist() == [True, False, False, True]
    assert rejections(report) == [(5, "bad_label", "expression"), (6, "nonfinite_label", "expression"), (7, "column_count", "row")]
    # The same file as a training file: unlabelled rows are rejected.
    _, report = scan(path)
    assert [r[:2] for r in rejections(report)][:2] == [(2, "missing_label"), (3, "missing_label")]
    assert "labels='optional'" in report.rejected_rows[0].detail


def test_unlabelled_test_file_reads_in_optional_mode(tmp_path):
    seqs = [seq for seq, _ in plain_parse(SAMPLES / TEST_SAMPLE)][:500]
    path = write_lines(tmp_path, "test_sequences.txt", seqs)
    rows, report = read_dream(path, ReadOptions(labels="optional", workers=0))
    assert report.rows_rejected == 0 and sequences(rows) == seqs and np.isnan(rows.labels).all()
    with pytest.raises(InputError, match="no valid row"):
        read_dream(path, ReadOptions(workers=0))


def make_mixed_file(tmp_path: Path, n: int, seed: int, name: str = "mixed.txt") -> tuple[Path, list[tuple[int, str]]]:
    """n rows, about 1 in 8 bad, labels equal to line numbers; returns the expected rejections."""
    rng = random.Random(seed)
    lines, expected = [], []
    bad_kinds = [
        ("invalid_base", lambda i: f"{SEQ[:20]}K{SEQ[21:]}\t{i}"),
        ("bad_label", lambda i: f"{SEQ}\t{i},5"),
        ("missing_label", lambda i: SEQ),
        ("column_count", lambda i: f"{SEQ}\t{i}\t{i}"),
        ("empty_line", lambda i: ""),
        ("empty_sequence", lambda i: f"\t{i}"),
        ("nonfinite_label", lambda i: f"{SEQ}\tinf"),
        ("sequence_too_long", lambda i: f"{'G' * 301}\t{i}"),
        ("line_too_long", lambda i: "T" * 600 + f"\t{i}"),
    ]
    for i in range(1, n + 1):
        if rng.random() < 0.125:
            reason, make = rng.choice(bad_kinds)
            lines.append(make(i))
            expected.append((i, reason))
        else:
            length = rng.randint(80, 140)
            seq = "".join(rng.choice("ACGTacgtN") for _ in range(length))
            lines.append(f"{seq}\t{i}" if rng.random() < 0.5 else f"{seq}\t{i}.0")
    return write_lines(tmp_path, name, lines), expected


@pytest.mark.parametrize("workers", [0, 2])
def test_line_numbers_across_many_small_chunks(tmp_path, workers):
    path, expected = make_mixed_file(tmp_path, 500, seed=3)
    assert 30 < len(expected) < 100
    rows, report = scan(path, chunk_bytes=64, workers=workers, max_line_bytes=500)
    assert [(line, reason) for line, reason, _ in rejections(report)] == expected
    np.testing.assert_array_equal(rows.labels, rows.lines.astype(np.float32))
    assert report.rows_in == 500
    assert snapshot(rows, report) == snapshot(*scan(path, chunk_bytes=64, workers=0, max_line_bytes=500))


# --------------------------------------------------------------------------- chunking invariance


def test_results_do_not_depend_on_chunking_or_workers(tmp_path):
    path, expected = make_mixed_file(tmp_path, 1500, seed=11)
    # Add CRLF on every third row, a BOM and a last line without newline to the mix.
    lines = path.read_bytes().split(b"\n")[:-1]
    lines = [line + b"\r" if i % 3 == 0 else line for i, line in enumerate(lines)]
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines))
    reference = None
    for chunk_bytes in (64, 1000, 8 << 20):
        for workers in (0, 2):
            rows, report = scan(path, chunk_bytes=chunk_bytes, workers=workers, max_line_bytes=500)
            got = snapshot(rows, report)
            if reference is None:
                reference = got
                assert [(line, reason) for line, reason, _ in rejections(report)] == expected
                assert report.warnings and report.rows_in == 1500
                np.testing.assert_array_equal(rows.labels, rows.lines.astype(np.float32))
            assert got == reference, (chunk_bytes, workers)


def test_every_small_chunk_size_gives_the_same_result(tmp_path):
    rng = random.Random(7)
    kinds = ["good", "good", "good", "blank", "long", "near", "nolabel", "badbase"]
    make = {
        "good": lambda i: f"{SEQ[: rng.randint(5, 30)]}\t{i}",
        "blank": lambda i: "",
        "long": lambda i: "C" * rng.randint(60, 200) + f"\t{i}",
        "near": lambda i: "A" * rng.randint(36, 40) + f"\t{i}",  # around max_line_bytes=42
        "nolabel": lambda i: "ACGT",
        "badbase": lambda i: f"ACGU\t{i}",
    }
    lines = [make[rng.choice(kinds)](i) for i in range(1, 40)] + ["ACGT\t40"]
    for eol in (b"\n", b"\r\n"):
        path = write_lines(tmp_path, "small.txt", lines, eol=eol, final_eol=False)
        rows, report = scan(path, max_line_bytes=42, chunk_bytes=1 << 20)
        assert report.rows_in == 40 and 0 < report.rows_rejected < 30
        reference = snapshot(rows, report)
        for chunk_bytes in range(1, 120):
            assert snapshot(*scan(path, max_line_bytes=42, chunk_bytes=chunk_bytes)) == reference, chunk_bytes


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"labels": "maybe"}, "labels must be"),
        ({"max_length": 0}, "max_length must be"),
        ({"max_bad_fraction": 1.5}, "max_bad_fraction must be"),
        ({"chunk_bytes": 0}, "chunk_bytes must be"),
    ],
)
def test_bad_options_are_user_errors(kw, match):
    with pytest.raises(UserError, match=match):
        ReadOptions(**kw)


def test_report_summary_and_dict(tmp_path):
    path = write_lines(tmp_path, "r.txt", [good_row(1), f"{SEQ}\tx", f"{SEQ}\ty", good_row(4), ""])
    _, report = scan(path)
    assert report.to_dict() == {
        "path": str(path), "rows_in": 5, "rows_ok": 2, "rows_rejected": 3,
        "rejected_by_reason": {"bad_label": 2, "empty_line": 1}, "warnings": [],
    }
    summary = report.summary(examples=1)
    assert summary.splitlines()[0] == f"{path}: 5 rows read, 2 ok, 3 rejected"
    assert f"{path}:2 [expression]" in summary and f"{path}:3 [expression]" not in summary
    assert f"{path}:5 [row]: empty line" in summary
    assert report.bytes_read == path.stat().st_size
