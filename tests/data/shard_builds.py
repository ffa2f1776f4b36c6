"""What the shard-build tests share: a larger source, folder digests, and a build killed and rerun."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from promoter_dist.data.shards import MANIFEST
from tests.conftest import DEMO_TRAIN


def big_source(tmp_path: Path, copies: int) -> Path:
    """The demo rows repeated with a mutated base per copy, so each copy is new sequence."""
    lines = DEMO_TRAIN.read_text().splitlines()
    out = tmp_path / "big.txt"
    with open(out, "w") as handle:
        for c in range(copies):
            base = "ACGT"[c % 4]
            for i, line in enumerate(lines):
                seq, y = line.split("\t")
                pos = 17 + (c * 7 + i) % 80
                handle.write(f"{seq[:pos]}{base}{seq[pos + 1:]}\t{y}\n")
    return out


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file of ``folder``, by name."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def kill_builds(source: Path, out: Path, options: str, kill_at: tuple[int, ...], workers: int = 2) -> int:
    """Start ``build_shards(source, out, <options>)`` in a fresh process and SIGKILL it once ``kill_at[i]``
    shards exist, for each i (until a build finishes); returns how many builds were killed.

    ``options``: the ``ShardOptions(...)`` expression the child process builds.
    """
    code = (f"from promoter_dist.data.shards import ShardOptions, build_shards; "
            f"build_shards({str(source)!r}, {str(out)!r}, {options}, workers={workers}, progress=False)")
    kills = 0
    for wanted in kill_at:
        proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if len(list(out.glob("*.tar"))) >= wanted:
                break
            time.sleep(0.005)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        if (out / MANIFEST).exists():
            break
    return kills
