"""Synthetic DREAM-format training data with a planted, known expression function.

:func:`synthesize` writes rows in the exact ``train_sequences.txt`` format
(``SEQUENCE<TAB>EXPRESSION\\n``, no header): a 17-bp 5' adapter, a random region
of varying length and a 13-bp 3' adapter, with the real data's length mix, base
composition, rare ``N`` blocks and label style (about 58% integer "singletons",
the rest non-integer averages printed with 15 significant digits).

Each label is a noisy measurement of :func:`expression_model`, a pure function of
the sequence built from yeast-like motifs scanned in the sequence itself, with
position, orientation, saturating copy number, pairwise interactions, a mild GC
effect and a saturating output. Because the noise-free value of every row is
written beside the data (``<stem>.noise_free.txt``), a trained model can be judged
against the oracle: Pearson(noise-free, labels) is the best any model can reach.

Output is byte-identical for the same ``(rows, seed, kind)`` whatever the number
of workers: rows are made in fixed-size chunks, chunk ``i`` draws only from
``SeedSequence([seed, kind_code, i])``, and chunks are written in order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from ..errors import UserError
from ..io import atomic_open, write_json_atomic
from . import alphabet
from .alphabet import ADAPTER_3P, ADAPTER_5P, DECODE_LUT, PAD

# --------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MotifSpec:
    """One planted motif: how it is recognised, where and how strongly it acts, how it is planted."""

    name: str  # short name used in reports and interaction terms
    pattern: str  # IUPAC consensus on the forward strand, 5'->3' (at most 16 bp)
    forward_weight: float  # occupancy added by one site on the forward strand
    reverse_weight: float  # occupancy added by one site read on the reverse strand (palindromes ignore it)
    peak: float  # distance (bp) from the motif's 3' end to the sequence's 3' end where a site counts most
    width: float  # sd (bp) of the Gaussian position profile around ``peak``
    floor: float  # fraction of the full weight a site keeps far from ``peak``
    effect: float  # activity added at full saturation (logit units of expression / 17)
    saturation: float  # occupancy scale k of the saturating copy-number term 1 - exp(-occupancy / k)
    plant_prob: float  # fraction of rows that receive planted copies of this motif
    run: bool = False  # True: count maximal homopolymer runs at least len(pattern) long, once per run


def _default_motifs() -> tuple[MotifSpec, ...]:
    return (
        # TATA box; consensus TATAWAWR from the yeast TF literature. Acts near the 3' end
        # (closest to the transcription start in the reporter) and mostly on the forward strand.
        MotifSpec("TATA", "TATAWAWR", 1.0, 0.35, 30.0, 12.0, 0.15, 1.30, 0.8, 0.30),
        # Reb1 general regulatory factor; core consensus TTACCCG (YeTFaSCo). Orientation-free.
        MotifSpec("Reb1", "TTACCCG", 1.0, 1.0, 55.0, 20.0, 0.40, 1.10, 0.8, 0.30),
        # Abf1 general regulatory factor; bipartite consensus RTCRYNNNNNACG (YeTFaSCo). Orientation-free.
        MotifSpec("Abf1", "RTCRYNNNNNACG", 1.0, 1.0, 60.0, 18.0, 0.30, 0.95, 0.8, 0.25),
        # Rap1 general regulatory factor; Rap1-like core ACACCCAYACA (yeast TF literature).
        MotifSpec("Rap1", "ACACCCAYACA", 1.0, 0.55, 65.0, 18.0, 0.30, 1.20, 0.8, 0.25),
        # Gcn4 activator; consensus TGASTCA (yeast TF literature), a palindrome.
        MotifSpec("Gcn4", "TGASTCA", 1.0, 1.0, 45.0, 20.0, 0.35, 0.65, 0.8, 0.25),
        # poly-dA:dT nucleosome-disfavouring run of at least 10 A or 10 T; the T run reads stronger.
        MotifSpec("polyAT", "AAAAAAAAAA", 0.6, 1.0, 50.0, 25.0, 0.50, 0.85, 0.8, 0.30, run=True),
    )


def _default_length_probs() -> tuple[tuple[int, float], ...]:
    # Fractions of sequence lengths measured on the real demo_train sample (6,370 rows).
    core = {104: 0.0017, 105: 0.0027, 106: 0.0046, 107: 0.0079, 108: 0.0239, 109: 0.1275, 111: 0.0046}
    short = range(87, 104)  # rare short outliers, more frequent closer to 104
    short_total = 0.0066
    ramp = np.arange(1, len(short) + 1, dtype=np.float64)
    probs = {length: float(w) for length, w in zip(short, short_total * ramp / ramp.sum())}
    long = range(112, 136)  # rare long outliers, flat
    probs.update({length: 0.0013 / len(long) for length in long})
    probs.update(core)
    probs[110] = 1.0 - sum(probs.values())
    return tuple(sorted((length, round(p, 8)) for length, p in probs.items()))


@dataclass(frozen=True)
class GeneratorParams:
    """Every number the generator uses; stored verbatim in ``<stem>.synth.json``."""

    # --- sequences ---
    base_probs: tuple[float, float, float, float] = (0.2244, 0.1927, 0.2859, 0.2970)  # A C G T, real random regions
    length_probs: tuple[tuple[int, float], ...] = field(default_factory=_default_length_probs)  # (length, fraction)
    n_row_prob: float = 0.0040  # fraction of rows with an N block (real sample: 0.39%)
    n_block_span: tuple[int, int] = (8, 24)  # N block spans this many bases ending near the 3' end of the random region
    n_block_density: float = 0.8  # fraction of bases inside the block replaced by N (the real blocks are ragged)
    # --- planting ---
    motifs: tuple[MotifSpec, ...] = field(default_factory=_default_motifs)  # planted motifs, in planting order
    copy_probs: tuple[float, float, float] = (0.6, 0.3, 0.1)  # P(1, 2, 3 copies) in a row chosen for a motif
    run_length_range: tuple[int, int] = (10, 16)  # length of a planted poly-dA:dT run (inclusive)
    # --- expression model ---
    bias: float = -0.20  # activity of a sequence with no sites at the reference GC content
    interactions: tuple[tuple[str, str, float], ...] = (
        ("TATA", "polyAT", 1.1),  # synergy: TATA works better next to a nucleosome-free poly-dA:dT run
        ("Reb1", "Rap1", -0.7),  # redundancy: two general regulatory factors together add less than apart
    )  # (motif a, motif b, gamma): activity += gamma * s_a * s_b with s the saturating terms
    gc_slope: float = -1.5  # activity per unit GC fraction of the whole sequence (mild, negative)
    gc_reference: float = 0.45  # GC fraction at which the GC term is zero
    max_expression: float = 17.0  # expression = max_expression * sigmoid(activity)
    # --- measurement ---
    singleton_prob: float = 0.58  # fraction of train rows observed once: integer label round(obs)
    obs_noise_sd: float = 1.30  # sd of one observation around the noise-free value
    obs_outlier_prob: float = 0.03  # fraction of observations drawn from the wide outlier noise instead
    obs_outlier_sd: float = 4.0  # sd of that outlier noise (gives the real data's low tail)
    extra_obs_mean: float = 2.0  # observations of a non-singleton = 2 + Poisson(extra_obs_mean)
    obs_weight_shape: float = 2.0  # gamma shape of each observation's weight (read-count-like) in the average
    test_noise_sd: float = 0.25  # sd of the precise measurement noise of kind="test" labels


PARAMS = GeneratorParams()
CHUNK_ROWS = 1 << 16  # rows per chunk; fixed so output never depends on the worker count
KIND_CODES = {"train": 0, "test": 1}
SIG_DIGITS = 15  # non-integer labels print with 15 significant digits, like the real file


@dataclass(frozen=True)
class SynthReport:
    """What :func:`synthesize` wrote."""

    path: str
    noise_free_path: str
    info_path: str
    rows: int
    seed: int
    kind: str
    oracle_pearson: float
    seconds: float


# --------------------------------------------------------------------------------------
# Motif scanning: one 8-mer lookup gives bits for the first and second 8 bp of every site
# --------------------------------------------------------------------------------------

_IUPAC = {
    "A": "A", "C": "C", "G": "G", "T": "T", "R": "AG", "Y": "CT", "S": "CG", "W": "AT",
    "K": "GT", "M": "AC", "B": "CGT", "D": "AGT", "H": "ACT", "V": "ACG", "N": "ACGT",
}  # fmt: skip
_COMPLEMENT = str.maketrans("ACGTRYSWKMBDHVN", "TGCAYRSWMKVHDBN")
_K = 8  # k-mer width of the lookup; sites up to 2 * _K bp are matched as two halves
_MARGIN = 2 * _K - 7  # columns past the last base needed to see every site of >= 7 bp
_NARROW_LENGTH = alphabet.NOMINAL_LENGTH + 1  # rows up to this long are scanned on a narrower view


def _revcomp(pattern: str) -> str:
    return pattern.translate(_COMPLEMENT)[::-1]


@dataclass(frozen=True)
class _Site:
    motif: int  # index into PARAMS.motifs
    pattern: str  # pattern as read on the forward strand
    weight: float  # occupancy per site before the position profile
    run_base: int  # base code of a homopolymer run motif, else -1


def _build_sites(params: GeneratorParams) -> list[_Site]:
    sites = []
    for index, motif in enumerate(params.motifs):
        reverse = _revcomp(motif.pattern)
        strands = [(motif.pattern, motif.forward_weight)]
        if reverse != motif.pattern:  # a palindrome is one site, not two
            strands.append((reverse, motif.reverse_weight))
        for pattern, weight in strands:
            run_base = alphabet.BASES.index(pattern[0]) if motif.run else -1
            sites.append(_Site(index, pattern, weight, run_base))
    return sites


def _build_lut(sites: list[_Site]) -> np.ndarray:
    """8-mer id -> uint32: bit i = site i's first half matches, bit 16+i = its second half matches."""
    if len(sites) > 16:
        raise ValueError("at most 16 motif sites fit the lookup")
    ids = np.arange(4**_K, dtype=np.int64)
    kmer = np.stack([(ids >> (2 * (_K - 1 - j))) & 3 for j in range(_K)], axis=1)  # (65536, 8) base codes
    lut = np.zeros(4**_K, dtype=np.uint32)
    for bit, site in enumerate(sites):
        if len(site.pattern) > 2 * _K:
            raise ValueError(f"motif {site.pattern} is longer than {2 * _K} bp")
        padded = site.pattern.ljust(2 * _K, "N")  # positions past the motif accept any base
        for half, shift in ((padded[:_K], bit), (padded[_K:], bit + 16)):
            ok = np.ones(4**_K, dtype=bool)
            for j, letter in enumerate(half):
                allowed = np.zeros(4, dtype=bool)
                allowed[[alphabet.BASES.index(b) for b in _IUPAC[letter]]] = True
                ok &= allowed[kmer[:, j]]
            lut[ok] |= np.uint32(1 << shift)
    return lut


def _profiles(params: GeneratorParams, width: int = 512) -> np.ndarray:
    """(motifs, width) weight of a site whose 3' end lies d bp before the sequence end."""
    d = np.arange(width, dtype=np.float64)
    rows = []
    for motif in params.motifs:
        bump = np.exp(-0.5 * ((d - motif.peak) / motif.width) ** 2)
        rows.append(motif.floor + (1.0 - motif.floor) * bump)
    return np.stack(rows)


_SITES = _build_sites(PARAMS)
_LUT = _build_lut(_SITES)
_PROFILES = _profiles(PARAMS)
_MOTIF_INDEX = {m.name: i for i, m in enumerate(PARAMS.motifs)}


def _as_codes(codes: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    codes = np.asarray(codes)
    lengths = np.asarray(lengths, dtype=np.int64)
    if codes.ndim != 2 or lengths.shape != (codes.shape[0],):
        raise ValueError("codes must be (n, W) and lengths (n,)")
    if codes.size and (codes.max() > PAD or (codes.dtype != np.uint8 and codes.min() < 0)):
        raise ValueError("codes must use the alphabet.py coding (0..5)")
    codes = codes.astype(np.uint8, copy=False)
    if len(lengths) and (lengths.min() < 0 or lengths.max() > codes.shape[1]):
        raise ValueError("lengths must lie in 0..codes.shape[1]")
    need = (int(lengths.max()) if len(lengths) else 0) + _MARGIN
    if codes.shape[1] < need:  # room for the lookup windows past the last base
        padded = np.full((codes.shape[0], need), PAD, dtype=np.uint8)
        padded[:, : codes.shape[1]] = codes
        codes = padded
    return codes, lengths


def motif_occupancy(codes: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Weighted site count per motif, float64 (n, len(PARAMS.motifs)), in PARAMS.motifs order.

    Each site adds its strand weight times its motif's position profile at the site's
    distance from the 3' end. Sites overlapping N or running past a row's length do not count.
    """
    codes, lengths = _as_codes(codes, lengths)
    n = codes.shape[0]
    occupancy = np.zeros((n, len(PARAMS.motifs)), dtype=np.float64)
    if n == 0:
        return occupancy
    # Nearly all rows are <= 111 bp but rare outliers set the array width: scan the common
    # rows on a narrower view so the outliers do not widen every row's work.
    narrow = _NARROW_LENGTH + _MARGIN
    common = lengths <= _NARROW_LENGTH
    if codes.shape[1] > narrow and common.mean() > 0.5:
        rest = np.flatnonzero(~common)
        if len(rest):
            occupancy[rest] = _scan(codes[rest], lengths[rest])
            keep = np.flatnonzero(common)
            occupancy[keep] = _scan(codes[keep, :narrow], lengths[keep])
        else:
            occupancy[:] = _scan(codes[:, :narrow], lengths)
        return occupancy
    return _scan(codes, lengths)


def _scan(codes: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """motif_occupancy on rows whose width already leaves the lookup margin."""
    n, width = codes.shape
    occupancy = np.zeros((n, len(PARAMS.motifs)), dtype=np.float64)
    # Rolling 8-mer ids built by doubling: 2-mers, 4-mers, then 8-mers (N and PAD fold to A/C
    # here; windows that touch them are rejected below).
    base = codes & np.uint8(3)
    d2 = (base[:, :-1] << 2) | base[:, 1:]
    d4 = (d2[:, :-2] << 4) | d2[:, 2:]
    del d2, base
    ids = (d4[:, :-4].astype(np.uint16) << 8) | d4[:, 4:]
    del d4
    bits = _LUT[ids]
    del ids
    # A site matches at p when its first half matches the 8-mer at p and its second half the 8-mer at p + 8.
    hits = bits[:, :-_K] & (bits[:, _K:] >> np.uint32(16))
    del bits
    flat = np.flatnonzero(hits)
    if len(flat) == 0:
        return occupancy
    values = hits.reshape(-1)[flat]
    rows, cols = np.divmod(flat, hits.shape[1])
    n_rows = np.flatnonzero((codes == alphabet.N).any(axis=1))
    if len(n_rows):  # cumulative N counts, only for the few rows that have any
        n_cum = np.zeros((len(n_rows), width + 1), dtype=np.int32)
        np.cumsum(codes[n_rows] == alphabet.N, axis=1, out=n_cum[:, 1:])
        n_slot = np.full(n, -1, dtype=np.int64)
        n_slot[n_rows] = np.arange(len(n_rows))
    for bit, site in enumerate(_SITES):
        take = (values & np.uint32(1 << bit)) != 0
        if not take.any():
            continue
        r, p = rows[take], cols[take]
        m = len(site.pattern)
        ok = p + m <= lengths[r]
        if len(n_rows):
            slot = n_slot[r]
            in_n = slot >= 0
            if in_n.any():
                s, q = slot[in_n], p[in_n]
                ok[in_n] &= n_cum[s, np.minimum(q + m, width)] == n_cum[s, q]
        if site.run_base >= 0:  # count a homopolymer run once, at its first base
            ok &= (p == 0) | (codes[r, np.maximum(p - 1, 0)] != site.run_base)
        r, p = r[ok], p[ok]
        distance = np.minimum(lengths[r] - p - m, _PROFILES.shape[1] - 1)
        weight = site.weight * _PROFILES[site.motif, distance]
        occupancy[:, site.motif] += np.bincount(r, weights=weight, minlength=n)
    return occupancy


def activity(codes: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The model's activity (logit of expression / 17), float64 (n,)."""
    codes, lengths = _as_codes(codes, lengths)
    p = PARAMS
    occupancy = motif_occupancy(codes, lengths)
    saturation = np.array([m.saturation for m in p.motifs])
    s = 1.0 - np.exp(-occupancy / saturation)  # saturating copy number, 0..1 per motif
    act = np.full(len(lengths), p.bias)
    for j, motif in enumerate(p.motifs):  # elementwise, so a row's value never depends on the batch
        act += motif.effect * s[:, j]
    for a, b, gamma in p.interactions:
        act += gamma * s[:, _MOTIF_INDEX[a]] * s[:, _MOTIF_INDEX[b]]
    # GC over the whole row: codes 1 and 2 (C, G) are the ones with code - 1 < 2 in uint8;
    # only the first `length` columns count, whatever the caller left beyond them.
    inside = np.arange(codes.shape[1])[None, :] < lengths[:, None]
    gc = (((codes - np.uint8(1)) < 2) & inside).sum(axis=1, dtype=np.int64)
    act += p.gc_slope * (gc / np.maximum(lengths, 1) - p.gc_reference)
    return act


def expression_model(codes: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Noise-free expression (float64, 0..17) of each row, a pure function of its sequence.

    ``codes`` is uint8 (n, W) in the alphabet.py coding, PAD beyond each row's length.
    """
    act = activity(codes, lengths)
    return PARAMS.max_expression / (1.0 + np.exp(-act))


# --------------------------------------------------------------------------------------
# Sequences
# --------------------------------------------------------------------------------------


def _base_lut(probs: tuple[float, float, float, float]) -> np.ndarray:
    """Random byte -> base code with the given probabilities, in steps of 1/256 (largest remainder)."""
    raw = np.asarray(probs, dtype=np.float64) / sum(probs) * 256
    counts = np.floor(raw).astype(np.int64)
    counts[np.argsort(-(raw - counts), kind="stable")[: 256 - counts.sum()]] += 1
    return np.repeat(np.arange(4, dtype=np.uint8), counts)


_BASE_LUT = _base_lut(PARAMS.base_probs)
_LENGTHS = np.array([length for length, _ in PARAMS.length_probs], dtype=np.int64)
_LENGTH_CUM = np.cumsum([p for _, p in PARAMS.length_probs])
_AD5 = alphabet.encode(ADAPTER_5P)
_AD3 = alphabet.encode(ADAPTER_3P)
_FLANK = len(ADAPTER_5P) + len(ADAPTER_3P)


def _choices(pattern: str) -> tuple[np.ndarray, np.ndarray]:
    """Instance tables of an IUPAC pattern, forward then reverse complement.

    Returns (allowed base codes, flat (2 * len * 4,) uint8, padded to 4 per position;
    how many are allowed, (2, len) uint16).
    """
    table = np.zeros((2, len(pattern), 4), dtype=np.uint8)
    counts = np.zeros((2, len(pattern)), dtype=np.uint16)
    for strand, seq in enumerate((pattern, _revcomp(pattern))):
        for j, letter in enumerate(seq):
            bases = [alphabet.BASES.index(b) for b in _IUPAC[letter]]
            table[strand, j, : len(bases)] = bases
            counts[strand, j] = len(bases)
    return table.ravel(), counts


def _plant(codes: np.ndarray, lengths: np.ndarray, rng: np.random.Generator, params: GeneratorParams) -> None:
    """Write planted motif copies into random regions, in place, motif by motif."""
    n = codes.shape[0]
    random_len = lengths - _FLANK
    copies_cum = np.cumsum(params.copy_probs)
    lo, hi = params.run_length_range
    for motif in params.motifs:
        chosen = np.flatnonzero(rng.random(n) < motif.plant_prob)
        copies = np.searchsorted(copies_cum, rng.random(len(chosen)) * copies_cum[-1], side="right") + 1
        r = np.repeat(chosen, copies)
        k = len(r)
        if motif.run:  # homopolymer of random length; A on one strand is T on the other
            m = rng.integers(lo, hi + 1, size=k)
            strand = rng.random(k) < 0.5
            base = np.where(strand, alphabet.T, alphabet.A).astype(np.uint8)
            start = len(ADAPTER_5P) + (rng.random(k) * (random_len[r] - m + 1)).astype(np.int64)
            offsets = np.arange(hi)
            mask = offsets[None, :] < m[:, None]
            rr = np.broadcast_to(r[:, None], mask.shape)[mask]
            cc = (start[:, None] + offsets[None, :])[mask]
            codes[rr, cc] = np.broadcast_to(base[:, None], mask.shape)[mask]
            continue
        # A random instance of the reverse-complement pattern is a reverse-strand copy.
        m = len(motif.pattern)
        table, counts = _choices(motif.pattern)
        reverse = (rng.random(k) < 0.5).astype(np.int64)
        raw = np.frombuffer(rng.bytes(k * m), dtype=np.uint8).reshape(k, m)
        pick = (raw.astype(np.uint16) * counts[reverse]) >> 8  # uniform choice, to within 1/256
        instance = table[(reverse[:, None] * m + np.arange(m)[None, :]) * 4 + pick]
        start = len(ADAPTER_5P) + (rng.random(k) * (random_len[r] - m + 1)).astype(np.int64)
        flat = (r * codes.shape[1] + start)[:, None] + np.arange(m)[None, :]
        codes.reshape(-1)[flat] = instance


def _add_n_blocks(codes: np.ndarray, lengths: np.ndarray, rng: np.random.Generator, params: GeneratorParams) -> None:
    """Ragged N blocks near the 3' end of the random region, as in the real reads."""
    chosen = np.flatnonzero(rng.random(codes.shape[0]) < params.n_row_prob)
    if len(chosen) == 0:
        return
    lo, hi = params.n_block_span
    span = rng.integers(lo, hi + 1, size=len(chosen))
    end = lengths[chosen] - len(ADAPTER_3P) - rng.integers(0, 3, size=len(chosen))  # exclusive
    start = np.maximum(end - span, len(ADAPTER_5P))
    offsets = np.arange(hi)
    mask = (offsets[None, :] < (end - start)[:, None]) & (rng.random((len(chosen), hi)) < params.n_block_density)
    mask[np.arange(len(chosen)), 0] = True  # at least one N per chosen row
    rr = np.broadcast_to(chosen[:, None], mask.shape)[mask]
    cc = (start[:, None] + offsets[None, :])[mask]
    codes[rr, cc] = alphabet.N


def _sequences(n: int, kind: str, rng: np.random.Generator, params: GeneratorParams) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint8 (n, max length + margin) PAD-filled, lengths int64 (n,))."""
    if kind == "test":
        lengths = np.full(n, alphabet.NOMINAL_LENGTH, dtype=np.int64)
    else:
        lengths = _LENGTHS[np.searchsorted(_LENGTH_CUM, rng.random(n) * _LENGTH_CUM[-1], side="right")]
    width = int(lengths.max()) + _MARGIN
    max_random = int(lengths.max()) - _FLANK
    codes = np.empty((n, width), dtype=np.uint8)
    codes[:, : len(_AD5)] = _AD5
    raw = np.frombuffer(rng.bytes(n * max_random), dtype=np.uint8).reshape(n, max_random)
    codes[:, len(_AD5) : len(_AD5) + max_random] = _BASE_LUT[raw]
    codes[:, len(_AD5) + max_random :] = PAD
    _plant(codes, lengths, rng, params)
    # The 3' adapter follows each row's own random region; everything after it is PAD.
    # Rows are grouped by length so each group is written with plain column slices.
    order = np.argsort(lengths, kind="stable")
    values, starts = np.unique(lengths[order], return_index=True)
    for length, rows in zip(values.tolist(), np.split(order, starts[1:])):
        codes[rows, length - len(_AD3) : length] = _AD3
        codes[rows, length:] = PAD
    if kind == "train":
        _add_n_blocks(codes, lengths, rng, params)
    return codes, lengths


# --------------------------------------------------------------------------------------
# Labels and text
# --------------------------------------------------------------------------------------


def _labels(
    f: np.ndarray, kind: str, rng: np.random.Generator, params: GeneratorParams
) -> tuple[np.ndarray, np.ndarray]:
    """(labels float64, integer mask). Train: singletons round one observation; others average several."""
    n = len(f)
    top = params.max_expression
    if kind == "test":
        return np.clip(f + params.test_noise_sd * rng.standard_normal(n), 0.0, top), np.zeros(n, dtype=bool)
    singleton = rng.random(n) < params.singleton_prob
    n_obs = np.where(singleton, 1, 2 + rng.poisson(params.extra_obs_mean, size=n))
    total = int(n_obs.sum())
    row = np.repeat(np.arange(n), n_obs)
    sd = np.where(rng.random(total) < params.obs_outlier_prob, params.obs_outlier_sd, params.obs_noise_sd)
    obs = np.clip(f[row] + sd * rng.standard_normal(total), 0.0, top)
    weight = rng.gamma(params.obs_weight_shape, size=total)
    mean = np.bincount(row, weights=weight * obs, minlength=n) / np.bincount(row, weights=weight, minlength=n)
    labels = np.where(singleton, np.rint(mean), mean)
    return np.clip(labels, 0.0, top), singleton


_FRAC_DIGITS = SIG_DIGITS - 1  # decimals of a value below 10
_POW10 = 10 ** np.arange(_FRAC_DIGITS - 1, -1, -1, dtype=np.int64)


def _format_numbers(values: np.ndarray, integer: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Text of values in [0, 100): integers as ``12``, others with 15 significant digits.

    Returns (chars uint8 (n, 17), text lengths, the exact values the text parses to).
    Non-integers are nudged by one last digit if needed so that they never print as integers.
    """
    n = len(values)
    scale = np.full(n, 10**_FRAC_DIGITS, dtype=np.int64)
    fixed = np.rint(values * scale).astype(np.int64)
    two = fixed >= 10 * scale  # two integer digits leave room for one fewer decimal
    scale[two] //= 10
    fixed[two] = np.rint(values[two] * scale[two]).astype(np.int64)
    nudge = ~integer & (fixed % scale == 0)
    fixed[nudge] += np.where(fixed[nudge] > 0, -1, 1)
    fixed[integer] = np.rint(values[integer]).astype(np.int64) * scale[integer]
    whole, frac = np.divmod(fixed, scale)
    exact = np.where(integer, whole.astype(np.float64), fixed / scale)
    two = whole >= 10  # again: a nudge can take 10.0 down to 9.999...
    frac14 = frac * (10**_FRAC_DIGITS // scale)  # always 14 decimals, the last 0 when scale has 13
    digits = (frac14[:, None] // _POW10[None, :]) % 10
    trailing = np.cumprod(digits[:, ::-1] == 0, axis=1).sum(axis=1)
    ones = (whole % 10 + 48).astype(np.uint8)
    tens = (whole // 10 + 48).astype(np.uint8)
    chars = np.empty((n, 2 + 1 + _FRAC_DIGITS), dtype=np.uint8)
    dig = (digits + 48).astype(np.uint8)
    dot = np.uint8(ord("."))
    chars[:, 0] = np.where(two, tens, ones)
    chars[:, 1] = np.where(two, ones, dot)
    chars[:, 2] = np.where(two, dot, dig[:, 0])
    chars[:, 3:-1] = np.where(two[:, None], dig[:, :-1], dig[:, 1:])
    chars[:, -1] = dig[:, -1]
    int_len = 1 + two.astype(np.int64)
    length = np.where(integer, int_len, int_len + 1 + _FRAC_DIGITS - trailing)
    return chars, length, exact


def _rows_text(
    left: np.ndarray | None, left_len: np.ndarray, sep: int, right: np.ndarray, right_len: np.ndarray
) -> bytes:
    """Concatenate per row: left[:left_len] + sep + right[:right_len] + newline (no left or sep when None / -1)."""
    n = len(left_len)
    parts = [left] if left is not None else []
    if sep >= 0:
        parts.append(np.full((n, 1), sep, dtype=np.uint8))
    parts += [right, np.full((n, 1), ord("\n"), dtype=np.uint8)]
    block = np.concatenate(parts, axis=1)
    masks = []
    if left is not None:
        masks.append(np.arange(left.shape[1])[None, :] < left_len[:, None])
    if sep >= 0:
        masks.append(np.ones((n, 1), dtype=bool))
    masks += [np.arange(right.shape[1])[None, :] < right_len[:, None], np.ones((n, 1), dtype=bool)]
    return block[np.concatenate(masks, axis=1)].tobytes()


# --------------------------------------------------------------------------------------
# Chunks and the driver
# --------------------------------------------------------------------------------------


@dataclass
class _ChunkResult:
    text: bytes
    noise_free: bytes
    n: int
    integers: int
    n_rows_with_n: int
    length_counts: dict[int, int]
    moments: tuple[float, float, float, float, float]  # mean x, mean y, M2 x, M2 y, C xy (x noise-free, y label)


def _make_chunk(task: tuple[int, int, int, str]) -> _ChunkResult:
    seed, index, n, kind = task
    rng = np.random.default_rng(np.random.SeedSequence([seed, KIND_CODES[kind], index]))
    codes, lengths = _sequences(n, kind, rng, PARAMS)
    f = expression_model(codes, lengths)
    labels, integer = _labels(f, kind, rng, PARAMS)
    nf_chars, nf_len, x = _format_numbers(f, np.zeros(n, dtype=bool))
    lab_chars, lab_len, y = _format_numbers(labels, integer)
    text = _rows_text(DECODE_LUT[codes], lengths, ord("\t"), lab_chars, lab_len)
    noise_free = _rows_text(None, lengths, -1, nf_chars, nf_len)
    mx, my = float(x.mean()), float(y.mean())
    dx, dy = x - mx, y - my
    moments = (mx, my, float(dx @ dx), float(dy @ dy), float(dx @ dy))
    values, counts = np.unique(lengths, return_counts=True)
    return _ChunkResult(
        text=text,
        noise_free=noise_free,
        n=n,
        integers=int(integer.sum()),
        n_rows_with_n=int((codes == alphabet.N).any(axis=1).sum()),
        length_counts={int(v): int(c) for v, c in zip(values, counts)},
        moments=moments,
    )


_Moments = tuple[int, float, float, float, float, float]


def _merge(acc: _Moments, part: _ChunkResult) -> _Moments:
    """Combine (n, mean x, mean y, M2 x, M2 y, C xy) with a chunk's (Chan et al. pairwise update)."""
    n_a, mx_a, my_a, sxx_a, syy_a, sxy_a = acc
    n_b = part.n
    mx_b, my_b, sxx_b, syy_b, sxy_b = part.moments
    n = n_a + n_b
    dx, dy = mx_b - mx_a, my_b - my_a
    w = n_a * n_b / n
    return (
        n,
        mx_a + dx * n_b / n,
        my_a + dy * n_b / n,
        sxx_a + sxx_b + dx * dx * w,
        syy_a + syy_b + dy * dy * w,
        sxy_a + sxy_b + dx * dy * w,
    )


def _tasks(rows: int, seed: int, kind: str) -> list[tuple[int, int, int, str]]:
    return [(seed, i, min(CHUNK_ROWS, rows - i * CHUNK_ROWS), kind) for i in range(math.ceil(rows / CHUNK_ROWS))]


def _results(tasks: list[tuple[int, int, int, str]], workers: int) -> Iterator[_ChunkResult]:
    if workers <= 1 or len(tasks) <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        yield from map(_make_chunk, tasks)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(_make_chunk, tasks, chunksize=1)  # ordered: chunks are written in index order


def _side_paths(out: Path) -> tuple[Path, Path]:
    stem = out.stem if out.suffix else out.name
    return out.with_name(f"{stem}.noise_free.txt"), out.with_name(f"{stem}.synth.json")


def synthesize(
    out: str | os.PathLike,
    rows: int,
    seed: int = 0,
    kind: str = "train",
    workers: int | None = None,
    progress: bool = True,
) -> SynthReport:
    """Write ``rows`` synthetic rows to ``out`` plus ``<stem>.noise_free.txt`` and ``<stem>.synth.json``.

    ``kind="train"`` mimics train_sequences.txt (mixed lengths, rare N, integer singletons and
    averaged labels); ``kind="test"`` mimics the test set (110 bp, no N, precise float labels).
    The bytes depend only on ``(rows, seed, kind)``, never on ``workers`` (default: all CPUs).
    """
    if kind not in KIND_CODES:
        raise UserError(f"unknown kind {kind!r}; expected one of {sorted(KIND_CODES)}")
    if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 1:
        raise UserError(f"rows must be a positive integer, got {rows!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    rows, seed = int(rows), int(seed)
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if workers < 1:
        raise UserError(f"workers must be at least 1, got {workers}")
    out = Path(out)
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: output directory does not exist")
    nf_path, info_path = _side_paths(out)

    started = time.perf_counter()
    tasks = _tasks(rows, seed, kind)
    acc: _Moments = (0, 0.0, 0.0, 0.0, 0.0, 0.0)
    integers = with_n = 0
    length_counts: dict[int, int] = {}
    bar = tqdm(total=rows, unit="row", unit_scale=True, file=sys.stderr, disable=not progress, desc=f"synth {out.name}")
    try:
        results = _results(tasks, min(workers, len(tasks)))
        with contextlib.closing(results), atomic_open(out, "wb") as text_file, atomic_open(nf_path, "wb") as nf_file:
            for part in results:
                text_file.write(part.text)
                nf_file.write(part.noise_free)
                acc = _merge(acc, part)
                integers += part.integers
                with_n += part.n_rows_with_n
                for length, count in part.length_counts.items():
                    length_counts[length] = length_counts.get(length, 0) + count
                bar.update(part.n)
    finally:
        bar.close()
    n, mean_x, mean_y, sxx, syy, sxy = acc
    pearson = sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")
    seconds = time.perf_counter() - started
    info = {
        "format": "DREAM 2022 train_sequences.txt: SEQUENCE<TAB>EXPRESSION, no header",
        "files": {"sequences": out.name, "noise_free": nf_path.name},
        "seed": seed,
        "rows": rows,
        "kind": kind,
        "chunk_rows": CHUNK_ROWS,
        "oracle_pearson": None if math.isnan(pearson) else pearson,
        "integer_label_fraction": integers / n,
        "rows_with_n_fraction": with_n / n,
        "label_mean": mean_y,
        "label_sd": math.sqrt(syy / n),
        "noise_free_mean": mean_x,
        "noise_free_sd": math.sqrt(sxx / n),
        "length_histogram": {str(k): length_counts[k] for k in sorted(length_counts)},
        "params": dataclasses.asdict(PARAMS),
        "seconds": seconds,
    }
    write_json_atomic(info_path, info)
    return SynthReport(
        path=str(out),
        noise_free_path=str(nf_path),
        info_path=str(info_path),
        rows=rows,
        seed=seed,
        kind=kind,
        oracle_pearson=pearson,
        seconds=seconds,
    )
