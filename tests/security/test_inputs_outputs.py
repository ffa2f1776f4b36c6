"""Inputs that are not files, outputs that cannot be written, atomic writes that cannot be hijacked.

Through the real commands: a character device (``/dev/zero``, which never ends), a FIFO (whose
open or read would block forever) and a socket as an input of every command that reads one,
refused at once with one line naming the path; output paths that are files, folders or FIFOs
refused before any work with one line naming the path and the option. ``atomic_open`` is given
symlinks and other processes' temporaries at the names it could use.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
from pathlib import Path

import pytest

from promoter_dist import io as pd_io
from promoter_dist.cli import main
from promoter_dist.config import read_yaml
from promoter_dist.errors import ConfigError
from promoter_dist.io import atomic_open, write_json_atomic
from tests.conftest import DEMO_TRAIN, REPO, TEST_LABELLED
from tests.security.messages import one_error_line

pytestmark = pytest.mark.timeout(30)

PUBLIC = REPO / "data" / "dream2022" / "public_leaderboard"
TEST_SUBSETS = REPO / "data" / "dream2022" / "test_subsets"
SUBMISSION = PUBLIC / "sample_submission.json"
KIND_OF = {"char_device": "a character device", "fifo": "a FIFO (named pipe)", "socket": "a socket"}


@pytest.fixture(params=["char_device", "fifo"])
def not_a_file(request, tmp_path) -> tuple[Path, str]:
    """A path that is not a regular file, and what it is in words."""
    if request.param == "char_device":
        return Path("/dev/zero"), KIND_OF["char_device"]
    fifo = tmp_path / "input.fifo"
    os.mkfifo(fifo)
    return fifo, KIND_OF["fifo"]


def commands_reading(path: Path, tmp_path: Path) -> dict[str, list[str]]:
    """Each command with ``path`` as the input it reads (every other argument valid or never reached)."""
    return {
        "check": ["check", str(path)],
        "shards_build": ["shards", "build", str(path), "--out", str(tmp_path / "shards"), "--no-progress"],
        # no run folder: the input is checked before the model is looked for
        "predict_input": ["predict", "--checkpoint", str(tmp_path / "no_run"), "--input", str(path),
                          "--out", str(tmp_path / "sub.json"), "--no-progress"],
        "score_predictions": ["score", "--predictions", str(path), "--truth-dir", str(PUBLIC)],
        "score_test_file": ["score", "--predictions", str(SUBMISSION), "--test-file", str(path),
                            "--subsets-dir", str(TEST_SUBSETS)],
    }


# --------------------------------------------------------------------------- inputs


@pytest.mark.parametrize("command", ["check", "shards_build", "predict_input", "score_predictions", "score_test_file"])
def test_a_device_or_fifo_input_is_refused_at_once(command, not_a_file, tmp_path, capsys):
    path, kind = not_a_file
    assert main(commands_reading(path, tmp_path)[command]) == 2
    assert one_error_line(capsys) == f"promoter-dist: error: {path}: {kind}, not a regular file"
    assert not (tmp_path / "sub.json").exists() and not (tmp_path / "shards" / "manifest.json").exists()


def test_a_socket_input_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a short relative name: socket paths are limited to about 100 bytes
    with socket.socket(socket.AF_UNIX) as server:
        server.bind("input.sock")
        assert main(["check", "input.sock"]) == 2
    assert one_error_line(capsys) == "promoter-dist: error: input.sock: a socket, not a regular file"


@pytest.mark.parametrize("command", ["check", "shards_build", "predict_input", "score_predictions"])
def test_a_directory_input_is_refused(command, tmp_path, capsys):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    assert main(commands_reading(folder, tmp_path)[command]) == 2
    one_error_line(capsys, f"{folder}: is a directory, expected ")


def test_a_symlink_to_a_device_is_refused_and_to_a_file_is_read(tmp_path, capsys):
    link = tmp_path / "train.txt"
    link.symlink_to("/dev/zero")
    assert main(["check", str(link), "--no-progress"]) == 2
    assert one_error_line(capsys) == f"promoter-dist: error: {link}: a character device, not a regular file"
    link.unlink()
    link.symlink_to(DEMO_TRAIN)
    assert main(["check", str(link), "--no-progress"]) == 0


def test_a_fifo_among_the_truth_files_is_refused_not_skipped(tmp_path, capsys):
    truth = tmp_path / "public"
    shutil.copytree(PUBLIC, truth)
    (truth / "high_exp_indices.json").unlink()
    os.mkfifo(truth / "high_exp_indices.json")  # missing would be a note; a FIFO is an error
    assert main(["score", "--predictions", str(SUBMISSION), "--truth-dir", str(truth)]) == 2
    one_error_line(capsys, f"{truth / 'high_exp_indices.json'}: a FIFO (named pipe), not a regular file")
    (truth / "high_exp_indices.json").unlink()
    (truth / "ground.json").unlink()
    os.mkfifo(truth / "ground.json")
    assert main(["score", "--predictions", str(SUBMISSION), "--truth-dir", str(truth)]) == 2
    one_error_line(capsys, f"{truth / 'ground.json'}: a FIFO (named pipe), not a regular file")


def test_a_fifo_among_the_test_subset_csvs_is_refused(tmp_path, capsys):
    subsets = tmp_path / "test_subsets"
    shutil.copytree(TEST_SUBSETS, subsets)
    victim = min(subsets.glob("*.csv"))
    victim.unlink()
    os.mkfifo(victim)
    assert main(["score", "--predictions", str(SUBMISSION), "--test-file", str(TEST_LABELLED),
                 "--subsets-dir", str(subsets)]) == 2
    one_error_line(capsys, f"{victim}: a FIFO (named pipe), not a regular file")


def test_a_device_or_fifo_config_is_a_config_error(not_a_file):
    path, kind = not_a_file
    with pytest.raises(ConfigError) as caught:
        read_yaml(path)
    assert str(caught.value) == f"{path}: {kind}, not a regular file"


# --------------------------------------------------------------------------- outputs


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "afile"
    path.write_text("mine\n")
    return path


def commands_writing(out: Path, tmp_path: Path) -> dict[str, tuple[str, list[str]]]:
    """Each command with ``out`` as what it writes: (its option, argv)."""
    return {
        "shards_build": ("--out", ["shards", "build", str(DEMO_TRAIN), "--out", str(out), "--no-progress"]),
        "glove": ("--out", ["glove", str(tmp_path / "no_shards"), "--out", str(out), "--no-progress"]),
        "demo": ("--out", ["demo", "--out", str(out), "--rows", "100", "--procs", "0", "--no-progress"]),
        "synth": ("--out", ["synth", "--rows", "10", "--workers", "1", "--out", str(out), "--no-progress"]),
        "predict": ("--out", ["predict", "--checkpoint", str(tmp_path / "no_run"), "--input", str(TEST_LABELLED),
                              "--out", str(out), "--no-progress"]),
        "export": ("--out", ["export", "--checkpoint", str(tmp_path / "no_run"), "--out", str(out)]),
        "score_json": ("--json", ["score", "--predictions", str(SUBMISSION), "--truth-dir", str(PUBLIC),
                                  "--json", str(out)]),
        "score_plot": ("--plot", ["score", "--predictions", str(SUBMISSION), "--truth-dir", str(PUBLIC),
                                  "--plot", str(out)]),
    }


FOLDER_WRITERS = ["shards_build", "glove", "demo"]
FILE_WRITERS = ["synth", "predict", "export", "score_json", "score_plot"]


@pytest.mark.parametrize("command", FOLDER_WRITERS)
def test_an_output_folder_that_is_a_file_is_refused(command, a_file, tmp_path, capsys):
    option, argv = commands_writing(a_file, tmp_path)[command]
    assert main(argv) == 2
    assert one_error_line(capsys) == (f"promoter-dist: error: {a_file}: cannot write to the {option} folder "
                                      f"({a_file} is a file, not a folder)")
    assert a_file.read_text() == "mine\n"


@pytest.mark.parametrize("command", FOLDER_WRITERS + FILE_WRITERS)
def test_an_output_under_a_file_is_refused(command, a_file, tmp_path, capsys):
    out = a_file / "inside" / "out.json"
    option, argv = commands_writing(out, tmp_path)[command]
    assert main(argv) == 2
    what = "folder" if command in FOLDER_WRITERS else "file"
    one_error_line(capsys, f"{out}: cannot write ", f"the {option} {what} ({a_file} is a file, not a folder)")
    assert a_file.read_text() == "mine\n"


@pytest.mark.parametrize("command", FILE_WRITERS)
def test_an_output_file_that_is_a_folder_or_fifo_is_refused(command, tmp_path, capsys):
    folder = tmp_path / "taken"
    folder.mkdir()
    option, argv = commands_writing(folder, tmp_path)[command]
    assert main(argv) == 2
    assert one_error_line(capsys) == f"promoter-dist: error: {folder}: cannot write the {option} file (it is a folder)"
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    option, argv = commands_writing(fifo, tmp_path)[command]
    assert main(argv) == 2
    assert one_error_line(capsys) == (f"promoter-dist: error: {fifo}: cannot write the {option} file "
                                      f"(it is a FIFO (named pipe))")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # not replaced


# --------------------------------------------------------------------------- atomic_open


def forced_names(monkeypatch, *names: Path) -> list[Path]:
    """Make atomic_open's temporary names ``names`` (in turn), as if an attacker had predicted them."""
    queue = list(names)
    monkeypatch.setattr(pd_io, "_temporary_name", lambda path: queue.pop(0))
    return queue


def test_temporary_names_are_unpredictable_and_known_to_the_cleanup(tmp_path, monkeypatch):
    seen: list[Path] = []
    real = pd_io._temporary_name
    monkeypatch.setattr(pd_io, "_temporary_name", lambda path: seen.append(real(path)) or seen[-1])
    for _ in range(3):
        write_json_atomic(tmp_path / "out.json", {"a": 1})
    assert len(set(seen)) == 3
    for name in seen:
        assert name.parent == tmp_path and name.name.startswith(f"out.json.tmp-{os.getpid()}-")
        assert len(name.name) >= len(f"out.json.tmp-{os.getpid()}-") + 16  # 64 random bits
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


@pytest.mark.parametrize("dangling", [False, True], ids=["to_a_file", "dangling"])
def test_a_symlink_at_the_temporary_name_is_not_followed(tmp_path, monkeypatch, dangling):
    victim = tmp_path / "victim.txt"
    if not dangling:  # a dangling link is the worse one: following it would create the victim
        victim.write_text("precious\n")
    folder = tmp_path / "shared"
    folder.mkdir()
    planted = folder / "out.json.tmp-planted"
    planted.symlink_to(victim)
    forced_names(monkeypatch, planted)
    with pytest.raises(FileExistsError), atomic_open(folder / "out.json", "w") as handle:
        handle.write("overwritten\n")
    assert (not victim.exists()) if dangling else victim.read_text() == "precious\n"
    assert planted.is_symlink() and os.readlink(planted) == str(victim)  # not removed either
    assert not (folder / "out.json").exists()


def test_symlinks_at_every_predictable_name_are_left_alone(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    folder = tmp_path / "shared"
    folder.mkdir()
    # The name the temporary had before (pid only) and the target name itself.
    (folder / f"out.json.tmp-{os.getpid()}").symlink_to(victim)
    (folder / "out.json").symlink_to(victim)
    write_json_atomic(folder / "out.json", {"mine": True})
    assert victim.read_text() == "precious\n"
    assert not (folder / "out.json").is_symlink() and '"mine": true' in (folder / "out.json").read_text()
    assert (folder / f"out.json.tmp-{os.getpid()}").is_symlink()


def test_another_process_temporary_is_neither_written_nor_removed(tmp_path, monkeypatch):
    theirs = tmp_path / "out.json.tmp-424242-00112233aabbccdd"
    theirs.write_text("half of another writer's file\n")
    write_json_atomic(tmp_path / "out.json", {"a": 1})  # its own name: theirs is untouched
    assert theirs.read_text() == "half of another writer's file\n"
    forced_names(monkeypatch, theirs)  # even at the very same name
    with pytest.raises(FileExistsError), atomic_open(tmp_path / "out.json", "wb") as handle:
        handle.write(b"x")
    assert theirs.read_text() == "half of another writer's file\n"
    assert (tmp_path / "out.json").read_text() == '{\n "a": 1\n}\n'


def test_a_failed_write_leaves_the_target_and_no_temporary(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_open(target, "wb") as handle:
        handle.write(b"new, half")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
