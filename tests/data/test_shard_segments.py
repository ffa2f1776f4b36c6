"""The shard build per segment: the same bytes for any worker count, gzip as plain, resume
across segments, the top-expression view by threshold, and the parsers the segments rely on."""

from __future__ import annotations

import gzip
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from promoter_dist.data.dream import (
    ReadOptions,
    _plain_decimals,
    read_dream,
    read_segment,
    segment_bounds,
)
from promoter_dist.data.loader import LoaderConfig, ShardLoader
from promoter_dist.data.shards import (
    FORMAT_VERSION,
    MANIFEST,
    ShardOptions,
    build_shards,
    load_manifest,
    read_block_range,
    shard_blocks,
    shards_per_segment,
    top_threshold,
    verify_shards,
)
from promoter_dist.errors import InputError, UserError
from tests.conftest import DEMO_TRAIN
from tests.data.shard_builds import big_source, kill_builds, tree_digest

TINY = ShardOptions(rows_per_block=64, blocks_per_shard=3, segment_bytes=40_000)
"""~19 segments over the demo file, several shards per segment and split."""


def _messy_source(tmp_path: Path) -> Path:
    """The demo rows with a byte-order mark, CRLF lines and bad rows of every kind spread over the file."""
    lines = DEMO_TRAIN.read_bytes().splitlines()
    lines[0] = b"\xef\xbb\xbf" + lines[0]
    bad = {
        7: lines[7].replace(b"A", b"R", 1),                 # invalid base
        900: lines[900].split(b"\t")[0] + b"\tnan",         # non-finite label
        1800: b"",                                          # empty line
        2500: lines[2500] + b"\t3",                         # three columns
        3300: b"A" * 70_000 + b"\t1",                       # over-long line (more than one segment)
        4100: lines[4100].split(b"\t")[0] + b"\t1.2.3",     # not a number
        5000: lines[5000].split(b"\t")[0] + b"\t1e999",     # infinite
        6000: lines[6000].split(b"\t")[0],                  # no label
    }
    for i, text in bad.items():
        lines[i] = text
    for i in range(3, len(lines), 11):
        lines[i] += b"\r"  # CRLF
    source = tmp_path / "messy.txt"
    source.write_bytes(b"\n".join(lines))  # no newline after the last line
    return source


def test_same_bytes_for_any_worker_count_with_bad_rows(tmp_path: Path) -> None:
    source = _messy_source(tmp_path)
    assert len(segment_bounds(source, TINY.segment_bytes)) > 10
    trees = []
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        build_shards(source, out, TINY, workers=workers, progress=False)
        assert verify_shards(out).ok
        trees.append(tree_digest(out))
    assert trees[0] == trees[1] == trees[2]
    assert {"manifest.json", "rejected.tsv"} <= set(trees[0])

    # Every row is where a whole-file read puts it; rejected rows keep their file lines.
    rows, report = read_dream(source, ReadOptions(workers=0))
    manifest = load_manifest(tmp_path / "w2")
    read = manifest["read"]
    assert read["rows_in"] == report.rows_in == read["rows_ok"] + read["rows_rejected"] == 6370
    assert read["rejected_by_reason"] == dict(sorted(report.rejected.items()))
    assert manifest["rows"] == len(rows) == 6362
    rejected = (tmp_path / "w2" / "rejected.tsv").read_text().splitlines()[1:]
    assert [int(r.split("\t")[0]) for r in rejected] == [r.line for r in report.rejected_rows] == \
        [8, 901, 1801, 2501, 3301, 4101, 5001, 6001]
    stored = {}
    for info in manifest["splits"].values():
        for shard in info["shards"]:
            blocks = shard_blocks(shard, tmp_path / "w2" / MANIFEST)
            for block in read_block_range(tmp_path / "w2" / shard["file"], blocks):
                stored.update(zip(block["line"].tolist(), block["y"].tolist()))
    assert stored == dict(zip(rows.lines.tolist(), rows.labels.tolist()))
    assert "UTF-8 byte-order mark at the start of the file was ignored" in read["warnings"]


def test_shards_are_numbered_by_segment_in_file_order(tmp_path: Path) -> None:
    one = build_shards(DEMO_TRAIN, tmp_path / "one", ShardOptions(rows_per_block=128, blocks_per_shard=5),
                       progress=False).manifest
    # A file smaller than one segment: shards 0, 1, 2, ... of 640 rows, as a single reader cuts them.
    train = one["splits"]["train"]["shards"]
    assert [s["name"] for s in train] == [f"train-{i:06d}" for i in range(len(train))]
    assert [s["rows"] for s in train[:-1]] == [640] * (len(train) - 1)
    many = build_shards(DEMO_TRAIN, tmp_path / "many", TINY, progress=False).manifest
    per = shards_per_segment(TINY)
    numbers = [int(s["name"].split("-")[1]) for s in many["splits"]["train"]["shards"]]
    assert numbers == sorted(numbers) and len(set(n // per for n in numbers)) > 10
    lines = [int(b["line"][0]) for s in many["splits"]["train"]["shards"]
             for b in read_block_range(tmp_path / "many" / s["file"], shard_blocks(s, tmp_path / "many" / MANIFEST))]
    assert lines == sorted(lines)  # file order within the split


def test_gzip_gives_the_shards_of_the_plain_file(tmp_path: Path) -> None:
    source = _messy_source(tmp_path)
    packed = tmp_path / "messy.txt.gz"
    packed.write_bytes(gzip.compress(source.read_bytes()))
    plain = build_shards(source, tmp_path / "plain", TINY, workers=2, progress=False).manifest
    zipped = build_shards(packed, tmp_path / "gz", TINY, workers=2, progress=False).manifest
    tars = {k: v for k, v in tree_digest(tmp_path / "plain").items() if k.endswith(".tar")}
    assert tars == {k: v for k, v in tree_digest(tmp_path / "gz").items() if k.endswith(".tar")}
    assert plain["splits"] == zipped["splits"] and plain["labels"] == zipped["labels"]
    assert (tmp_path / "plain" / "rejected.tsv").read_bytes() == (tmp_path / "gz" / "rejected.tsv").read_bytes()
    assert sorted(p.name for p in (tmp_path / "gz").iterdir() if "decompressed" in p.name) == []


def test_gzip_copy_never_follows_a_link_planted_at_a_predictable_name(tmp_path: Path) -> None:
    # Another user of a shared output folder plants links at the copy's old name (pid-only) all
    # through the build, after its cleanup of leftovers too: the file they point at stays as it was.
    source = _messy_source(tmp_path)
    packed = tmp_path / "messy.txt.gz"
    packed.write_bytes(gzip.compress(source.read_bytes()))
    plain = build_shards(source, tmp_path / "plain", TINY, workers=2, progress=False).manifest
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"not yours\n")
    out = tmp_path / "gz"
    out.mkdir()
    planted = out / f"source.decompressed.tmp-{os.getpid()}"
    done = threading.Event()

    def plant() -> None:
        while not done.is_set():
            try:
                planted.symlink_to(victim)
            except FileExistsError:
                pass
            time.sleep(0)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # let the planter run between the build's steps
    planter = threading.Thread(target=plant)
    planter.start()
    try:
        zipped = build_shards(packed, out, TINY, workers=2, progress=False).manifest
    finally:
        done.set()
        planter.join()
        sys.setswitchinterval(interval)
    assert victim.read_bytes() == b"not yours\n"
    assert planted.is_symlink()  # still a link: nothing was written through it or in its place
    tars = {k: v for k, v in tree_digest(tmp_path / "plain").items() if k.endswith(".tar")}
    assert tars == {k: v for k, v in tree_digest(out).items() if k.endswith(".tar")}
    assert plain["splits"] == zipped["splits"]
    assert [p.name for p in out.iterdir() if "decompressed" in p.name] == [planted.name]


def test_strict_names_the_first_bad_row_of_the_file_whichever_segment_finishes_first(tmp_path: Path) -> None:
    lines = DEMO_TRAIN.read_text().splitlines()
    lines[4000] = lines[4000].replace("A", "Y", 1)
    lines[6000] = lines[6000].replace("A", "Y", 1)
    source = tmp_path / "two_bad.txt"
    source.write_text("\n".join(lines) + "\n")
    for workers in (1, 2):
        with pytest.raises(InputError, match=r"two_bad\.txt:4001 \[sequence\]: invalid base 'Y'"):
            build_shards(source, tmp_path / f"strict{workers}", TINY, ReadOptions(strict=True), workers=workers,
                         progress=False)
        assert not (tmp_path / f"strict{workers}" / MANIFEST).exists()


def test_mostly_bad_file_is_refused_and_no_manifest_written(tmp_path: Path) -> None:
    lines = DEMO_TRAIN.read_text().splitlines()[:2000]
    lines = [line + "\tx" if i % 3 == 0 else line for i, line in enumerate(lines)]
    source = tmp_path / "bad.txt"
    source.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"667 of 2000 rows are bad, more than max_bad_fraction=0\.05"):
        build_shards(source, tmp_path / "out", TINY, workers=2, progress=False)
    assert not (tmp_path / "out" / MANIFEST).exists()


@pytest.mark.slow
def test_killed_build_resumes_byte_identical_across_segments(tmp_path: Path) -> None:
    source = big_source(tmp_path, 24)  # ~153k rows, ~18 MB: 18 segments of 1 MB
    options = ShardOptions(rows_per_block=256, blocks_per_shard=10, segment_bytes=1_000_000)
    reference = tmp_path / "reference"
    build_shards(source, reference, options, workers=1, progress=False)  # another worker count
    resumed = tmp_path / "resumed"
    kills = kill_builds(source, resumed, repr(options), (3, 20, 45))
    assert kills >= 1, "the build finished before it could be interrupted"
    result = build_shards(source, resumed, options, workers=2, progress=False)
    assert result.shards_reused > 0 and result.shards_written + result.shards_reused == \
        sum(len(info["shards"]) for info in result.manifest["splits"].values())
    assert tree_digest(resumed) == tree_digest(reference)
    assert verify_shards(resumed).ok


def test_top_view_is_selected_by_the_threshold(tmp_path: Path) -> None:
    out = tmp_path / "top"
    manifest = build_shards(DEMO_TRAIN, out, TINY, progress=False).manifest
    threshold = np.float32(manifest["labels"]["top_threshold"])
    config = LoaderConfig(view="top", tokens="bases", batch_size=16, shuffle=False, drop_last=False)
    ys = np.concatenate([batch["y"].numpy() for batch in ShardLoader(out, config, rank=0, world_size=1)])
    every = np.array([y for _, y in (line.split("\t") for line in DEMO_TRAIN.read_text().splitlines())], float)
    train = manifest["splits"]["train"]
    assert len(ys) == train["rows_top"] > 0 and bool((ys >= threshold).all())
    assert manifest["labels"]["rows_top"] == int((every.astype(np.float32) >= threshold).sum())
    assert manifest["labels"]["top_threshold"] == pytest.approx(np.quantile(every, 0.8))

    # An index whose top count disagrees with the labels is named by the loader and by verify.
    edited = json.loads((out / MANIFEST).read_text())
    edited["splits"]["train"]["shards"][0]["blocks"][2][4] += 1
    edited["splits"]["train"]["rows_top"] += 1
    (out / MANIFEST).write_text(json.dumps(edited))
    shard = edited["splits"]["train"]["shards"][0]
    where = f"{out / shard['file']}: block 2 at byte {shard['blocks'][2][0]}: "
    with pytest.raises(UserError, match="top-expression rows") as error:
        for _ in ShardLoader(out, config, rank=0, world_size=1):
            pass
    assert str(error.value).startswith(where)
    result = verify_shards(out)
    assert not result.ok and any(p.startswith(f"{where}") and "top-expression" in p for p in result.problems)


def test_shards_of_format_version_2_are_refused_until_rebuilt(tmp_path: Path) -> None:
    out = tmp_path / "v2"
    build_shards(DEMO_TRAIN, out, TINY, progress=False)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["format_version"] = manifest["fingerprint"]["format_version"] = 2
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"manifest\.json: format_version 2: shards with the top-expression subset "
                                        r"as a flag bit; rebuild them"):
        load_manifest(out)
    with pytest.raises(UserError, match=r"format version 2 \(the top-expression subset as a flag bit\); pass "
                                        r"--overwrite"):
        build_shards(DEMO_TRAIN, out, TINY, progress=False)
    result = build_shards(DEMO_TRAIN, out, TINY, overwrite=True, progress=False)
    assert result.manifest["format_version"] == FORMAT_VERSION and verify_shards(out).ok


# --------------------------------------------------------------------------- the parsers segments rely on


def test_top_threshold_is_numpys_quantile_without_its_copy() -> None:
    rng = np.random.default_rng(17)
    for case in range(400):
        n = int(rng.integers(1, 60)) if case % 2 else int(rng.integers(1, 5000))
        kind = case % 4
        if kind == 0:
            labels = rng.normal(10, 3, n)
        elif kind == 1:
            labels = rng.integers(0, 18, n).astype(float)  # DREAM's integer bins: many ties
        elif kind == 2:
            labels = rng.standard_cauchy(n) * 1e30
        else:
            labels = np.where(rng.random(n) < 0.3, np.nan, rng.normal(0, 1, n))  # unlabelled rows
        labels = labels.astype(np.float32)
        fraction = float(rng.choice([0.2, 0.5, 1.0, 1e-3, rng.random() or 0.5]))
        finite = labels[np.isfinite(labels)].astype(np.float64)
        expected = np.quantile(finite, 1.0 - fraction) if len(finite) else np.nan
        got = top_threshold(labels.copy(), fraction)
        assert got == expected or (np.isnan(got) and np.isnan(expected)), (case, n, fraction)


def test_plain_decimals_read_exactly_what_float_reads() -> None:
    rng = np.random.default_rng(3)
    texts = [b"0", b"-0", b"+5", b"5.", b".5", b"-.25", b"007.50", b"123456789012345", b"0.000000000000001",
             b"13.3097486515175", b"-", b".", b"+", b"1.2.3", b"--4", b"1e5", b"1234567890123456", b"4-", b"+-1"]
    for _ in range(20_000):
        digits = "".join(rng.choice(list("0123456789"), int(rng.integers(1, 16))))
        point = int(rng.integers(0, len(digits) + 1))
        sign = str(rng.choice(["", "-", "+"]))
        texts.append(f"{sign}{digits[:point]}.{digits[point:]}".encode() if rng.random() < 0.8
                     else f"{sign}{digits}".encode())
    width = 32
    text = np.zeros((len(texts), width), np.uint8)
    for i, t in enumerate(texts):
        text[i, : len(t)] = np.frombuffer(t, np.uint8)
    lengths = np.array([len(t) for t in texts])
    values, decimal = _plain_decimals(text, lengths)
    for t, value, ok in zip(texts, values, decimal):
        try:
            reference = float(t)
        except ValueError:
            assert not ok, t
            continue
        if ok:
            assert value == reference and np.signbit(value) == np.signbit(reference), t
        else:
            assert b"e" in t or len(t.strip(b"+-.")) - t.count(b".") > 15, t  # left to the general parser


@pytest.mark.slow  # 5 to 8 s
def test_segments_read_what_the_whole_file_read_gives() -> None:
    rng = np.random.default_rng(5)
    whole, report = read_dream(DEMO_TRAIN, ReadOptions(workers=0))
    data = DEMO_TRAIN.read_bytes()
    for segment_bytes in [1, 97, 4096, *rng.integers(100, 200_000, 6).tolist(), len(data), 10 * len(data)]:
        bounds = segment_bounds(DEMO_TRAIN, segment_bytes)
        assert bounds[0][1] == 0 and bounds[-1][2] == len(data)
        assert all(a[2] == b[1] for a, b in zip(bounds, bounds[1:]))  # contiguous, in order
        assert all(start == 0 or data[start - 1 : start] == b"\n" for _, start, _ in bounds)  # at line starts
        assert all(start >= k * segment_bytes for k, start, _ in bounds)  # never before the nominal start
        first, lines, labels = 1, [], []
        for _, start, end in bounds:
            part = read_segment(DEMO_TRAIN, start, end, first)
            lines.append(part.rows.lines)
            labels.append(part.rows.labels)
            first += part.rows_in
        assert first - 1 == report.rows_in
        assert np.array_equal(np.concatenate(lines), whole.lines)
        assert np.array_equal(np.concatenate(labels), whole.labels)
