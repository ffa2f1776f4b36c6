"""Team NAD's words: one 5-mer per random position, 1,024 words.

For each of the 80 random positions i of a 110-bp row (0-based 17..96) the word is
the 5-mer centred on i, ``row[i-2:i+3]``, read from the full row, so the first two
and last two words include adapter bases (NAD's report: "the 5-base group from i-2
to i+2"). NAD keeps only rows of exactly 110 bp without N; :func:`nad_eligible`
is that rule. Word ids are the base-4 number of the 5-mer with the first base most
significant (AAAAA=0, AAAAC=1, ..., TTTTT=1023), a fixed vocabulary independent of
corpus frequencies.
"""

from __future__ import annotations

import numpy as np

from .alphabet import BASES, NOMINAL_LENGTH, RANDOM_LENGTH, RANDOM_START

WORD_K = 5
NUM_WORDS = 4**WORD_K  # 1024
WORDS_PER_ROW = RANDOM_LENGTH  # 80


def nad_eligible(lengths: np.ndarray, has_n: np.ndarray) -> np.ndarray:
    """Boolean mask of rows NAD trains on: exactly 110 bp and no N."""
    return (np.asarray(lengths) == NOMINAL_LENGTH) & ~np.asarray(has_n, dtype=bool)


def words_from_codes(codes: np.ndarray) -> np.ndarray:
    """Word ids (n, 80) int16 from base codes (n, >=110) of NAD-eligible rows."""
    codes = np.asarray(codes)
    start = RANDOM_START - WORD_K // 2
    ids = np.zeros((codes.shape[0], WORDS_PER_ROW), dtype=np.int16)
    for k in range(WORD_K):
        ids = ids * 4 + codes[:, start + k : start + k + WORDS_PER_ROW].astype(np.int16)
    return ids


def word_string(word_id: int) -> str:
    """The 5-mer spelled by a word id."""
    digits = []
    for _ in range(WORD_K):
        word_id, digit = divmod(word_id, 4)
        digits.append(BASES[digit])
    return "".join(reversed(digits))


def word_id(word: str) -> int:
    """The id of a 5-mer over ACGT (raises ValueError otherwise)."""
    if len(word) != WORD_K or any(b not in "ACGT" for b in word.upper()):
        raise ValueError(f"not a 5-mer over ACGT: {word!r}")
    value = 0
    for base in word.upper():
        value = value * 4 + BASES.index(base)
    return value


VOCABULARY = [word_string(i) for i in range(NUM_WORDS)]
