"""The base alphabet and the fixed DNA around the random region.

Every stage encodes bases the same way: A=0 C=1 G=2 T=3 N=4, with PAD=5 filling
rows shorter than their block's width. Lower case folds to upper case; any other
byte maps to INVALID so a reader can name it.

Facts (Rafi et al., Nature Biotechnology 2024, doi:10.1038/s41587-024-02414-w; the de Boer
lab's data/plasmid.json, GitHub de-Boer-Lab/random-promoter-dream-challenge-2022): the training
rows carry a 17-bp 5' adapter and a 13-bp 3' adapter around a nominally 80-bp
random region, and the vector's 150 bp either side of the insert end/start with
those adapters.
"""

from __future__ import annotations

import numpy as np

BASES = "ACGTN"
A, C, G, T, N = range(5)
PAD = 5
INVALID = 255

ADAPTER_5P = "TGCATTTTTTTCACATC"
ADAPTER_3P = "GGTTACGGCTGTT"
RANDOM_LENGTH = 80
NOMINAL_LENGTH = len(ADAPTER_5P) + RANDOM_LENGTH + len(ADAPTER_3P)  # 110
RANDOM_START = len(ADAPTER_5P)  # 0-based first random position in a 110-bp row

# 150 bp of the expression vector on each side of the random region (adapters included).
UPSTREAM_150 = (
    "AGTCCACTATTAAAGAACGTGGACTCCAACGTCAAAGGGCGAAAAACCGTCTATCAGGGCGATGGCCCACTACGTGAACC"
    "ATCACCCTAATCAAGTGCTAGCAGGAATGATGCAAAAGGTTCCCGATTCGAACTGCATTTTTTTCACATC"
)
DOWNSTREAM_150 = (
    "GGTTACGGCTGTTTCTTAATTAAAAAAAGATAGAAAACATTAGGAGTGTAACACAAGACTTTCGGATCCTGAGCAGGCAAG"
    "ATAAACGAAGGCAAAGATGTCTAAAGGTGAAGAATTATTCACTGGTGTTGTCCCAATTTTGGTTGAATT"
)
assert len(UPSTREAM_150) == 150 and UPSTREAM_150.endswith(ADAPTER_5P)
assert len(DOWNSTREAM_150) == 150 and DOWNSTREAM_150.startswith(ADAPTER_3P)

#: byte -> base code; INVALID for anything outside ACGTN/acgtn.
ENCODE_LUT = np.full(256, INVALID, dtype=np.uint8)
for _code, _base in enumerate(BASES):
    ENCODE_LUT[ord(_base)] = _code
    ENCODE_LUT[ord(_base.lower())] = _code

#: base code -> ASCII byte (PAD decodes to '.').
DECODE_LUT = np.frombuffer(b"ACGTN.", dtype=np.uint8)


def encode(sequence: str | bytes) -> np.ndarray:
    """Encode one sequence to uint8 codes (INVALID marks bytes outside ACGTN)."""
    raw = sequence.encode("ascii", "replace") if isinstance(sequence, str) else sequence
    return ENCODE_LUT[np.frombuffer(raw, dtype=np.uint8)]


def decode(codes: np.ndarray) -> str:
    """Decode a 1-D code array back to a string, dropping PAD."""
    codes = np.asarray(codes, dtype=np.uint8)
    return DECODE_LUT[codes[codes != PAD]].tobytes().decode("ascii")
