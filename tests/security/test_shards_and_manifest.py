"""Shards and manifests from someone else: every byte the loader reads is checked, only our files are touched.

Real shards built from the demo rows. A byte flipped in each member kind of a block is named
(shard file, block, byte offset) by the loader and by ``shards verify``; a shard rewritten with
consistent checksums but arrays outside the schema is named the same way; manifests of the
wrong shape are one line naming the field; a FIFO in place of a manifest or shard does not
hang; ``shards build --overwrite`` removes only the files its own manifest lists and its own
temporaries, after checking that the folder is one of its own.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import shutil
import tarfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from promoter_dist.cli import main
from promoter_dist.data.loader import LoaderConfig, ShardLoader
from promoter_dist.data.shards import MANIFEST, encode_shard, load_manifest, read_block_range, shard_blocks
from promoter_dist.errors import UserError
from tests.conftest import DEMO_TRAIN
from tests.security.messages import one_error_line

pytestmark = pytest.mark.timeout(60)

SMALL = ["--rows-per-block", "128", "--blocks-per-shard", "5"]
SHARD, BLOCK = 1, 2  # the damaged block: train shard 1, block 2
ALL_ROWS = LoaderConfig(batch_size=64, shuffle=False, drop_last=False)
NAD_ROWS = LoaderConfig(view="nad", tokens="nad", batch_size=64, shuffle=False, drop_last=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """Shards of the 6,370 real demo rows in blocks of 128 (9 train shards), built by the real command."""
    out = tmp_path_factory.mktemp("shards") / "demo"
    assert main(["shards", "build", str(DEMO_TRAIN), "--out", str(out), "--no-progress", *SMALL]) == 0
    return out


@pytest.fixture
def work(built: Path, tmp_path: Path) -> Path:
    """A private copy of the built shards to damage."""
    return Path(shutil.copytree(built, tmp_path / "shards"))


def target(work: Path) -> tuple[Path, int]:
    """The damaged block's shard file and byte offset."""
    shard = load_manifest(work)["splits"]["train"]["shards"][SHARD]
    return work / shard["file"], shard["blocks"][BLOCK][0]


def loader_error(work: Path, config: LoaderConfig = ALL_ROWS) -> str:
    """The one-line UserError of streaming the whole train split."""
    with pytest.raises(UserError) as caught:
        for _ in ShardLoader(work, config, rank=0, world_size=1):
            pass
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


def verify_report(work: Path, capsys) -> str:
    """``shards verify``'s report of a damaged folder (exit status 1), one BAD line."""
    assert main(["shards", "verify", str(work)]) == 1
    out = capsys.readouterr().out
    bad = [line for line in out.splitlines() if line.startswith("BAD ")]
    assert len(bad) == 1 and "FAILED" in out, out
    return bad[0]


# --------------------------------------------------------------------------- flipped bytes


@pytest.mark.parametrize("member", ["seq", "len", "y", "line", "flags", "header"])
def test_a_flipped_byte_in_any_member_is_named_by_the_loader_and_verify(work: Path, member: str, capsys) -> None:
    path, offset = target(work)
    key = f"train-{SHARD:06d}_{BLOCK:04d}"
    with tarfile.open(path) as tar:
        info = tar.getmember(f"{key}.{'seq' if member == 'header' else member}.npy")
    data = bytearray(path.read_bytes())
    if member == "header":
        at = info.offset + 100  # the tar header's mode field
    else:
        body = data[info.offset_data : info.offset_data + info.size]
        at = info.offset_data + 10 + int.from_bytes(body[8:10], "little") + 3  # inside the array's values
    data[at] ^= 0x10
    path.write_bytes(bytes(data))
    where = f"{path}: block {BLOCK} at byte {offset}: checksum differs"
    assert where in loader_error(work)
    assert where in loader_error(work, NAD_ROWS)
    report = verify_report(work, capsys)
    assert f"{path}: corrupted" in report and f"block {BLOCK} at byte {offset}: checksum differs" in report


@pytest.mark.slow  # about 10 s: shutting down the two workers of the failed DataLoader
def test_a_corrupt_block_read_by_a_dataloader_worker_is_the_same_one_line(work: Path) -> None:
    path, offset = target(work)
    data = bytearray(path.read_bytes())
    data[offset + 5000] ^= 0xFF
    path.write_bytes(bytes(data))
    config = LoaderConfig(batch_size=64, shuffle=False, drop_last=False, num_workers=2)
    message = loader_error(work, config)
    assert message.startswith(f"{path}: block {BLOCK} at byte {offset}: checksum differs"), message
    # The failed loader's workers (held in reference cycles through the traceback) shut down here,
    # not during whichever later test the garbage collector happens to run in.
    gc.collect()


# --------------------------------------------------------------------------- consistent checksums, bad arrays


def rewrite_shard(work: Path, change: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray] | None]) -> Path:
    """Re-encode the target shard with the target block changed, and a manifest that vouches for it.

    What someone with write access to both files could make: checksums and sha256 all match.
    """
    manifest = json.loads((work / MANIFEST).read_text())
    shard = manifest["splits"]["train"]["shards"][SHARD]
    path = work / shard["file"]
    blocks = [{k: v.copy() for k, v in block.items()}
              for block in read_block_range(path, shard_blocks(shard, work / MANIFEST))]
    blocks[BLOCK] = change(blocks[BLOCK]) or blocks[BLOCK]
    data, index = encode_shard(shard["name"], blocks, manifest["labels"]["top_threshold"])
    path.write_bytes(data)
    shard.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), blocks=[b.to_list() for b in index])
    (work / MANIFEST).write_text(json.dumps(manifest))
    return path


def _set(member: str, row: int, value) -> Callable[[dict[str, np.ndarray]], None]:
    def change(block: dict[str, np.ndarray]) -> None:
        block[member][row] = value

    return change


def _in_a_nad_row(code: int) -> Callable[[dict[str, np.ndarray]], None]:
    def change(block: dict[str, np.ndarray]) -> None:
        row = int(np.flatnonzero(block["flags"] & 2)[0])
        start = int(block["len"][:row].astype(np.int64).sum())
        block["seq"][start + 50] = code  # inside a row still flagged NAD-eligible

    return change


def _nad_row_of(length: int) -> Callable[[dict[str, np.ndarray]], None]:
    def change(block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # The first NAD-eligible row cut or lengthened at its end, still flagged: the index follows (max_length).
        row = int(np.flatnonzero(block["flags"] & 2)[0])
        end = int(block["len"][: row + 1].astype(np.int64).sum())
        old = int(block["len"][row])
        seq = np.concatenate([block["seq"][: end - max(old - length, 0)], np.zeros(max(length - old, 0), np.uint8),
                              block["seq"][end:]])
        return block | {"seq": seq, "len": np.concatenate([block["len"][:row], [length], block["len"][row + 1:]])
                        .astype(np.uint16)}

    return change


# What each view must refuse: the NAD view reads only NAD-eligible rows, and checks their codes itself.
BOTH_VIEWS = {"all": ALL_ROWS, "nad": NAD_ROWS}
SCHEMA_CASES = {
    "base_code": (_set("seq", 7, 9), "base code 9 outside 0..4", ["all"]),
    "base_code_in_nad_row": (_in_a_nad_row(9), "outside 0..4 (A C G T N)", ["all", "nad"]),
    "flag_bits": (_set("flags", 3, 0x42), "unknown flag bits 0x40", ["all", "nad"]),
    "lengths": (_set("len", 0, 111), "row lengths sum to", ["all", "nad"]),
    "infinite_label": (_set("y", 5, np.inf), "row 5 has label inf", ["all", "nad"]),
    "nan_label": (_set("y", 5, np.nan), "row 5 has label nan in shards built from a labelled file", ["all", "nad"]),
    "dtype": (lambda block: block | {"y": block["y"].astype(np.float64)}, "y: dtype '<f8', expected '<f4'",
              ["all", "nad"]),
    "n_in_nad_row": (_in_a_nad_row(4), "a row flagged NAD-eligible holds an N", ["nad"]),
    "long_nad_row": (_nad_row_of(111), "a row flagged NAD-eligible is 111 bp, not 110", ["nad"]),
    "short_nad_row": (_nad_row_of(109), "a row flagged NAD-eligible is 109 bp, not 110", ["nad"]),
}


@pytest.mark.parametrize("case", list(SCHEMA_CASES))
def test_arrays_outside_the_schema_are_named_by_the_loader_and_verify(work: Path, case: str, capsys) -> None:
    change, problem, views = SCHEMA_CASES[case]
    path = rewrite_shard(work, change)
    offset = load_manifest(work)["splits"]["train"]["shards"][SHARD]["blocks"][BLOCK][0]
    where = f"{path}: block {BLOCK} at byte {offset}: "
    for view in views:
        message = loader_error(work, BOTH_VIEWS[view])
        assert message.startswith(where) and problem in message, (view, message)
    report = verify_report(work, capsys)
    assert where in report and problem in report, report


def test_a_nad_row_count_the_block_does_not_hold_is_named_by_the_nad_view_and_verify(work: Path, capsys) -> None:
    # The count the NAD view's epoch plan rests on, raised by one in a manifest whose checksums all still match.
    manifest = json.loads((work / MANIFEST).read_text())
    entry = manifest["splits"]["train"]["shards"][SHARD]["blocks"][BLOCK]
    held = entry[3]  # BlockIndex field order: offset, nbytes, rows, rows_nad, ...
    entry[3] = held + 1
    (work / MANIFEST).write_text(json.dumps(manifest))
    path, offset = target(work)
    message = loader_error(work, NAD_ROWS)
    assert message == f"{path}: block {BLOCK} at byte {offset}: {held} NAD-eligible rows; the manifest says {held + 1}"
    report = verify_report(work, capsys)
    assert f"block {BLOCK} at byte {offset}: {held} NAD-eligible" in report and f"says {held + 1} and" in report


def test_a_block_longer_than_its_index_says_is_named_by_the_views_that_lay_it_out(work: Path, capsys) -> None:
    # The longest row sets the width other views lay rows out at; the NAD view checks its own rows' lengths instead.
    manifest = json.loads((work / MANIFEST).read_text())
    entry = manifest["splits"]["train"]["shards"][SHARD]["blocks"][BLOCK]
    longest = entry[5]  # BlockIndex field order: offset, nbytes, rows, rows_nad, rows_top, max_length, checksum
    entry[5] = longest - 1
    (work / MANIFEST).write_text(json.dumps(manifest))
    path, offset = target(work)
    message = loader_error(work, ALL_ROWS)
    assert message == f"{path}: block {BLOCK} at byte {offset}: longest row is {longest} bp; the manifest says " \
                      f"{longest - 1}"
    assert sum(len(batch["y"]) for batch in ShardLoader(work, NAD_ROWS, rank=0, world_size=1)) > 0
    report = verify_report(work, capsys)
    assert f"block {BLOCK} at byte {offset}: longest row is {longest} bp" in report


# --------------------------------------------------------------------------- manifests of the wrong shape


def _shard(manifest: dict, i: int = 3) -> dict:
    return manifest["splits"]["train"]["shards"][i]


MANIFEST_CASES = {
    "a_list": (lambda m: [m], "top level: expected an object, got a list"),
    "missing_splits": (lambda m: {k: v for k, v in m.items() if k != "splits"}, "splits: missing"),
    "splits_a_list": (lambda m: m | {"splits": [m["splits"]["train"]]}, "splits: expected an object, got a list"),
    "rows_a_string": (lambda m: m | {"rows": "6370"}, "rows: expected an integer, got a string"),
    "negative_count": (lambda m: (m["splits"]["val"].update(rows=-1), m)[1], "splits.val.rows: negative count -1"),
    "missing_sha256": (lambda m: (_shard(m).pop("sha256"), m)[1], "splits.train.shards[3].sha256: missing"),
    "bytes_a_float": (lambda m: (_shard(m).update(bytes=1.5), m)[1],
                      "splits.train.shards[3].bytes: expected an integer, got a number"),
    "parent_path": (lambda m: (_shard(m).update(file="../x.tar"), m)[1],
                    "splits.train.shards[3].file: must be a plain file name inside the shard folder, not '../x.tar'"),
    "absolute_path": (lambda m: (_shard(m).update(file="/etc/passwd"), m)[1],
                      "splits.train.shards[3].file: must be a plain file name inside the shard folder"),
    "nul_in_name": (lambda m: (_shard(m).update(file="x\0.tar"), m)[1],
                    "splits.train.shards[3].file: must be a plain file name inside the shard folder"),
    "blocks_an_object": (lambda m: (_shard(m).update(blocks={}), m)[1],
                         "splits.train.shards[3].blocks: expected a list, got an object"),
    "old_format": (lambda m: m | {"format_version": 1}, "format_version 1: shards without block checksums; rebuild"),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_a_manifest_of_the_wrong_shape_is_one_line_naming_the_field(work: Path, case: str, capsys) -> None:
    change, problem = MANIFEST_CASES[case]
    manifest_path = work / MANIFEST
    manifest_path.write_text(json.dumps(change(json.loads(manifest_path.read_text()))))
    for command in (["shards", "info", str(work)], ["shards", "verify", str(work)]):
        assert main(command) == 2
        one_error_line(capsys, f"{manifest_path}: {problem}")
    with pytest.raises(UserError, match="^" + re.escape(f"{manifest_path}: {problem}")):
        ShardLoader(work, ALL_ROWS, rank=0, world_size=1)


def test_json_nested_too_deeply_is_one_line(work: Path, capsys) -> None:
    (work / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    assert main(["shards", "info", str(work)]) == 2
    one_error_line(capsys, f"{work / MANIFEST}: not valid JSON")


def test_a_fifo_as_manifest_or_shard_does_not_hang(work: Path, capsys) -> None:
    manifest_path = work / MANIFEST
    saved = manifest_path.read_bytes()
    manifest_path.unlink()
    os.mkfifo(manifest_path)
    assert main(["shards", "info", str(work)]) == 2
    one_error_line(capsys, f"{manifest_path}: a FIFO (named pipe), not a regular file")
    manifest_path.unlink()
    manifest_path.write_bytes(saved)
    path, _ = target(work)
    path.unlink()
    os.mkfifo(path)
    assert f"{path}: a FIFO (named pipe), not a regular file" in loader_error(work)


# --------------------------------------------------------------------------- only our files are touched


def test_overwrite_replaces_our_shards_and_leaves_other_files(built: Path, tmp_path: Path, capsys) -> None:
    out = Path(shutil.copytree(built, tmp_path / "shards"))
    old_shards = {p.name for p in out.glob("*-*.tar")}
    foreign = {"notes.tar": b"someone's archive", "x.tmp-999": b"someone's temporary",
               "val-000000.tar.bak": b"a user's backup"}
    for name, content in foreign.items():
        (out / name).write_bytes(content)
    other = tmp_path / "other.txt"
    other.write_text("\n".join(DEMO_TRAIN.read_text().splitlines()[:1000]) + "\n")
    assert main(["shards", "build", str(other), "--out", str(out), "--no-progress", *SMALL]) == 2
    one_error_line(capsys, f"{out}: holds shards from another source or other options")
    assert all((out / name).exists() for name in [*foreign, *old_shards])

    ours = ["train-000003.tar.tmp-4242-0123456789abcdef", "manifest.json.tmp-4242"]  # a killed build's, new and old
    for name in ours:
        (out / name).write_bytes(b"partial")
    assert main(["shards", "build", str(other), "--out", str(out), "--overwrite", "--no-progress", *SMALL]) == 0
    manifest = load_manifest(out)
    new_shards = {s["file"] for info in manifest["splits"].values() for s in info["shards"]}
    assert manifest["rows"] == 1000 and len(new_shards) < len(old_shards)
    assert {p.name for p in out.glob("*.tar")} == new_shards | {"notes.tar"}
    assert all((out / name).read_bytes() == content for name, content in foreign.items())
    assert not any((out / name).exists() for name in ours)
    assert main(["shards", "verify", str(out)]) == 0


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_that_is_not_ours_is_refused_before_anything_is_removed(tmp_path: Path, overwrite: bool,
                                                                         capsys) -> None:
    out = tmp_path / "theirs"
    out.mkdir()
    files = {"notes.tar": b"x", "train-000000.tar": b"their shard", "train-000000.tar.tmp-17": b"their temporary",
             "x.tmp-999": b"y"}
    for name, content in files.items():
        (out / name).write_bytes(content)
    command = ["shards", "build", str(DEMO_TRAIN), "--out", str(out), "--no-progress", *SMALL]
    assert main(command + (["--overwrite"] if overwrite else [])) == 2
    one_error_line(capsys, f"{out}: holds files", "but no manifest.json or build-state.jsonl")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files


def test_a_folder_holding_only_subfolders_is_built_into_and_they_are_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "shards"
    (out / "slurm" / "1234").mkdir(parents=True)  # where ``submit shards`` keeps its job files
    (out / "slurm" / "1234" / "log.out").write_text("job log\n")
    assert main(["shards", "build", str(DEMO_TRAIN), "--out", str(out), "--no-progress", *SMALL]) == 0
    assert (out / "slurm" / "1234" / "log.out").read_text() == "job log\n" and load_manifest(out)["rows"] == 6370


def test_a_foreign_manifest_is_not_taken_for_ours(tmp_path: Path, capsys) -> None:
    out = tmp_path / "theirs"
    out.mkdir()
    (out / MANIFEST).write_text(json.dumps({"format": "another-tool", "files": ["data.tar"]}))
    (out / "data.tar").write_bytes(b"theirs")
    assert main(["shards", "build", str(DEMO_TRAIN), "--out", str(out), "--overwrite", "--no-progress"]) == 2
    one_error_line(capsys, f"{out / MANIFEST}: not a promoter-dist shard manifest", "choose another --out")
    assert (out / "data.tar").read_bytes() == b"theirs" and (out / MANIFEST).exists()
