"""Shard build, read-back, determinism, resume after a kill, and verification."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
import xxhash

from promoter_dist.data import shards as shards_module
from promoter_dist.data.alphabet import PAD, decode
from promoter_dist.data.dream import ReadOptions, read_dream
from promoter_dist.data.hashing import sequence_hash
from promoter_dist.data.shards import (
    BLOCK_INDEX_FIELDS,
    FLAG_INTEGER,
    FLAG_NAD,
    FORMAT_VERSION,
    MANIFEST,
    BlockIndex,
    ShardOptions,
    block_checksum,
    build_shards,
    encode_shard,
    encode_shard_tarfile,
    load_manifest,
    padded_codes,
    read_block_range,
    shard_blocks,
    verify_shards,
)
from promoter_dist.errors import UserError
from tests.conftest import DEMO_TRAIN
from tests.data.shard_builds import big_source, kill_builds, tree_digest

SMALL = ShardOptions(rows_per_block=128, blocks_per_shard=5)


def _source_rows(path: Path) -> dict[int, tuple[str, float]]:
    rows = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        sequence, label = line.split("\t")
        rows[number] = (sequence, float(label))
    return rows


def _all_blocks(shard_dir: Path, split: str):
    manifest = load_manifest(shard_dir)
    for shard in manifest["splits"][split]["shards"]:
        yield from read_block_range(shard_dir / shard["file"], shard_blocks(shard, shard_dir / MANIFEST))


def test_real_rows_round_trip(small_shards: Path) -> None:
    manifest = load_manifest(small_shards)
    source = _source_rows(DEMO_TRAIN)
    assert manifest["rows"] == len(source) == 6370
    assert manifest["read"]["rows_in"] == manifest["read"]["rows_ok"] + manifest["read"]["rows_rejected"]
    seen = set()
    for split in manifest["splits"]:
        for block in _all_blocks(small_shards, split):
            codes = padded_codes(block)
            for i, line in enumerate(block["line"].tolist()):
                sequence, label = source[line]
                assert decode(codes[i]) == sequence
                assert block["y"][i] == pytest.approx(label, rel=1e-6)
                assert bool(block["flags"][i] & FLAG_INTEGER) == (label == int(label))
                assert bool(block["flags"][i] & FLAG_NAD) == (len(sequence) == 110 and "N" not in sequence)
                seen.add(line)
    assert seen == set(source)  # every row in exactly one split


def test_split_fractions_and_sizes(small_shards: Path) -> None:
    manifest = load_manifest(small_shards)
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert abs(train["rows"] / manifest["rows"] - 0.9) < 0.02
    assert train["rows"] + val["rows"] == manifest["rows"]
    assert len(train["shards"]) == -(-train["rows"] // (128 * 5))
    assert [s["rows"] for s in train["shards"][:-1]] == [640] * (len(train["shards"]) - 1)
    # block-level counts add up to the shard's
    for shard in train["shards"]:
        assert sum(b[2] for b in shard["blocks"]) == shard["rows"]


def test_block_index_round_trips_the_manifest_lists(small_shards: Path) -> None:
    assert BLOCK_INDEX_FIELDS == ("offset", "nbytes", "rows", "rows_nad", "rows_top", "max_length", "checksum")
    index = BlockIndex(offset=0, nbytes=5120, rows=128, rows_nad=100, rows_top=30, max_length=110,
                       checksum="0123456789abcdef")
    assert index.to_list() == [0, 5120, 128, 100, 30, 110, "0123456789abcdef"]
    assert BlockIndex.from_list(index.to_list(), MANIFEST, "train-000000", 0) == index
    assert [index.rows_in_view(v) for v in ("all", "nad", "top")] == [128, 100, 30]
    manifest = load_manifest(small_shards)
    for info in manifest["splits"].values():
        for shard in info["shards"]:
            blocks = shard_blocks(shard, small_shards / MANIFEST)
            assert [b.to_list() for b in blocks] == shard["blocks"]  # the JSON form is unchanged
            assert blocks[0].offset == 0 and sum(b.nbytes for b in blocks) + 1024 <= shard["bytes"]
            assert all(a.offset + a.nbytes == b.offset for a, b in itertools.pairwise(blocks))
            data = (small_shards / shard["file"]).read_bytes()
            assert all(b.checksum == block_checksum(data[b.offset : b.offset + b.nbytes]) for b in blocks)
        assert sum(b.rows_nad for s in info["shards"] for b in shard_blocks(s, MANIFEST)) == info["rows_nad"]
    assert max(b.max_length for info in manifest["splits"].values() for s in info["shards"]
               for b in shard_blocks(s, MANIFEST)) == manifest["max_row_length"]


CHECKSUM = "0123456789abcdef"


@pytest.mark.parametrize("entry", [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, CHECKSUM, 7],
                                   [0, 1, 2.0, 3, 4, 5, CHECKSUM], [0, 1, True, 3, 4, 5, CHECKSUM],
                                   [0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, "0123456789ABCDEF"],
                                   [0, 1, 2, 3, 4, 5, "xyz"], [0, -1, 2, 1, 1, 5, CHECKSUM],
                                   [0, 1, 2, 3, 1, 5, CHECKSUM], {"offset": 0}, "0,1,2,3,4,5"])
def test_malformed_block_index_names_file_shard_and_block(entry, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"manifest\.json: shard train-000003 block 7: malformed block index"):
        BlockIndex.from_list(entry, tmp_path / MANIFEST, "train-000003", 7)


def test_loader_and_verify_report_a_malformed_block_index(tmp_path: Path, small_shards: Path) -> None:
    from promoter_dist.data.loader import LoaderConfig, ShardLoader

    work = tmp_path / "copy"
    shutil.copytree(small_shards, work)
    manifest = json.loads((work / MANIFEST).read_text())
    shard = manifest["splits"]["train"]["shards"][1]
    shard["blocks"][2] = shard["blocks"][2][:4]
    (work / MANIFEST).write_text(json.dumps(manifest))
    where = rf"{re.escape(str(work / MANIFEST))}: shard {shard['name']} block 2: malformed"
    with pytest.raises(UserError, match=where):
        ShardLoader(work, LoaderConfig(), rank=0, world_size=1)
    result = verify_shards(work)
    assert not result.ok and len(result.problems) == 1 and re.match(where, result.problems[0])


def test_top_subset_threshold_is_over_the_whole_file(small_shards: Path) -> None:
    manifest = load_manifest(small_shards)
    labels = np.array([y for _, y in _source_rows(DEMO_TRAIN).values()])
    threshold = np.quantile(labels, 0.8)
    assert manifest["labels"]["top_threshold"] == pytest.approx(threshold)
    assert manifest["labels"]["rows_top"] == int((labels >= threshold).sum())
    # No stored bit: each block's rows_top counts the labels >= the threshold, as the loader selects them.
    manifest_path = small_shards / MANIFEST
    for info in manifest["splits"].values():
        for shard in info["shards"]:
            blocks = shard_blocks(shard, manifest_path)
            for entry, block in zip(blocks, read_block_range(small_shards / shard["file"], blocks)):
                assert entry.rows_top == int((block["y"] >= np.float32(threshold)).sum())
                assert block["flags"].max(initial=0) <= FLAG_INTEGER | FLAG_NAD


def test_stock_webdataset_and_tar_read_the_shards(small_shards: Path) -> None:
    manifest = load_manifest(small_shards)
    urls = [str(small_shards / s["file"]) for s in manifest["splits"]["train"]["shards"]]
    rows = 0
    for sample in wds.WebDataset(urls, shardshuffle=False).decode():
        assert sample["seq.npy"].dtype == np.uint8
        assert int(sample["len.npy"].sum()) == len(sample["seq.npy"])
        rows += len(sample["y.npy"])
    assert rows == manifest["splits"]["train"]["rows"]
    listing = subprocess.run(["tar", "tf", urls[0]], capture_output=True, text=True, check=True).stdout.split()
    assert listing[:5] == [f"train-000000_0000.{m}.npy" for m in ("seq", "len", "y", "line", "flags")]
    with tarfile.open(urls[0]) as tar:
        member = tar.getmembers()[0]
        assert (member.mtime, member.uid, member.uname) == (0, 0, "")


def test_build_is_deterministic_across_worker_counts(tmp_path: Path, small_shards: Path) -> None:
    build_shards(DEMO_TRAIN, tmp_path / "one", SMALL, workers=0, progress=False)
    assert tree_digest(tmp_path / "one") == tree_digest(small_shards)


def test_duplicate_sequences_share_a_split_and_seed_redraws(tmp_path: Path) -> None:
    rows, _ = read_dream(DEMO_TRAIN)
    # the hash ignores padding width
    wide = np.full((len(rows), rows.codes.shape[1] + 9), 5, dtype=np.uint8)
    wide[:, : rows.codes.shape[1]] = rows.codes
    assert np.array_equal(sequence_hash(rows.codes, rows.lengths), sequence_hash(wide, rows.lengths))
    text = DEMO_TRAIN.read_text().splitlines()
    doubled = tmp_path / "doubled.txt"
    doubled.write_text("\n".join(text[:500] + [line.split("\t")[0] + "\t1" for line in text[:500]]) + "\n")
    build_shards(doubled, tmp_path / "a", ShardOptions(rows_per_block=64, blocks_per_shard=2), progress=False)
    split_of: dict[str, set] = {}
    for split in ("train", "val"):
        for block in _all_blocks(tmp_path / "a", split):
            for i in range(len(block["len"])):
                split_of.setdefault(decode(padded_codes(block)[i]), set()).add(split)
    assert all(len(s) == 1 for s in split_of.values())
    three = ShardOptions(splits=(("train", 0.8), ("val", 0.1), ("test", 0.1)), split_seed=7, rows_per_block=256)
    m = build_shards(DEMO_TRAIN, tmp_path / "b", three, progress=False).manifest
    assert set(m["splits"]) == {"train", "val", "test"}
    assert abs(m["splits"]["test"]["rows"] / 6370 - 0.1) < 0.02


def test_bad_rows_are_reported_not_lost(tmp_path: Path) -> None:
    lines = DEMO_TRAIN.read_text().splitlines()[:300]
    lines[9] = lines[9].replace("A", "R", 1)
    lines[19] = lines[19].split("\t")[0] + "\tnan"
    source = tmp_path / "bad.txt"
    source.write_text("\n".join(lines) + "\n")
    m = build_shards(source, tmp_path / "out", SMALL, progress=False).manifest
    assert m["read"]["rows_in"] == 300 and m["rows"] == 298 and m["read"]["rows_rejected"] == 2
    assert m["read"]["rejected_by_reason"] == {"invalid_base": 1, "nonfinite_label": 1}
    rejected = (tmp_path / "out" / "rejected.tsv").read_text().splitlines()
    assert [r.split("\t")[:2] for r in rejected[1:]] == [["10", "invalid_base"], ["20", "nonfinite_label"]]
    with pytest.raises(UserError, match=r"bad\.txt:10 \[sequence\]"):
        build_shards(source, tmp_path / "strict", SMALL, read_options=ReadOptions(strict=True), progress=False)


def test_verify_names_corrupted_truncated_and_missing_shards(tmp_path: Path, small_shards: Path) -> None:
    work = tmp_path / "copy"
    shutil.copytree(small_shards, work)
    assert verify_shards(work).ok
    names = sorted(p.name for p in work.glob("train-*.tar"))
    data = bytearray((work / names[0]).read_bytes())
    data[5000] ^= 0xFF
    (work / names[0]).write_bytes(bytes(data))
    with open(work / names[1], "r+b") as handle:
        handle.truncate(1000)
    (work / names[2]).unlink()
    result = verify_shards(work)
    assert not result.ok
    text = "\n".join(result.problems)
    assert f"{names[0]}: corrupted" in text
    assert f"{names[1]}: truncated" in text
    assert f"{names[2]}: missing" in text
    assert len(result.problems) == 3
    cli = subprocess.run([sys.executable, "-m", "promoter_dist.cli", "shards", "verify", str(work)],
                         capture_output=True, text=True)
    assert cli.returncode == 1 and names[0] in cli.stdout and "Traceback" not in cli.stderr


def test_other_source_is_refused_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    build_shards(DEMO_TRAIN, out, SMALL, progress=False)
    other = tmp_path / "other.txt"
    other.write_text("\n".join(DEMO_TRAIN.read_text().splitlines()[:1000]) + "\n")
    with pytest.raises(UserError, match="another source"):
        build_shards(other, out, SMALL, progress=False)
    # The same size, one base changed: the source digest tells them apart as well.
    same_size = tmp_path / "same-size.txt"
    text = bytearray(DEMO_TRAIN.read_bytes())
    text[5] = ord("C") if text[5] != ord("C") else ord("G")
    same_size.write_bytes(bytes(text))
    with pytest.raises(UserError, match="another source"):
        build_shards(same_size, out, SMALL, progress=False)
    m = build_shards(other, out, SMALL, overwrite=True, progress=False).manifest
    assert m["rows"] == 1000 and verify_shards(out).ok
    assert sum(len(s["shards"]) for s in m["splits"].values()) == len(list(out.glob("*.tar")))


@pytest.mark.slow
def test_killed_build_resumes_byte_identical(tmp_path: Path) -> None:
    source = big_source(tmp_path, 24)  # ~153k rows, ~60 shards of 2,560 rows
    options = ShardOptions(rows_per_block=256, blocks_per_shard=10)
    reference = tmp_path / "reference"
    build_shards(source, reference, options, workers=2, progress=False)
    resumed = tmp_path / "resumed"
    kills = kill_builds(source, resumed, "ShardOptions(rows_per_block=256, blocks_per_shard=10)",
                        (1, 15, 40))  # kill after some shards exist, three times over
    assert kills >= 1, "the build finished before it could be interrupted"
    result = build_shards(source, resumed, options, workers=2, progress=False)
    assert result.shards_reused > 0
    assert tree_digest(resumed) == tree_digest(reference) | {}
    assert verify_shards(resumed).ok


def _as_format_1(manifest: dict) -> None:
    for info in manifest["splits"].values():
        for shard in info["shards"]:
            shard["blocks"] = [entry[:6] for entry in shard["blocks"]]  # no checksums


def _as_format_3(manifest: dict) -> None:
    manifest["source"]["sha256"] = hashlib.sha256(DEMO_TRAIN.read_bytes()).hexdigest()
    del manifest["source"]["xxh3_128"]


OLD_FORMATS = {  # version: (what made it old, manifest.json's message, the build's message)
    1: (_as_format_1, "shards without block checksums", r"\(no block checksums\)"),
    3: (_as_format_3, "the source identified by sha256", r"\(the source identified by sha256\)"),
}


@pytest.mark.parametrize("version", sorted(OLD_FORMATS))
def test_shards_of_an_older_format_are_refused_until_rebuilt(tmp_path: Path, version: int) -> None:
    """Readers refuse an older format naming what it lacks, a build asks for --overwrite, then rebuilds."""
    make_old, read_problem, build_problem = OLD_FORMATS[version]
    out = tmp_path / "old"
    build_shards(DEMO_TRAIN, out, SMALL, progress=False)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["format_version"] = manifest["fingerprint"]["format_version"] = version
    make_old(manifest)
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=rf"manifest\.json: format_version {version}: {read_problem}; rebuild"):
        load_manifest(out)
    with pytest.raises(UserError, match=rf"holds shards of format version {version} {build_problem}; pass --overwrite"):
        build_shards(DEMO_TRAIN, out, SMALL, progress=False)
    result = build_shards(DEMO_TRAIN, out, SMALL, overwrite=True, progress=False)
    assert result.manifest["format_version"] == FORMAT_VERSION and verify_shards(out).ok


def test_rebuild_of_finished_folder_is_a_no_op(small_shards: Path) -> None:
    before = tree_digest(small_shards)
    result = build_shards(DEMO_TRAIN, small_shards, SMALL, progress=False, log=lambda *_: None)
    assert result.shards_written == 0 and tree_digest(small_shards) == before


def test_manifest_names_the_source_by_its_xxh3_128(small_shards: Path) -> None:
    source = load_manifest(small_shards)["source"]
    assert source["xxh3_128"] == xxhash.xxh3_128(DEMO_TRAIN.read_bytes()).hexdigest()
    assert "sha256" not in source and source["bytes"] == DEMO_TRAIN.stat().st_size


def _random_blocks(rng: np.random.Generator, sizes: list[int]) -> list[dict[str, np.ndarray]]:
    blocks = []
    for n in sizes:
        lengths = rng.integers(0, 300, n).astype("<u2")
        blocks.append({"seq": rng.integers(0, 5, int(lengths.sum())).astype("|u1"), "len": lengths,
                       "y": rng.normal(size=n).astype("<f4"), "line": rng.integers(1, 2**32, n).astype("<u4"),
                       "flags": rng.integers(0, 4, n).astype("|u1")})
    return blocks


@pytest.mark.parametrize("name", ["train-000000", "val-123456", "a" * 60 + "-000001", "\u00e9t\u00e9-000002"])
def test_shard_bytes_are_those_of_tarfile_and_np_save(name: str) -> None:
    """The writer makes its tar and .npy headers itself: byte for byte what tarfile and np.save write, for
    empty blocks, one row, uneven sizes (every padding), long and non-ASCII names."""
    rng = np.random.default_rng(len(name))
    for sizes in ([0], [1], [1024, 1024, 7], [3, 5000, 1], list(rng.integers(0, 40, 25))):
        blocks = _random_blocks(rng, [int(n) for n in sizes])
        data, index = encode_shard(name, blocks)
        assert data == encode_shard_tarfile(name, blocks)
        assert [b.rows for b in index] == [int(n) for n in sizes] and len(data) % tarfile.RECORDSIZE == 0


def test_padded_codes_equal_a_plain_layout() -> None:
    """One copy per row and a 0/255 window for what lies beyond: the same as laying out row by row, for
    subsets of rows, widths above and below the longest row, empty rows and none."""
    rng = np.random.default_rng(5)
    for trial in range(300):
        n = int(rng.integers(0, 40))
        lengths = rng.integers(0, 50, n).astype(np.uint16)
        block = {"seq": rng.integers(0, 5, int(lengths.sum())).astype(np.uint8), "len": lengths}
        rows = None if trial % 3 == 0 else np.flatnonzero(rng.random(n) < 0.5)
        width = None if trial % 2 else int(rng.integers(0, 60))
        picked = np.arange(n) if rows is None else rows
        starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        shown = int(lengths[picked].max(initial=0)) if width is None else width
        expected = np.full((len(picked), shown), PAD, dtype=np.uint8)
        for out_row, row in enumerate(picked):
            take = min(int(lengths[row]), shown)
            expected[out_row, :take] = block["seq"][starts[row] : starts[row] + take]
        np.testing.assert_array_equal(padded_codes(block, rows, width), expected)


def test_workers_flush_their_shards_before_the_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every shard the build writes is fsynced (by the worker that wrote it), and the folder after the last
    of them, before the manifest is written. In-process (one worker) so the calls can be watched."""
    events: list[tuple[str, str]] = []
    real_file, real_folder, real_json = shards_module.fsync_file, shards_module.fsync_folder, \
        shards_module.write_json_atomic
    monkeypatch.setattr(shards_module, "fsync_file", lambda p: events.append(("file", Path(p).name)) or real_file(p))
    monkeypatch.setattr(shards_module, "fsync_folder",
                        lambda p: events.append(("folder", Path(p).name)) or real_folder(p))
    monkeypatch.setattr(shards_module, "write_json_atomic",
                        lambda p, obj: events.append(("json", Path(p).name)) or real_json(p, obj))
    out = tmp_path / "out"
    manifest = build_shards(DEMO_TRAIN, out, SMALL, workers=1, progress=False).manifest
    files = {s["file"] for info in manifest["splits"].values() for s in info["shards"]}
    flushed = [name for kind, name in events if kind == "file"]
    assert sorted(flushed) == sorted(files)
    assert events[-2:] == [("folder", "out"), ("json", MANIFEST)]


def test_shard_bytes_equal_np_save_for_other_dtypes_and_shapes() -> None:
    """The writer is a faithful encoder (tests use it to make shards readers must refuse): a member of another
    dtype, byte order or shape is written as np.save writes it."""
    rng = np.random.default_rng(9)
    block = _random_blocks(rng, [17])[0]
    for changed in ({"y": block["y"].astype(np.float64)}, {"len": block["len"].astype(">u2")},
                    {"seq": block["seq"][:16].reshape(4, 4)}, {"line": np.asfortranarray(np.ones((3, 2), "<u4"))}):
        blocks = [block | changed]
        assert encode_shard("train-000000", blocks)[0] == encode_shard_tarfile("train-000000", blocks)


def _long_block(rows: int, length: int, bases: int) -> tuple[dict[str, np.ndarray], BlockIndex]:
    """A block of ``rows`` rows of ``length`` bp whose seq claims ``bases`` bases (a zero-stride array: no memory)."""
    block = {"seq": np.broadcast_to(np.uint8(0), (bases,)), "len": np.full(rows, length, np.uint16),
             "y": np.zeros(rows, np.float32), "line": np.arange(rows, dtype=np.uint32),
             "flags": np.zeros(rows, np.uint8)}
    entry = BlockIndex(offset=0, nbytes=0, rows=rows, rows_nad=0, rows_top=0, max_length=length, checksum="0" * 16)
    return block, entry


@pytest.mark.parametrize("rows", [65_536, 65_538])
def test_row_lengths_sum_exactly_past_what_uint32_holds(rows: int) -> None:
    # 65,538 rows of 65,535 bp hold more than 2**32 - 1 bases: a uint32 sum would wrap to `wrapped`.
    total = rows * 65_535
    wrapped = total % 2**32
    block, entry = _long_block(rows, 65_535, wrapped if total >= 2**32 else total - 1)
    problem = shards_module.check_block(block, entry, labelled=True)
    assert problem == f"row lengths sum to {total} bases but seq holds {len(block['seq'])}"


def test_nad_rows_are_counted_from_every_flag_value_with_the_bit() -> None:
    block, entry = _long_block(8, 3, 24)
    block["flags"][:] = [0, FLAG_NAD, FLAG_NAD | FLAG_INTEGER, FLAG_INTEGER, FLAG_NAD, 0, 0, 0]
    assert shards_module.check_block(block, replace(entry, rows_nad=3), labelled=True) is None
    problem = shards_module.check_block(block, replace(entry, rows_nad=2), labelled=True)
    assert problem == "3 NAD-eligible and 0 top-expression rows; the manifest says 2 and 0"


def _nad_block(lengths: list[int], seq: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """A block of rows of ``lengths`` bp, of random A C G T unless ``seq`` is given, every row flagged NAD-eligible."""
    rows = len(lengths)
    seq = np.random.default_rng(7).integers(0, 4, sum(lengths), dtype=np.uint8) if seq is None else seq
    return {"seq": seq, "len": np.asarray(lengths, np.uint16), "y": np.zeros(rows, np.float32),
            "line": np.arange(rows, dtype=np.uint32), "flags": np.full(rows, FLAG_NAD, np.uint8)}


def test_nad_row_codes_are_each_rows_110_bases() -> None:
    block = _nad_block([110, 120, 110, 110])
    starts = [0, 110, 230, 340]
    rows = np.array([0, 2, 3])
    codes = shards_module.nad_row_codes(block, rows)
    np.testing.assert_array_equal(codes, [block["seq"][starts[r] : starts[r] + 110] for r in rows])
    np.testing.assert_array_equal(codes, padded_codes(block, rows, 110))
    assert shards_module.nad_row_codes(block, np.array([], np.int64)).shape == (0, 110)


@pytest.mark.parametrize(("lengths", "code", "problem"), [
    ([110, 109, 110], None, "a row flagged NAD-eligible is 109 bp, not 110"),
    ([110, 110, 111], None, "a row flagged NAD-eligible is 111 bp, not 110"),
    ([110, 110, 110], 4, "a row flagged NAD-eligible holds an N"),
    ([110, 110, 110], 9, "a row flagged NAD-eligible holds a base code outside 0..4 (A C G T N)"),
])
def test_nad_row_codes_refuse_rows_that_are_not_110_bp_of_acgt(lengths: list[int], code: int | None,
                                                              problem: str) -> None:
    block = _nad_block(lengths)
    if code is not None:
        block["seq"][150] = code
    with pytest.raises(ValueError, match=f"^{re.escape(problem)}$"):
        shards_module.nad_row_codes(block, np.arange(len(lengths)))


def test_nad_row_lengths_are_checked_past_the_byte_run_too() -> None:
    # More NAD rows than the run of 110s compared as bytes: the lengths are compared one by one.
    rows = 65_537
    lengths = [110] * rows
    lengths[-1] = 109
    block = _nad_block(lengths, np.zeros(sum(lengths), np.uint8))
    with pytest.raises(ValueError, match="is 109 bp, not 110"):
        shards_module.nad_row_codes(block, np.arange(rows))
    block = _nad_block([110] * rows, np.zeros(110 * rows, np.uint8))
    assert shards_module.nad_row_codes(block, np.arange(rows)).shape == (rows, 110)


def test_row_offsets_refuse_lengths_that_do_not_sum_to_the_bases_held() -> None:
    block = _nad_block([110, 110])
    np.testing.assert_array_equal(shards_module.row_offsets(block), [0, 110])
    block["len"][1] = 111
    with pytest.raises(ValueError, match="^row lengths sum to 221 bases but seq holds 220$"):
        shards_module.row_offsets(block)
    with pytest.raises(ValueError, match="^row lengths sum to 221 bases but seq holds 220$"):
        padded_codes(block)
