"""What the run-level benchmarks (``gpu_check.py``, ``models.py``) read back from a run folder.

Only the standard library: the GPU check's parent process imports it before anything is installed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path


class RunRecordMissing(RuntimeError):
    """A figure the run should have written is not in its folder; the message names the file."""


def read_metrics(path: Path) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    if not path.exists():
        raise RunRecordMissing(f"{path} missing")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trainable_parameters(run_dir: Path) -> int:
    """The trainable parameter count the trainer logged on rank 0."""
    log = run_dir / "logs" / "rank0.log"
    match = re.search(r"([\d,]+) trainable parameters", log.read_text(errors="replace") if log.exists() else "")
    if match is None:
        raise RunRecordMissing(f"no 'N trainable parameters' line in {log}")
    return int(match.group(1).replace(",", ""))
