"""Synthetic DREAM-format training data with a planted, known expression function.

:func:`synthesize` writes rows in the exact ``train_sequences.txt`` format
(``SEQUENCE<TAB>EXPRESSION\\n``, no header): a 17-bp 5' adapter, a random region
of varying length and a 13-bp 3' adapter, with the real data's length mix, base
composition, rare ``N`` blocks and label style (about 58% integer "singletons",
the rest non-integer averages printed with 15 significant digits).

Each label is a noisy measurement of :func:`expression_model`, a pure function of
the sequence built from motifs scanned in the sequence itself, with position,
orientation, saturating copy number, pairwise interactions, a mild GC effect and a
saturating output. Because the noise-free value of every row is written beside the
data (``<stem>.noise_free.txt``), a trained model can be judged against the oracle:
Pearson(noise-free, labels) is the best any model can reach.

The motif set and everything derived from it is a :class:`Grammar`. The default
grammar plants yeast-like motifs (:data:`DEFAULT_GRAMMAR`); :func:`random_grammar`
draws another grammar of the same family from a seed, so that a model can be judged
on several planted functions rather than on the one its recipe was tuned on.

Output is byte-identical for the same ``(rows, seed, kind, grammar)`` whatever the
number of workers: rows are made in fixed-size chunks, chunk ``i`` draws only from
``SeedSequence([seed, kind_code, i])``, and chunks are written in order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

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
    pattern: str  # IUPAC consensus on the forward strand, 5'->3' (7 to 16 bp)
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
    max_expression: float = 17.0  # expression = max_expression * sigmoid(activity) ** output_exponent
    output_exponent: float = 1.0  # asymmetry of the saturating output; 1 is the plain logistic
    # --- measurement ---
    singleton_prob: float = 0.58  # fraction of train rows observed once: integer label round(obs)
    obs_noise_sd: float = 1.30  # sd of one observation around the noise-free value
    obs_outlier_prob: float = 0.03  # fraction of observations drawn from the wide outlier noise instead
    obs_outlier_sd: float = 4.0  # sd of that outlier noise (gives the real data's low tail)
    extra_obs_mean: float = 2.0  # observations of a non-singleton = 2 + Poisson(extra_obs_mean)
    obs_weight_shape: float = 2.0  # gamma shape of each observation's weight (read-count-like) in the average
    test_noise_sd: float = 0.25  # sd of the precise measurement noise of kind="test" labels

    @classmethod
    def from_dict(cls, data: dict) -> GeneratorParams:
        """The parameters an info file's ``"params"`` holds (``dataclasses.asdict`` after a JSON round trip)."""

        def as_tuples(value: object) -> object:
            return tuple(as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value

        fields = {k: as_tuples(v) for k, v in data.items() if k != "motifs"}
        return cls(motifs=tuple(MotifSpec(**m) for m in data["motifs"]), **fields)


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
    grammar: str = "default"
    grammar_seed: int | None = None  # the seed of a random grammar; None for the default


# --------------------------------------------------------------------------------------
# Motif scanning: one 8-mer lookup gives bits for the first and second 8 bp of every site
# --------------------------------------------------------------------------------------

_IUPAC = {
    "A": "A", "C": "C", "G": "G", "T": "T", "R": "AG", "Y": "CT", "S": "CG", "W": "AT",
    "K": "GT", "M": "AC", "B": "CGT", "D": "AGT", "H": "ACT", "V": "ACG", "N": "ACGT",
}  # fmt: skip
_COMPLEMENT = str.maketrans("ACGTRYSWKMBDHVN", "TGCAYRSWMKVHDBN")
_K = 8  # k-mer width of the lookup; sites up to 2 * _K bp are matched as two halves
_MIN_SITE = 7  # shortest pattern: the lookup margin must see a site at a row's very end
_MARGIN = 2 * _K - _MIN_SITE  # columns past the last base needed to see every site of >= _MIN_SITE bp
_NARROW_LENGTH = alphabet.NOMINAL_LENGTH + 1  # rows up to this long are scanned on a narrower view


def _revcomp(pattern: str) -> str:
    return pattern.translate(_COMPLEMENT)[::-1]


@dataclass(frozen=True)
class _Site:
    motif: int  # index into the grammar's motifs
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


def motif_occupancy(codes: np.ndarray, lengths: np.ndarray, grammar: Grammar | None = None) -> np.ndarray:
    """Weighted site count per motif, float64 (n, motifs), in the grammar's motif order.

    Each site adds its strand weight times its motif's position profile at the site's
    distance from the 3' end. Sites overlapping N or running past a row's length do not count.
    ``grammar`` defaults to :data:`DEFAULT_GRAMMAR`.
    """
    grammar = DEFAULT_GRAMMAR if grammar is None else grammar
    codes, lengths = _as_codes(codes, lengths)
    n = codes.shape[0]
    occupancy = np.zeros((n, len(grammar.params.motifs)), dtype=np.float64)
    if n == 0:
        return occupancy
    # Nearly all rows are <= 111 bp but rare outliers set the array width: scan the common
    # rows on a narrower view so the outliers do not widen every row's work.
    narrow = _NARROW_LENGTH + _MARGIN
    common = lengths <= _NARROW_LENGTH
    if codes.shape[1] > narrow and common.mean() > 0.5:
        rest = np.flatnonzero(~common)
        if len(rest):
            occupancy[rest] = _scan(codes[rest], lengths[rest], grammar)
            keep = np.flatnonzero(common)
            occupancy[keep] = _scan(codes[keep, :narrow], lengths[keep], grammar)
        else:
            occupancy[:] = _scan(codes[:, :narrow], lengths, grammar)
        return occupancy
    return _scan(codes, lengths, grammar)


def _scan(codes: np.ndarray, lengths: np.ndarray, grammar: Grammar) -> np.ndarray:
    """motif_occupancy on rows whose width already leaves the lookup margin."""
    n, width = codes.shape
    occupancy = np.zeros((n, len(grammar.params.motifs)), dtype=np.float64)
    # Rolling 8-mer ids built by doubling: 2-mers, 4-mers, then 8-mers (N and PAD fold to A/C
    # here; windows that touch them are rejected below).
    base = codes & np.uint8(3)
    d2 = (base[:, :-1] << 2) | base[:, 1:]
    d4 = (d2[:, :-2] << 4) | d2[:, 2:]
    del d2, base
    ids = (d4[:, :-4].astype(np.uint16) << 8) | d4[:, 4:]
    del d4
    bits = grammar.lut[ids]
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
    for bit, site in enumerate(grammar.sites):
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
        distance = np.minimum(lengths[r] - p - m, grammar.profiles.shape[1] - 1)
        weight = site.weight * grammar.profiles[site.motif, distance]
        occupancy[:, site.motif] += np.bincount(r, weights=weight, minlength=n)
    return occupancy


def activity(codes: np.ndarray, lengths: np.ndarray, grammar: Grammar | None = None) -> np.ndarray:
    """The model's activity (the logit of expression / 17 when ``output_exponent`` is 1), float64 (n,).

    ``grammar`` defaults to :data:`DEFAULT_GRAMMAR`.
    """
    grammar = DEFAULT_GRAMMAR if grammar is None else grammar
    codes, lengths = _as_codes(codes, lengths)
    p = grammar.params
    occupancy = motif_occupancy(codes, lengths, grammar)
    s = 1.0 - np.exp(-occupancy / grammar.saturation)  # saturating copy number, 0..1 per motif
    act = np.full(len(lengths), p.bias)
    for j, motif in enumerate(p.motifs):  # elementwise, so a row's value never depends on the batch
        act += motif.effect * s[:, j]
    for a, b, gamma in grammar.interactions:
        act += gamma * s[:, a] * s[:, b]
    # GC over the whole row: codes 1 and 2 (C, G) are the ones with code - 1 < 2 in uint8;
    # only the first `length` columns count, whatever the caller left beyond them.
    inside = np.arange(codes.shape[1])[None, :] < lengths[:, None]
    gc = (((codes - np.uint8(1)) < 2) & inside).sum(axis=1, dtype=np.int64)
    act += p.gc_slope * (gc / np.maximum(lengths, 1) - p.gc_reference)
    return act


def expression_model(codes: np.ndarray, lengths: np.ndarray, grammar: Grammar | None = None) -> np.ndarray:
    """Noise-free expression (float64, 0..17) of each row, a pure function of its sequence.

    ``codes`` is uint8 (n, W) in the alphabet.py coding, PAD beyond each row's length;
    ``grammar`` defaults to :data:`DEFAULT_GRAMMAR`.
    """
    grammar = DEFAULT_GRAMMAR if grammar is None else grammar
    return _output(activity(codes, lengths, grammar), grammar.params)


def _output(act: np.ndarray, params: GeneratorParams) -> np.ndarray:
    """The saturating output: max_expression * sigmoid(act) ** output_exponent."""
    if params.output_exponent == 1.0:  # the plain logistic, computed as it always was
        return params.max_expression / (1.0 + np.exp(-act))
    return params.max_expression * (1.0 + np.exp(-act)) ** -params.output_exponent


# --------------------------------------------------------------------------------------
# Sequences
# --------------------------------------------------------------------------------------


def _base_lut(probs: tuple[float, float, float, float]) -> np.ndarray:
    """Random byte -> base code with the given probabilities, in steps of 1/256 (largest remainder)."""
    raw = np.asarray(probs, dtype=np.float64) / sum(probs) * 256
    counts = np.floor(raw).astype(np.int64)
    counts[np.argsort(-(raw - counts), kind="stable")[: 256 - counts.sum()]] += 1
    return np.repeat(np.arange(4, dtype=np.uint8), counts)


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


def _plant(codes: np.ndarray, lengths: np.ndarray, rng: np.random.Generator, grammar: Grammar) -> None:
    """Write planted motif copies into random regions, in place, motif by motif."""
    params = grammar.params
    n = codes.shape[0]
    random_len = lengths - _FLANK
    copies_cum = np.cumsum(params.copy_probs)
    lo, hi = params.run_length_range
    for motif, tables in zip(params.motifs, grammar.plant_tables):
        chosen = np.flatnonzero(rng.random(n) < motif.plant_prob)
        copies = np.searchsorted(copies_cum, rng.random(len(chosen)) * copies_cum[-1], side="right") + 1
        r = np.repeat(chosen, copies)
        k = len(r)
        if motif.run:  # homopolymer of random length; A on one strand is T on the other
            m = rng.integers(lo, hi + 1, size=k)
            strand = rng.random(k) < 0.5
            run_base = alphabet.BASES.index(motif.pattern[0])
            base = np.where(strand, 3 - run_base, run_base).astype(np.uint8)  # 3 - code is the complement
            start = len(ADAPTER_5P) + (rng.random(k) * (random_len[r] - m + 1)).astype(np.int64)
            offsets = np.arange(hi)
            mask = offsets[None, :] < m[:, None]
            rr = np.broadcast_to(r[:, None], mask.shape)[mask]
            cc = (start[:, None] + offsets[None, :])[mask]
            codes[rr, cc] = np.broadcast_to(base[:, None], mask.shape)[mask]
            continue
        # A random instance of the reverse-complement pattern is a reverse-strand copy.
        m = len(motif.pattern)
        table, counts = tables
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


def _sequences(n: int, kind: str, rng: np.random.Generator, grammar: Grammar) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint8 (n, max length + margin) PAD-filled, lengths int64 (n,))."""
    if kind == "test":
        lengths = np.full(n, alphabet.NOMINAL_LENGTH, dtype=np.int64)
    else:
        cum = grammar.length_cum
        lengths = grammar.lengths[np.searchsorted(cum, rng.random(n) * cum[-1], side="right")]
    width = int(lengths.max()) + _MARGIN
    max_random = int(lengths.max()) - _FLANK
    codes = np.empty((n, width), dtype=np.uint8)
    codes[:, : len(_AD5)] = _AD5
    raw = np.frombuffer(rng.bytes(n * max_random), dtype=np.uint8).reshape(n, max_random)
    codes[:, len(_AD5) : len(_AD5) + max_random] = grammar.base_lut[raw]
    codes[:, len(_AD5) + max_random :] = PAD
    _plant(codes, lengths, rng, grammar)
    # The 3' adapter follows each row's own random region; everything after it is PAD.
    # Rows are grouped by length so each group is written with plain column slices.
    order = np.argsort(lengths, kind="stable")
    values, starts = np.unique(lengths[order], return_index=True)
    for length, rows in zip(values.tolist(), np.split(order, starts[1:])):
        codes[rows, length - len(_AD3) : length] = _AD3
        codes[rows, length:] = PAD
    if kind == "train":
        _add_n_blocks(codes, lengths, rng, grammar.params)
    return codes, lengths


# --------------------------------------------------------------------------------------
# Grammars: a parameter set compiled with every table derived from it
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Grammar:
    """A :class:`GeneratorParams` with every table the generator derives from it, built once.

    Made by :func:`compile_grammar` (or :func:`make_grammar` by name). Its arrays are read-only,
    so one instance serves every caller and travels to worker processes inside the chunk tasks.
    """

    name: str  # "default", "random" or "custom"
    seed: int | None  # the grammar seed of a random grammar, else None
    params: GeneratorParams
    sites: tuple[_Site, ...]  # one per strand of each motif (one for a palindrome), in lookup bit order
    lut: np.ndarray  # 8-mer id -> site half-match bits, see _build_lut
    profiles: np.ndarray  # (motifs, 512) position weight by distance of a site's 3' end from the row end
    saturation: np.ndarray  # (motifs,) copy-number saturation scale
    interactions: tuple[tuple[int, int, float], ...]  # (motif index a, motif index b, gamma)
    plant_tables: tuple[tuple[np.ndarray, np.ndarray] | None, ...]  # _choices per motif, None for a run
    base_lut: np.ndarray  # random byte -> base code
    lengths: np.ndarray  # row lengths of kind="train" ...
    length_cum: np.ndarray  # ... and their cumulative probabilities


def compile_grammar(params: GeneratorParams, name: str = "custom", seed: int | None = None) -> Grammar:
    """Check ``params`` and build the lookup, profile, planting and sequence tables of its grammar."""
    names = [m.name for m in params.motifs]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"motif names must be present and unique, got {names}")
    for motif in params.motifs:
        if not _MIN_SITE <= len(motif.pattern) <= 2 * _K or any(c not in _IUPAC for c in motif.pattern):
            raise ValueError(f"motif {motif.name}: pattern {motif.pattern!r} must be {_MIN_SITE}-{2 * _K} IUPAC letters")
        if motif.run and (len(set(motif.pattern)) != 1 or motif.pattern[0] not in "ACGT"):
            raise ValueError(f"motif {motif.name}: a run motif's pattern repeats one of A, C, G, T")
    index = {n: i for i, n in enumerate(names)}
    for a, b, _ in params.interactions:
        if a not in index or b not in index:
            raise ValueError(f"interaction ({a}, {b}) names an unknown motif")
    sites = tuple(_build_sites(params))
    plant_tables = tuple(None if m.run else _choices(m.pattern) for m in params.motifs)
    arrays = {
        "lut": _build_lut(list(sites)),
        "profiles": _profiles(params),
        "saturation": np.array([m.saturation for m in params.motifs]),
        "base_lut": _base_lut(params.base_probs),
        "lengths": np.array([length for length, _ in params.length_probs], dtype=np.int64),
        "length_cum": np.cumsum([p for _, p in params.length_probs]),
    }
    for array in list(arrays.values()) + [a for tables in plant_tables if tables for a in tables]:
        array.flags.writeable = False
    return Grammar(
        name=name,
        seed=seed,
        params=params,
        sites=sites,
        interactions=tuple((index[a], index[b], gamma) for a, b, gamma in params.interactions),
        plant_tables=plant_tables,
        **arrays,
    )


DEFAULT_GRAMMAR = compile_grammar(GeneratorParams(), "default")
GRAMMARS = ("default", "random")
CALIBRATION_ROWS = 8192  # rows simulated to set a random grammar's output scale and offset
_GRAMMAR_SEED_TAG = 0x6772616D  # keeps grammar draws apart from the data seeds' streams
_TWO_WAY = "RYSWKM"
_SELF_COMPLEMENTARY = "SWN"


def make_grammar(name: str, grammar_seed: int = 0) -> Grammar:
    """The grammar ``synthesize`` plants: ``"default"`` or ``"random"`` drawn from ``grammar_seed``."""
    if name == "default":
        if grammar_seed != 0:
            raise UserError(f"grammar seed {grammar_seed} applies only to the random grammar (--grammar random)")
        return DEFAULT_GRAMMAR
    if name == "random":
        if isinstance(grammar_seed, bool) or not isinstance(grammar_seed, (int, np.integer)) or grammar_seed < 0:
            raise UserError(f"grammar seed must be a non-negative integer, got {grammar_seed!r}")
        return compile_grammar(random_grammar(int(grammar_seed)), "random", int(grammar_seed))
    raise UserError(f"unknown grammar {name!r}; expected one of {list(GRAMMARS)}")


def random_grammar(grammar_seed: int) -> GeneratorParams:
    """Draw a grammar of the default's family from ``grammar_seed`` (same seed, same parameters).

    Sequences (lengths, base composition, N blocks), copy numbers and the measurement model
    are the default's; what is drawn, uniformly unless said otherwise:

    * motifs: 4-7, named ``M1``... in planting order; with probability 0.5 the last one is a
      homopolymer run (``polyA``, i.e. poly-dA:dT, with probability 0.7, else ``polyG``) of
      8-11 bp, planted as runs of that length plus 4-7 bp more.
    * patterns, 7-16 bp of IUPAC letters (per letter: one base 0.72, a two-base code 0.22,
      N 0.06, never N at an end) with 12-21 bits of information (the default's span 13-21),
      matching neither adapter on either strand and no other motif: contiguous 7-12 bp
      (probability 0.6), bipartite 3-5 bp + 2-6 N + 3-5 bp (0.2), or palindromic, a 3-6 bp
      half, its reverse complement and possibly an S/W/N centre (0.2).
    * strand effects: orientation-free with probability 0.4 (and always for a palindrome),
      else one strand 1.0 and the other 0.2-0.8, either way round.
    * position profile: peak 15-75 bp from the 3' end, width (sd) 8-30 bp, floor 0.05-0.6.
    * effect magnitude 0.5-1.4 before scaling, a repressor (negative) with probability 0.25
      except for M1 and M2, which always activate; saturation scale 0.5-1.5; planted in
      0.15-0.35 of the rows.
    * interactions: 0-3 distinct motif pairs, gamma 0.4-1.2 before scaling, either sign.
    * GC slope -2.5 to 1.0 before scaling; output exponent 0.6-1.6 (log-uniform).
    * calibration: on :data:`CALIBRATION_ROWS` simulated rows, one factor scales every effect,
      gamma and the GC slope, and the bias is set, so that the noise-free values have a mean
      drawn in 10.4-11.8 and an sd drawn in 1.9-2.4 (the default's: 11.1 and 2.1). With the
      default's measurement noise this keeps labels spread like the default's over 0-17 and
      the oracle Pearson near the default's 0.85 (about 0.82-0.89).
    """
    if isinstance(grammar_seed, bool) or not isinstance(grammar_seed, (int, np.integer)) or grammar_seed < 0:
        raise ValueError(f"grammar seed must be a non-negative integer, got {grammar_seed!r}")
    rng = np.random.default_rng(np.random.SeedSequence([_GRAMMAR_SEED_TAG, int(grammar_seed)]))
    defaults = GeneratorParams()
    n_motifs = int(rng.integers(4, 8))
    has_run = bool(rng.random() < 0.5)
    used: set[str] = set()
    motifs = []
    run_length_range = defaults.run_length_range
    for i in range(n_motifs):
        run = has_run and i == n_motifs - 1
        if run:
            base = "A" if rng.random() < 0.7 else "G"
            length = int(rng.integers(8, 12))
            pattern, name = base * length, f"poly{base}"
            run_length_range = (length, length + int(rng.integers(4, 8)))
        else:
            pattern, name = _draw_pattern(rng, used), f"M{i + 1}"
        used |= {pattern, _revcomp(pattern)}
        if pattern == _revcomp(pattern) or rng.random() < 0.4:
            forward, reverse = 1.0, 1.0
        else:
            weak = round(float(rng.uniform(0.2, 0.8)), 3)
            forward, reverse = (1.0, weak) if rng.random() < 0.5 else (weak, 1.0)
        sign = -1.0 if i >= 2 and rng.random() < 0.25 else 1.0
        motifs.append(
            MotifSpec(
                name=name,
                pattern=pattern,
                forward_weight=forward,
                reverse_weight=reverse,
                peak=round(float(rng.uniform(15.0, 75.0)), 1),
                width=round(float(rng.uniform(8.0, 30.0)), 1),
                floor=round(float(rng.uniform(0.05, 0.6)), 3),
                effect=sign * round(float(rng.uniform(0.5, 1.4)), 3),
                saturation=round(float(rng.uniform(0.5, 1.5)), 3),
                plant_prob=round(float(rng.uniform(0.15, 0.35)), 3),
                run=run,
            )
        )
    pairs = list(itertools.combinations([m.name for m in motifs], 2))
    chosen = sorted(rng.choice(len(pairs), size=int(rng.integers(0, 4)), replace=False).tolist())
    interactions = tuple(
        (*pairs[k], (-1.0 if rng.random() < 0.5 else 1.0) * round(float(rng.uniform(0.4, 1.2)), 3)) for k in chosen
    )
    draft = dataclasses.replace(
        defaults,
        motifs=tuple(motifs),
        run_length_range=run_length_range,
        bias=0.0,
        interactions=interactions,
        gc_slope=round(float(rng.uniform(-2.5, 1.0)), 3),
        output_exponent=round(float(np.exp(rng.uniform(np.log(0.6), np.log(1.6)))), 3),
    )
    target_mean = float(rng.uniform(10.4, 11.8))
    target_sd = float(rng.uniform(1.9, 2.4))
    return _calibrate(draft, target_mean, target_sd, rng)


def _draw_letters(rng: np.random.Generator, k: int) -> str:
    """k IUPAC letters: one base (0.72), a two-base code (0.22) or N (0.06), never N at an end."""
    letters = []
    for j in range(k):
        u = rng.random()
        if u < 0.72 or (u >= 0.94 and j in (0, k - 1)):
            letters.append("ACGT"[rng.integers(4)])
        elif u < 0.94:
            letters.append(_TWO_WAY[rng.integers(len(_TWO_WAY))])
        else:
            letters.append("N")
    return "".join(letters)


def _information_bits(pattern: str) -> float:
    return sum(2.0 - math.log2(len(_IUPAC[c])) for c in pattern)


def _matches_adapters(pattern: str) -> bool:
    """True if the pattern, on either strand, occurs inside an adapter (a constant site in every row)."""
    for strand in (pattern, _revcomp(pattern)):
        regex = re.compile("".join(f"[{_IUPAC[c]}]" for c in strand))
        if regex.search(ADAPTER_5P) or regex.search(ADAPTER_3P):
            return True
    return False


def _draw_pattern(rng: np.random.Generator, used: set[str]) -> str:
    """A contiguous, bipartite or palindromic IUPAC pattern meeting random_grammar's limits."""
    while True:  # rejection: a handful of draws at most in practice
        form = rng.random()
        if form < 0.2:  # palindrome: a half, an optional self-complementary centre, the half's reverse complement
            half = _draw_letters(rng, int(rng.integers(3, 7)))
            centre = _SELF_COMPLEMENTARY[rng.integers(3)] if 2 * len(half) < _MIN_SITE or rng.random() < 0.5 else ""
            pattern = half + centre + _revcomp(half)
        elif form < 0.4:  # bipartite: two half-sites with a fixed N spacer
            left = _draw_letters(rng, int(rng.integers(3, 6)))
            right = _draw_letters(rng, int(rng.integers(3, 6)))
            pattern = left + "N" * int(rng.integers(2, 7)) + right
        else:
            pattern = _draw_letters(rng, int(rng.integers(7, 13)))
        if (
            _MIN_SITE <= len(pattern) <= 2 * _K
            and 12.0 <= _information_bits(pattern) <= 21.0
            and pattern not in used
            and not _matches_adapters(pattern)
        ):
            return pattern


def _calibrate(draft: GeneratorParams, target_mean: float, target_sd: float, rng: np.random.Generator) -> GeneratorParams:
    """Scale the draft's effects, gammas and GC slope and set its bias to hit the noise-free mean and sd."""
    compiled = compile_grammar(draft)
    codes, lengths = _sequences(CALIBRATION_ROWS, "train", rng, compiled)
    act0 = activity(codes, lengths, compiled)  # bias is 0 in the draft

    def bias_for(act: np.ndarray, params: GeneratorParams) -> float:
        lo, hi = -40.0, 40.0  # the mean rises with the bias
        for _ in range(45):  # to within 80 / 2**45, far below the 4 decimals kept
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if _output(mid + act, params).mean() < target_mean else (lo, mid)
        return 0.5 * (lo + hi)

    def sd_at(scale: float) -> float:
        act = scale * act0
        return float(_output(bias_for(act, draft) + act, draft).std())

    lo, hi = math.log(1e-3), math.log(50.0)  # the sd at a fixed mean rises with the scale
    if sd_at(math.exp(hi)) < target_sd:
        raise ValueError("the drawn grammar cannot reach the target spread")
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if sd_at(math.exp(mid)) < target_sd else (lo, mid)
    scale = math.exp(0.5 * (lo + hi))
    scaled = dataclasses.replace(
        draft,
        motifs=tuple(dataclasses.replace(m, effect=round(m.effect * scale, 4)) for m in draft.motifs),
        interactions=tuple((a, b, round(gamma * scale, 4)) for a, b, gamma in draft.interactions),
        gc_slope=round(draft.gc_slope * scale, 4),
    )
    act = activity(codes, lengths, compile_grammar(scaled))
    return dataclasses.replace(scaled, bias=round(bias_for(act, scaled), 4))


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


_Task = tuple[int, int, int, str, "Grammar"]  # seed, chunk index, rows, kind, grammar


def _make_chunk(task: _Task) -> _ChunkResult:
    seed, index, n, kind, grammar = task
    rng = np.random.default_rng(np.random.SeedSequence([seed, KIND_CODES[kind], index]))
    codes, lengths = _sequences(n, kind, rng, grammar)
    f = expression_model(codes, lengths, grammar)
    labels, integer = _labels(f, kind, rng, grammar.params)
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


def _tasks(rows: int, seed: int, kind: str, grammar: Grammar) -> list[_Task]:
    # The compiled grammar travels in each task (a few hundred kB pickled), so a worker
    # process never rebuilds it and never relies on state set up in the parent.
    return [
        (seed, i, min(CHUNK_ROWS, rows - i * CHUNK_ROWS), kind, grammar) for i in range(math.ceil(rows / CHUNK_ROWS))
    ]


def _results(tasks: list[_Task], workers: int) -> Iterator[_ChunkResult]:
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
    grammar: Literal["default", "random"] = "default",
    grammar_seed: int = 0,
) -> SynthReport:
    """Write ``rows`` synthetic rows to ``out`` plus ``<stem>.noise_free.txt`` and ``<stem>.synth.json``.

    ``kind="train"`` mimics train_sequences.txt (mixed lengths, rare N, integer singletons and
    averaged labels); ``kind="test"`` mimics the test set (110 bp, no N, precise float labels).
    ``grammar="default"`` plants :data:`DEFAULT_GRAMMAR`; ``grammar="random"`` plants
    ``random_grammar(grammar_seed)``. The bytes depend only on ``(rows, seed, kind, grammar,
    grammar_seed)``, never on ``workers`` (default: all CPUs).
    """
    if kind not in KIND_CODES:
        raise UserError(f"unknown kind {kind!r}; expected one of {sorted(KIND_CODES)}")
    if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 1:
        raise UserError(f"rows must be a positive integer, got {rows!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    rows, seed = int(rows), int(seed)
    planted = make_grammar(grammar, grammar_seed)
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if workers < 1:
        raise UserError(f"workers must be at least 1, got {workers}")
    out = Path(out)
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: output directory does not exist")
    nf_path, info_path = _side_paths(out)

    started = time.perf_counter()
    tasks = _tasks(rows, seed, kind, planted)
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
        "grammar": {"name": planted.name, "seed": planted.seed},
        "params": dataclasses.asdict(planted.params),
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
        grammar=planted.name,
        grammar_seed=planted.seed,
    )
