"""The ``promoter-dist`` command on bad input: one clear line, a status, never a traceback."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "dream2022" / "samples"
SEQ = "TGCATTTTTTTCACATC" + "ACGTTGCAAGCTTAGCCATG" * 4 + "GGTTACGGCTGTT"
CONSOLE_SCRIPT = shutil.which("promoter-dist", path=str(Path(sys.executable).parent)) or shutil.which("promoter-dist")


def run_cli(*args: str | Path, cwd: Path | None = None, script: bool = False) -> subprocess.CompletedProcess:
    """Run the command as a user would: the console script or ``python -m promoter_dist.cli``."""
    if script:
        if CONSOLE_SCRIPT is None:
            pytest.skip("promoter-dist console script not installed")
        command = [CONSOLE_SCRIPT]
    else:
        command = [sys.executable, "-m", "promoter_dist.cli"]
    return subprocess.run(
        command + [str(a) for a in args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def output(done: subprocess.CompletedProcess) -> str:
    return done.stdout + done.stderr


def assert_no_traceback(done: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in output(done), output(done)


def assert_user_error(done: subprocess.CompletedProcess, *expected: str) -> None:
    """Exit 2 with one ``promoter-dist: error:`` line naming what is expected."""
    assert_no_traceback(done)
    assert done.returncode == 2, output(done)
    assert "promoter-dist: error: " in done.stderr, output(done)
    for text in expected:
        assert text in done.stderr, (text, output(done))


def write(tmp_path: Path, name: str, lines: list[str], final_eol: bool = True) -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + ("\n" if final_eol else ""))
    return path


def good_rows(n: int, start: int = 1) -> list[str]:
    return [f"{SEQ}\t{i}" for i in range(start, start + n)]


# --------------------------------------------------------------------------- check


@pytest.mark.parametrize("script", [True, False], ids=["console_script", "python_m"])
def test_check_mostly_bad_file(tmp_path, script):
    path = write(tmp_path, "bad.txt", good_rows(2) + [f"{SEQ}\tabc", f"{SEQ}\t12,5"])
    done = run_cli("check", path, "--no-progress", script=script)
    assert_user_error(done, f"{path}: 2 of 4 rows are bad", f"{path}:3 [expression]", f"{path}:4 [expression]")
    assert "bad_label: 2" in done.stderr


def test_check_with_some_rejected_rows_exits_1(tmp_path):
    lines = good_rows(40) + [f"{SEQ[:20]}R{SEQ[21:]}\t41"] + good_rows(9, start=42)
    path = write(tmp_path, "some_bad.txt", lines)
    done = run_cli("check", path, "--no-progress")
    assert_no_traceback(done)
    assert done.returncode == 1, output(done)
    assert f"{path}: 50 rows read, 49 ok, 1 rejected" in done.stdout
    assert "invalid_base: 1" in done.stdout
    assert f"{path}:41 [sequence]: invalid base 'R' at position 21" in done.stdout


@pytest.mark.parametrize(
    "bad, field, why",
    [
        (f"{SEQ}\t1\t2", "row", "expected 2 tab-separated fields"),
        (f"{SEQ} 7", "expression", "no expression value"),
        (f"{SEQ}\tNaN", "expression", "is not finite"),
        (f"{SEQ}\t1e999", "expression", "is not finite"),
        (f"{SEQ[:30]}\x00{SEQ[31:]}\t3", "sequence", "invalid base byte 0x00 at position 31"),
        ("\t5", "sequence", "empty sequence"),
        ("", "row", "empty line"),
    ],
    ids=["three_fields", "space_for_tab", "nan", "overflow", "nul_byte", "empty_sequence", "blank_line"],
)
def test_check_strict_names_file_line_and_field(tmp_path, bad, field, why):
    path = write(tmp_path, "strict.txt", good_rows(30) + [bad] + good_rows(5, start=32))
    done = run_cli("check", path, "--no-progress", "--strict")
    assert_user_error(done, f"promoter-dist: error: {path}:31 [{field}]: ", why)


def test_check_strict_first_bad_row_in_a_later_chunk(tmp_path):
    # 20,000 rows are several parse chunks; the first bad row sits far into the file.
    lines = good_rows(20000)
    lines[17000] = f"{SEQ}\tx"
    lines[18000] = "ACGT"
    path = write(tmp_path, "big.txt", lines)
    done = run_cli("check", path, "--no-progress", "--strict", "--workers", "2")
    assert_user_error(done, f"{path}:17001 [expression]: expression is not a number: 'x'")


@pytest.mark.parametrize("progress", [True, False], ids=["progress_bar", "no_progress"])
@pytest.mark.parametrize("script", [True, False], ids=["console_script", "python_m"])
def test_check_missing_file(tmp_path, progress, script):
    missing = tmp_path / "train_sequences.txt"
    done = run_cli("check", missing, *([] if progress else ["--no-progress"]), script=script)
    assert_user_error(done, f"{missing}: no such file")


def test_check_directory(tmp_path):
    done = run_cli("check", tmp_path)
    assert_user_error(done, f"{tmp_path}: is a directory")


def test_check_empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    done = run_cli("check", path, "--no-progress")
    assert_user_error(done, f"{path}: the file is empty")


@pytest.mark.parametrize("workers", ["0", "2"])
def test_check_truncated_gzip(tmp_path, workers):
    packed = gzip.compress((SAMPLES / "train_first1000.txt").read_bytes())
    path = tmp_path / "train.txt.gz"
    path.write_bytes(packed[: len(packed) // 2])
    done = run_cli("check", path, "--no-progress", "--workers", workers)
    assert_user_error(done, f"{path}: truncated gzip stream")


def test_check_corrupt_gzip(tmp_path):
    path = tmp_path / "train.txt.gz"
    path.write_bytes(gzip.compress(b"ACGT\t1\n" * 100)[:10] + bytes(range(256)) * 8)
    done = run_cli("check", path, "--no-progress")
    assert_user_error(done, f"{path}: corrupt gzip data")


def test_check_binary_file(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"\x7fELF\x02\x01\x01\x00\t\x00\n" + bytes(range(256)) * 40)
    done = run_cli("check", path, "--no-progress")
    assert_user_error(done, f"{path}:1 [sequence]: invalid base byte 0x7f")


def test_check_test_file_needs_optional_labels(tmp_path):
    path = write(tmp_path, "test_sequences.txt", [SEQ] * 20)
    done = run_cli("check", path, "--no-progress")
    assert_user_error(done, f"{path}:1 [expression]: no expression value", "--labels optional")
    done = run_cli("check", path, "--no-progress", "--labels", "optional")
    assert_no_traceback(done)
    assert done.returncode == 0 and "20 rows read, 20 ok, 0 rejected" in done.stdout


def test_check_real_sample_is_clean():
    done = run_cli("check", SAMPLES / "train_first1000.txt", "--no-progress", script=True)
    assert_no_traceback(done)
    assert done.returncode == 0, output(done)
    assert "1000 rows read, 1000 ok, 0 rejected" in done.stdout and "1000 valid rows" in done.stdout


@pytest.mark.parametrize(
    "option, message",
    [(["--max-length", "0"], "max_length must be >= 1"), (["--max-bad-fraction", "2"], "max_bad_fraction must be in [0, 1]")],
)
def test_check_bad_option_values(tmp_path, option, message):
    path = write(tmp_path, "ok.txt", good_rows(3))
    done = run_cli("check", path, "--no-progress", *option)
    assert_user_error(done, message)


@pytest.mark.parametrize("args", [["check"], ["check", "x", "--labels", "maybe"], ["shards"], [], ["nonsense"]])
def test_usage_errors_exit_2_without_traceback(args):
    done = run_cli(*args)
    assert_no_traceback(done)
    assert done.returncode == 2 and "usage: promoter-dist" in done.stderr


# --------------------------------------------------------------------------- shards


def test_shards_build_bad_file(tmp_path):
    path = write(tmp_path, "bad.txt", good_rows(3) + [f"{SEQ}\t1.2.3", "ACGT\t2\t3"])
    out = tmp_path / "shards"
    done = run_cli("shards", "build", path, "--out", out, "--no-progress")
    assert_user_error(done, f"{path}: 2 of 5 rows are bad", f"{path}:4 [expression]", f"{path}:5 [row]")
    assert not (out / "manifest.json").exists()


def test_shards_build_strict_names_the_row(tmp_path):
    path = write(tmp_path, "strict.txt", good_rows(60) + [f"{SEQ}Y\t61"] + good_rows(3, start=62))
    out = tmp_path / "shards"
    done = run_cli("shards", "build", path, "--out", out, "--no-progress", "--strict", script=True)
    assert_user_error(done, f"{path}:61 [sequence]: invalid base 'Y' at position {len(SEQ) + 1}")
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize("script", [True, False], ids=["console_script", "python_m"])
def test_shards_build_missing_file(tmp_path, script):
    missing = tmp_path / "nope.txt"
    done = run_cli("shards", "build", missing, "--out", tmp_path / "shards", "--no-progress", script=script)
    assert_user_error(done, f"{missing}: no such file")


def test_shards_build_truncated_gzip(tmp_path):
    packed = gzip.compress((SAMPLES / "demo_train_6370.txt").read_bytes())
    path = tmp_path / "train.txt.gz"
    path.write_bytes(packed[:-100])
    done = run_cli("shards", "build", path, "--out", tmp_path / "shards", "--no-progress")
    assert_user_error(done, f"{path}: truncated gzip stream")


@pytest.mark.parametrize(
    "make_args",
    [
        lambda folder: ["shards", "verify", folder],
        lambda folder: ["shards", "verify", folder, "--quick"],
        lambda folder: ["shards", "info", folder],
        lambda folder: ["glove", folder, "--out", folder.parent / "vectors", "--no-progress"],
    ],
    ids=["verify", "verify_quick", "info", "glove"],
)
def test_shard_folder_without_manifest(tmp_path, make_args):
    folder = tmp_path / "not_shards"
    folder.mkdir()
    (folder / "notes.txt").write_text("nothing here\n")
    done = run_cli(*make_args(folder), cwd=tmp_path)
    assert_user_error(done, f"{folder / 'manifest.json'}: no manifest", "shards build")


def test_shards_verify_missing_folder(tmp_path):
    done = run_cli("shards", "verify", tmp_path / "nowhere", script=True)
    assert_user_error(done, "no manifest")


# --------------------------------------------------------------------------- shard options


SHARD_COMMANDS = [["shards", "build"], ["submit", "shards"]]


@pytest.mark.parametrize("command", SHARD_COMMANDS, ids=" ".join)
def test_shard_commands_default_to_shard_options_defaults(command):
    from promoter_dist.cli import build_parser, shard_options_from_args
    from promoter_dist.data.dream import ReadOptions
    from promoter_dist.data.shards import ShardOptions

    args = build_parser().parse_args([*command, "train.txt"])
    assert shard_options_from_args(args) == ShardOptions()
    assert (args.labels, args.strict, args.max_length, args.max_bad_fraction) == (
        ReadOptions.labels, ReadOptions.strict, ReadOptions.max_length, ReadOptions.max_bad_fraction)


@pytest.mark.parametrize("command", SHARD_COMMANDS, ids=" ".join)
def test_shard_commands_show_the_defaults_in_help(command):
    done = run_cli(*command, "--help")
    assert done.returncode == 0, output(done)
    help_text = " ".join(done.stdout.split())  # argparse wraps lines where the terminal ends
    for shown in ["hash (default: 90/10)", "split hash (default: 1)", "sample (default: 1024)",
                  "tar file (default: 32)", "pretraining (default: 0.2)", "(default: required)", "bp (default: 300)",
                  "bad rows (default: 0.05)"]:
        assert shown in help_text, (shown, done.stdout)


@pytest.mark.parametrize("command", SHARD_COMMANDS, ids=" ".join)
@pytest.mark.parametrize(
    "splits, message",
    [("train=0.5", "splits: fractions must sum to 1, got 0.5"),
     ("train", "--splits: expected name=fraction pairs like train=0.9,val=0.1, got 'train'")],
)
def test_shard_commands_refuse_bad_splits_before_any_work(tmp_path, command, splits, message):
    path = write(tmp_path, "ok.txt", good_rows(3))
    out = tmp_path / "shards"
    done = run_cli(*command, path, "--out", out, "--splits", splits, cwd=tmp_path)
    assert_user_error(done, message)
    assert not out.exists()


# --------------------------------------------------------------------------- help


@pytest.mark.parametrize(
    "command",
    [[], ["synth"], ["check"], ["shards"], ["shards", "build"], ["shards", "verify"], ["shards", "info"], ["glove"], ["demo"]],
    ids=lambda c: " ".join(c) or "top",
)
def test_every_subcommand_answers_help(command):
    done = run_cli(*command, "--help", script=True)
    assert done.returncode == 0, output(done)
    assert_no_traceback(done)
    assert done.stdout.startswith(f"usage: promoter-dist {' '.join(command)}".rstrip())
    assert done.stderr == ""


def test_version():
    done = run_cli("--version")
    assert done.returncode == 0 and done.stdout.startswith("promoter-dist ")
