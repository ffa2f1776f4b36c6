"""LegNet's input encoding: the 150-bp window of a row, one-hot, with is-reverse and is-singleton channels.

Source: the autosome.org team's challenge code (GitHub autosome-ru/dream2022, ``train.py``:
``preprocess_data``, ``Seq2Tensor``, ``add_rev``, ``add_singleton_column``) and Penzar et al.,
Bioinformatics 2023, doi:10.1093/bioinformatics/btad457.

Window
    The row loses its first 17 bases (the 5' adapter), is prefixed with the 150 bp of vector
    upstream of the insert (which end with that adapter), and the last ``length`` bases of
    the result are kept: a 110-bp row becomes 57 bp of vector + its last 93 bases, and a row
    longer than ``length + 17`` bp keeps only its last ``length`` bases. Every row's 3' end
    sits at the window's last position. :func:`window_codes` does this for a batch of
    PAD-padded base codes with one gather.

Model input ``(B, 6, length)`` float (:func:`one_hot`)
    channels 0-3: A, C, G, T one-hot (the codes of ``alphabet``); an N is 0.25 in all four;
    channel 4: is-reverse, 1 when the window was reverse-complemented;
    channel 5: is-singleton, 1 when the row's measured value is an integer (shard flag bit
    0, ``shards.FLAG_INTEGER``), 0 at prediction time.

The loader hands the model's device the window's base codes (uint8, 150 B per row) and the
singleton flag, and :func:`one_hot` expands them there: 24x fewer bytes through DataLoader
workers and the host-to-device copy than float32 one-hot rows, and the reverse complement
(:func:`reverse_complement`) is a flip and a lookup on the same codes.
"""

from __future__ import annotations

import numpy as np
import torch

from .alphabet import ADAPTER_5P, N, PAD, UPSTREAM_150, encode

WINDOW = 150
"""Window length of the published model (bp)."""
CHANNELS = 6
"""A, C, G, T, is-reverse, is-singleton."""
REVERSE_CHANNEL, SINGLETON_CHANNEL = 4, 5
"""Channels of the is-reverse and is-singleton flags (every position holds the row's flag)."""
UPSTREAM_CODES = encode(UPSTREAM_150)
"""Base codes of the vector's 150 bp upstream of the insert (ending with the 5' adapter)."""
COMPLEMENT = np.array([3, 2, 1, 0, N, PAD], dtype=np.uint8)
"""Base code -> code of its complement (A<->T, C<->G; N and PAD stay)."""
BASE_ROWS = np.zeros((PAD + 1, 4), dtype=np.float32)
"""Base code -> its four one-hot values: A C G T one-hot, N 0.25 each; PAD (never in a window) zeros."""
BASE_ROWS[np.arange(4), np.arange(4)] = 1.0
BASE_ROWS[N] = 0.25
for _table in (UPSTREAM_CODES, COMPLEMENT, BASE_ROWS):
    _table.setflags(write=False)  # constants, shared by every caller


def window_codes(codes: np.ndarray, lengths: np.ndarray, length: int = WINDOW) -> np.ndarray:
    """The model windows of a batch: (n, W) PAD-padded codes and their lengths -> (n, length) uint8.

    Vector sequence + the row without its 5' adapter, the last ``length`` bases (module
    docstring). Vectorised: one gather over the rows laid out after the upstream vector.
    """
    codes = np.asarray(codes, dtype=np.uint8)
    lengths = np.asarray(lengths, dtype=np.int64)
    if length < 1 or length > len(UPSTREAM_CODES):
        raise ValueError(f"window length must be in [1, {len(UPSTREAM_CODES)}], got {length}")
    n = codes.shape[0]
    if n == 0:
        return np.zeros((0, length), dtype=np.uint8)
    strip = len(ADAPTER_5P)
    body = codes[:, strip:] if codes.shape[1] > strip else np.zeros((n, 0), np.uint8)
    width = length + body.shape[1]
    extended = np.empty((n, width), dtype=np.uint8)
    extended[:, :length] = UPSTREAM_CODES[len(UPSTREAM_CODES) - length:]
    extended[:, length:] = body
    # The window ends at each row's last base: it starts (row length - adapter) into ``extended``.
    start = np.clip(lengths - strip, 0, body.shape[1]) + np.arange(n, dtype=np.int64) * width
    return np.lib.stride_tricks.sliding_window_view(extended.reshape(-1), length)[start]


def reverse_complement_codes(windows: np.ndarray) -> np.ndarray:
    """Reverse complement of (n, L) base codes, as codes (numpy)."""
    return COMPLEMENT[np.asarray(windows, dtype=np.uint8)[:, ::-1]]


def reverse_complement(windows: torch.Tensor) -> torch.Tensor:
    """Reverse complement of (B, L) integer base codes, on their device (torch)."""
    table = torch.tensor(COMPLEMENT, device=windows.device)
    return table[windows.long().flip(-1)]


def one_hot(windows: torch.Tensor, singleton: torch.Tensor | None, reverse: bool) -> torch.Tensor:
    """Model input (B, 6, L) float32 from (B, L) window codes, on their device (module docstring).

    ``singleton``: (B,) 0/1 per row, or None for all 0 (prediction); ``reverse`` fills the
    is-reverse channel (the codes must already be reverse-complemented for it to mean that).
    """
    table = torch.tensor(BASE_ROWS, device=windows.device)
    bases = table[windows.long()].transpose(1, 2)  # (B, 4, L)
    rows, _, length = bases.shape
    x = torch.cat([bases, bases.new_zeros(rows, CHANNELS - 4, length)], dim=1)
    if reverse:
        x[:, REVERSE_CHANNEL] = 1.0
    if singleton is not None:
        x[:, SINGLETON_CHANNEL] = singleton.to(device=bases.device, dtype=bases.dtype).reshape(rows, 1)
    return x
