"""Real rows as the BERT model and export tests feed them: raw sequences, codes and 3-mer tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from promoter_dist.data.dream import ReadOptions, read_dream
from promoter_dist.data.kmer_tokenizer import encode_codes

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "dream2022" / "samples" / "train_first1000.txt"


def first_rows(n: int = 32) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The first ``n`` real rows: their raw sequences, their codes and their lengths."""
    rows, _ = read_dream(SAMPLE, ReadOptions(workers=0))
    text = SAMPLE.read_text().splitlines()
    sequences = [text[line - 1].split("\t")[0] for line in rows.lines[:n]]
    return sequences, rows.codes[:n], rows.lengths[:n]


def tokens(sample: tuple[list[str], np.ndarray, np.ndarray], frame: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask of ``sample``'s rows in reading frame ``frame``."""
    _, codes, lengths = sample
    ids, mask = encode_codes(codes, lengths, frame=frame)
    return torch.from_numpy(ids), torch.from_numpy(mask)
