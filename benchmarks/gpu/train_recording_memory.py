"""``train.py`` that also writes each rank's peak memory when training returns.

``deepspeed --num_gpus 1 benchmarks/gpu/train_recording_memory.py --config ... [KEY=VALUE ...]``
runs exactly what ``deepspeed --num_gpus 1 train.py --config ...`` runs (the same
``promoter_dist.train.main``), then writes ``{"rank", "device", "peak_bytes", ...}`` to the file
named by the environment variable ``PEAK_MEMORY_FILE`` (``{rank}`` in it becomes the rank). The
trainer does not record memory; this is the smallest hook that measures the real run, validation
and checkpoints included, with no second model in the process.

On a GPU the peak is ``torch.cuda.max_memory_allocated`` (tensors; ``max_memory_reserved`` is
written beside it: what the caching allocator held); on a CPU it is the process's peak resident
set (``ru_maxrss``), which also counts the interpreter and libraries.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

import torch

from promoter_dist.train import main

PEAK_MEMORY_FILE = "PEAK_MEMORY_FILE"
"""Environment variable naming the JSON file to write; ``{rank}`` in it becomes the rank."""


def peak_memory() -> dict[str, object]:
    """This process's peak memory: the GPU allocator's when a GPU was used, else the resident set."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"device": torch.cuda.get_device_name(), "peak_bytes": torch.cuda.max_memory_allocated(),
                "reserved_bytes": torch.cuda.max_memory_reserved(), "measure": "torch.cuda.max_memory_allocated"}
    # Linux reports ru_maxrss in KiB.
    return {"device": "cpu", "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "measure": "ru_maxrss (peak resident set)"}


def write_peak_memory(template: str) -> None:
    """Write :func:`peak_memory` of this rank to ``template`` with ``{rank}`` filled in."""
    rank = os.environ.get("RANK", "0")
    path = Path(template.replace("{rank}", rank))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rank": int(rank), **peak_memory()}) + "\n")


if __name__ == "__main__":
    status = main()
    if os.environ.get(PEAK_MEMORY_FILE):
        write_peak_memory(os.environ[PEAK_MEMORY_FILE])
    sys.exit(status)
