"""Hostile files for the security tests: pickles that would create a marker file when unpickled.

Unpickling a payload calls ``open(marker, "w")``, which creates the marker: a test asserts the
marker does not exist afterwards, so it fails if any code path unpickled the file.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch


class MarkerPayload:
    """An object whose unpickling creates ``marker`` (and nothing else)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def torch_payload(path: Path, marker: Path, wrap: Any = None) -> Path:
    """A ``torch.save`` zip file holding the payload (inside ``wrap(payload)`` when given, e.g. a dict)."""
    payload = MarkerPayload(marker)
    torch.save(wrap(payload) if wrap is not None else payload, path)
    return path


def plain_pickle_payload(path: Path, marker: Path) -> Path:
    """A bare pickle file holding the payload (what gensim's ``.kv`` files and legacy torch files are)."""
    path.write_bytes(pickle.dumps(MarkerPayload(marker)))
    return path
