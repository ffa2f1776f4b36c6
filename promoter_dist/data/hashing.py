"""A 64-bit hash of each sequence, vectorised: the key of deterministic splits."""

from __future__ import annotations

import numpy as np

from .alphabet import PAD


def mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads every input bit over the output."""
    with np.errstate(over="ignore"):
        h = h ^ (h >> np.uint64(30))
        h = h * np.uint64(0xBF58476D1CE4E5B9)
        h = h ^ (h >> np.uint64(27))
        h = h * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))


def sequence_hash(codes: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """uint64 hash of each row's bases (rows PAD-padded; independent of the padding width).

    Eight bases are read as one 64-bit word; words wholly beyond a row's length are
    skipped and bytes beyond it are PAD whatever the array width, so the same
    sequence hashes the same in any chunk or file.
    """
    n, width = codes.shape
    words = -(-max(width, 1) // 8)
    if width % 8:
        padded = np.full((n, words * 8), PAD, dtype=np.uint8)
        padded[:, :width] = codes
    else:
        padded = np.ascontiguousarray(codes, dtype=np.uint8)
    packed = padded.view("<u8")
    lengths = lengths.astype(np.int64)
    h = mix64(lengths.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15))
    for g in range(words):
        live = 8 * g < lengths
        h = np.where(live, mix64(h ^ packed[:, g]), h)
    return h
