"""promoter_dist.io: regular-file inputs, output paths checked up front, atomic writes (modes, umask, fsync)."""

from __future__ import annotations

import os
import stat

import pytest

from promoter_dist import io as pd_io
from promoter_dist.errors import ConfigError, UserError
from promoter_dist.io import (atomic_open, check_output_file, check_output_folder, file_kind, fsync_paths, open_input,
                              read_input, require_regular_file, sha256_file, write_json_atomic)


def test_regular_files_and_links_to_them_are_read(tmp_path):
    path = tmp_path / "data.txt"
    path.write_bytes(b"ACGT\t1\n")
    link = tmp_path / "link.txt"
    link.symlink_to(path)
    assert read_input(link, "a DREAM text file") == b"ACGT\t1\n"
    with open_input(path, "a DREAM text file") as handle:
        assert handle.read(4) == b"ACGT"
        assert os.get_blocking(handle.fileno())  # O_NONBLOCK is only for the open
    assert require_regular_file(path, "x").st_size == 7
    assert len(sha256_file(path)) == 64


def test_what_is_refused_and_how_it_is_named(tmp_path):
    with pytest.raises(UserError, match=r"^/dev/null: a character device, not a regular file$"):
        open_input("/dev/null", "a DREAM text file")
    with pytest.raises(UserError) as caught:
        open_input(tmp_path, "a DREAM text file")
    assert str(caught.value) == f"{tmp_path}: is a directory, expected a DREAM text file"
    with pytest.raises(UserError) as caught:
        open_input(tmp_path / "nope.txt", "a DREAM text file")
    assert str(caught.value) == f"{tmp_path / 'nope.txt'}: no such file"
    with pytest.raises(UserError, match="no such file"):
        sha256_file(tmp_path / "nope.txt")
    with pytest.raises(ConfigError, match="is a directory, expected a YAML config"):  # the caller's error type
        read_input(tmp_path, "a YAML config", ConfigError)


def test_file_kinds_in_words(tmp_path):
    os.mkfifo(tmp_path / "f")
    assert file_kind(os.stat(tmp_path / "f").st_mode) == "a FIFO (named pipe)"
    assert file_kind(os.stat("/dev/null").st_mode) == "a character device"
    assert file_kind(os.stat(tmp_path).st_mode) == "a directory"
    assert file_kind(stat.S_IFREG) == "a regular file"


def test_output_checks_create_nothing_and_name_the_obstacle(tmp_path):
    assert check_output_folder(tmp_path / "a" / "b", "--out") == tmp_path / "a" / "b"
    assert check_output_file(tmp_path / "c" / "out.json", "--out") == tmp_path / "c" / "out.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # not even the write check's probe is left
    out = tmp_path / "out.json"
    out.write_text("old")
    assert check_output_file(out, "--out") == out  # an existing file is replaced later, not refused
    with pytest.raises(UserError) as caught:
        check_output_file(out / "y.txt", "--json")
    assert str(caught.value) == f"{out / 'y.txt'}: cannot write the --json file ({out} is a file, not a folder)"
    with pytest.raises(UserError) as caught:
        check_output_folder(out, "--out")
    assert str(caught.value) == f"{out}: cannot write to the --out folder ({out} is a file, not a folder)"
    with pytest.raises(UserError) as caught:
        check_output_file("/dev/null", "--out")
    assert str(caught.value) == "/dev/null: cannot write the --out file (it is a character device)"


def test_an_unwritable_folder_is_named(tmp_path, monkeypatch):
    real_open = os.open

    def read_only(path, flags, *args):  # as a read-only mount answers, whoever runs the test
        if flags & os.O_CREAT:
            raise OSError(30, "Read-only file system")
        return real_open(path, flags, *args)

    monkeypatch.setattr(pd_io.os, "open", read_only)
    with pytest.raises(UserError) as caught:
        check_output_file(tmp_path / "new" / "out.json", "--out")
    assert str(caught.value) == (f"{tmp_path / 'new' / 'out.json'}: cannot write the --out file "
                                 f"(cannot create files in {tmp_path}: Read-only file system)")


def test_atomic_open_text_and_binary_modes_respect_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_open(tmp_path / "t.txt", "w") as handle:
            handle.write("text\n")
        with atomic_open(tmp_path / "b.bin", "wb", fsync=False) as handle:
            handle.write(b"\x00\x01")
    finally:
        os.umask(old)
    assert (tmp_path / "t.txt").read_text() == "text\n" and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert stat.S_IMODE(os.stat(tmp_path / "t.txt").st_mode) == 0o640
    with pytest.raises(ValueError, match="mode"), atomic_open(tmp_path / "a.txt", "a"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "t.txt"]


def test_the_folder_is_fsynced_after_the_rename_unless_fsync_is_off(tmp_path, monkeypatch):
    synced: list[str] = []
    real = pd_io._fsync_folder
    monkeypatch.setattr(pd_io, "_fsync_folder", lambda folder: synced.append(str(folder)) or real(folder))
    write_json_atomic(tmp_path / "a.json", [1])
    assert synced == [str(tmp_path)]
    with atomic_open(tmp_path / "b.bin", "wb", fsync=False) as handle:
        handle.write(b"x")
    assert synced == [str(tmp_path)]
    fsync_paths([tmp_path / "b.bin"])
    assert synced == [str(tmp_path)] * 2
