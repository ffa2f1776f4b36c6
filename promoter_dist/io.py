"""Files the user names: inputs that are regular files, outputs checked up front, atomic writes.

On a shared filesystem a path may name a device, a FIFO or a socket: reading one would hang
or never end, so every input is checked to be a regular file before it is read. An output
path that cannot be written is refused with one line naming it and its option, before any
work is done. Writes go through :func:`atomic_open`, whose temporary file cannot be
redirected by a symlink another user planted.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import stat
from pathlib import Path
from typing import IO, Any, BinaryIO, Iterator

import xxhash

from .errors import UserError

#: What a file that is not a regular file is, by its ``stat`` mode.
_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
)
#: Marks the temporary files of :func:`atomic_open` (``<name>.tmp-<pid>-<random>``); .gitignore knows it.
TEMP_MARK = ".tmp-"


def file_kind(mode: int) -> str:
    """What a ``stat`` mode describes, in words: "a regular file", "a character device", ..."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((kind for is_kind, kind in _KINDS if is_kind(mode)), "a special file")


# --------------------------------------------------------------------------- inputs


def require_regular_file(path: str | os.PathLike, expected: str,
                         error: type[UserError] = UserError) -> os.stat_result:
    """The ``stat`` of ``path`` (a symlink is followed), refused with ``error`` unless it is a regular file.

    The message names the path: ``no such file``, ``is a directory, expected <expected>`` or
    ``a character device, not a regular file`` (also FIFOs, sockets, block devices).
    """
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise error(f"{path}: no such file") from None
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from None
    _require_regular(path, info.st_mode, expected, error)
    return info


def _require_regular(path: str | os.PathLike, mode: int, expected: str, error: type[UserError]) -> None:
    if stat.S_ISDIR(mode):
        raise error(f"{path}: is a directory, expected {expected}")
    if not stat.S_ISREG(mode):
        raise error(f"{path}: {file_kind(mode)}, not a regular file")


def open_input(path: str | os.PathLike, expected: str, error: type[UserError] = UserError) -> BinaryIO:
    """Open ``path`` for reading bytes, refusing (with ``error``, naming the path) anything but a regular file.

    The path is checked before it is opened (opening some devices acts on them), and the
    opened file again: the open does not block on a FIFO swapped in meanwhile, and what
    was opened is what is read. ``expected`` says what the file should be ("a DREAM text file").
    """
    require_regular_file(path, expected, error)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise error(f"{path}: no such file") from None
    except PermissionError:
        raise error(f"{path}: permission denied") from None
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        _require_regular(path, os.fstat(fd).st_mode, expected, error)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_input(path: str | os.PathLike, expected: str, error: type[UserError] = UserError) -> bytes:
    """All bytes of the regular file ``path`` (see :func:`open_input` for what is refused)."""
    with open_input(path, expected, error) as handle:
        return handle.read()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a regular file's bytes (UserError for a missing file, a device, a FIFO...)."""
    digest = hashlib.sha256()
    with open_input(path, "a regular file") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def xxh3_128_file(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """Hex xxh3-128 of a regular file's bytes (UserError as :func:`sha256_file`).

    The identity of a large input that is hashed on every run: ~10x faster than sha256
    (0.10 s against 1.05 s for an 800 MB file, page cache warm), and collisions of a
    128-bit hash are no concern for telling one file from another. Read into one reused
    buffer (not mapped: a file cut short meanwhile must be an error, not a SIGBUS).
    """
    digest = xxhash.xxh3_128()
    buffer = bytearray(chunk)
    with open_input(path, "a regular file") as handle, memoryview(buffer) as view:
        while size := handle.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


# --------------------------------------------------------------------------- outputs


def _obstacle(folder: Path) -> str | None:
    """Why ``folder`` cannot be a folder: it or a parent of it exists as something else; None if none does."""
    for candidate in (folder, *folder.parents):
        try:
            mode = os.stat(candidate).st_mode
        except (FileNotFoundError, NotADirectoryError):  # the obstacle, if any, is further up
            continue
        except OSError as exc:
            return f"{candidate}: {exc.strerror or exc}"
        if stat.S_ISDIR(mode):
            return None
        kind = "a file" if stat.S_ISREG(mode) else file_kind(mode)
        return f"{candidate} is {kind}, not a folder"
    return None


def _unwritable(folder: Path) -> str | None:
    """Why new files cannot be made in the existing ``folder``; None when they can.

    A file is created and removed to find out: permission bits do not tell (root, ACLs,
    read-only or root-squashed mounts).
    """
    probe = _temporary_name(folder / ".write-check")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    except OSError as exc:
        return f"cannot create files in {folder}: {exc.strerror or exc}"
    probe.unlink()
    return None


def _folder_problem(folder: Path) -> str | None:
    """Why files cannot be written in ``folder`` once it and its missing parents are created; None if they can."""
    why = _obstacle(folder)
    if why is None:
        existing = next((p for p in (folder, *folder.parents) if p.is_dir()), None)
        why = _unwritable(existing) if existing is not None else None
    return why


def check_output_folder(path: str | os.PathLike, option: str) -> Path:
    """Refuse, in one line and before any work, an output folder that could not be created or written.

    Raises UserError ``<path>: cannot write to the <option> folder (<why>)`` when the path
    or a parent is a file (or a device...), or the folder (or the nearest existing parent of
    a missing one) does not let files be created. Nothing is created here.
    """
    path = Path(path)
    why = _folder_problem(path)
    if why is not None:
        raise UserError(f"{path}: cannot write to the {option} folder ({why})")
    return path


def check_output_file(path: str | os.PathLike, option: str) -> Path:
    """Refuse, in one line and before any work, an output file that could not be written.

    Raises UserError ``<path>: cannot write the <option> file (<why>)`` when the path is a
    folder (or a device, a FIFO...), a parent is a file, or its folder (or the nearest existing
    parent of a missing one) does not let files be created. Nothing is created here.
    """
    path = Path(path)
    try:
        mode: int | None = os.stat(path).st_mode
    except OSError:  # not there yet, or not reachable: the folder check says why
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        why: str | None = "it is a folder" if stat.S_ISDIR(mode) else f"it is {file_kind(mode)}"
    else:
        why = _folder_problem(path.parent)
    if why is not None:
        raise UserError(f"{path}: cannot write the {option} file ({why})")
    return path


# --------------------------------------------------------------------------- atomic writes


def _temporary_name(path: Path) -> Path:
    """An unpredictable sibling name for ``path``'s temporary file: ``<name>.tmp-<pid>-<random>``."""
    return path.with_name(f"{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(8)}")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", fsync: bool = True) -> Iterator[IO[Any]]:
    """Write ``path`` through a new temporary file; on success (fsync and) rename it over ``path``.

    ``mode`` is "wb" or "w" (text, the platform's default encoding, as ``open``). The
    temporary ``<name>.tmp-<pid>-<random>`` is created exclusively and never through a
    symlink, so a file or link planted in the folder is neither followed nor overwritten
    (creation fails instead). After the rename the folder is fsynced too, so the new name
    survives a crash. On any exception the temporary file is removed and ``path`` is
    untouched. A caller writing many files may pass ``fsync=False`` and flush them (and
    their folder) together later with :func:`fsync_paths`; a killed process still leaves
    only whole files behind.
    """
    if mode not in ("wb", "w", "wt"):
        raise ValueError(f"atomic_open writes a new file: mode 'wb' or 'w', not {mode!r}")
    path = Path(path)
    tmp = _temporary_name(path)
    # 0o666 as open() uses: the kernel applies the umask.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if fsync:
        _fsync_folder(path.parent)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_open(path, "w") as handle:
        json.dump(obj, handle, indent=1, sort_keys=False)
        handle.write("\n")


def _fsync(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: str | os.PathLike) -> None:
    """fsync a folder so that the names created or renamed in it are durable."""
    try:
        _fsync(folder)
    except OSError as exc:
        # Some filesystems cannot fsync a folder; there the rename is as durable as they make it.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise


def fsync_file(path: str | os.PathLike) -> None:
    """Flush one file's data to disk (not its name: see :func:`fsync_folder`)."""
    _fsync(path)


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make the names created or renamed in ``folder`` durable (where the filesystem can)."""
    _fsync_folder(folder)


def fsync_paths(paths: "list[str | os.PathLike]") -> None:
    """Flush files (and their folders) to disk, e.g. before writing a manifest that vouches for them."""
    for path in paths:
        _fsync(path)
    for folder in {os.path.dirname(os.path.abspath(path)) for path in paths}:
        _fsync_folder(folder)
