"""Masked-language-model pretraining of SYSU-SAIL's 3-mer BERT.

SYSU pretrained on the rows in the top 20% of expression (the loader's ``top`` view)
with BERT's masking recipe: 15% of the tokens are chosen for prediction, of those 80%
become [MASK], 10% a random token and 10% stay as they are; the loss is the
cross-entropy over the chosen tokens. The team report quotes "mask part AUC=0.196"
after pretraining, most likely the masked-token accuracy (:meth:`MLMTask.summarize`
reports that as ``accuracy``).

What can be chosen
    Only 3-mer tokens (ids 5..129) of a row's attended positions. [PAD], [CLS] and
    [SEP] are never chosen, nor [UNK] (a 3-mer with a non-ACGTN character: nothing to
    predict) or [MASK]. Random replacements are drawn from the 125 3-mers, never a
    special token (as in BERT, a replacement may equal the original token).

At least one chosen token per row
    Every row with any 3-mer gets at least one chosen token: if the draw chose none,
    the row's 3-mer with the smallest draw is chosen. A batch can then never have an
    empty loss (a mean over zero tokens is NaN). With 119+ 3-mers per row (a 87-bp
    row in frame 2) and p = 0.15 the fallback fires with probability below 1e-8 per row,
    so the rate stays 15%.

Reading frames
    One frame per run (``data.kmer_frame``, default 0), as the loader tokenizes; the
    export carries that frame's tokenizer. SYSU's model code averages three token
    sequences per input, consistent with the three frames of non-overlapping 3-mers;
    the toolkit keeps a plain single-sequence BERT (see :mod:`promoter_dist.models.bert`)
    and treats the frame as a run setting. With ``data.kmer_all_frames=true`` a batch
    holds each row in all three frames; pretraining treats them as three sequences
    (evaluation masks keyed by row and frame).

Randomness
    Training masks with the global torch RNG of the batch's device (``torch.rand`` /
    ``torch.randint`` with no generator), so the trainer's saved and restored RNG state
    reproduces the masks exactly on resume and on GSAM's second pass over a batch.
    Evaluation masks are a fixed function of each row's source line number and token
    position (a counter-based hash, :func:`mask_tokens_keyed`): the same rows get the
    same masks at every evaluation whatever the batch size, the number of ranks or the
    RNG state, so validation losses are comparable across epochs and runs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.kmer_tokenizer import (
    FULL_FLANK_BP,
    MASK_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    VOCAB_SIZE,
    K,
    extension_bp,
    vector_flanks,
)
from ..errors import UserError
from ..models.bert import build_mlm_model
from .bert_io import check_export_flanks, export_pretrained

IGNORE = -100  # label of positions not predicted (torch cross_entropy's default ignore_index)
FIRST_KMER = len(SPECIAL_TOKENS)  # 5: ids FIRST_KMER..VOCAB_SIZE-1 are the 125 3-mers
MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # of the chosen tokens; the remaining 10% are kept
EVAL_SALT = 0x5EED_3A5C  # key of the evaluation masks: fixed, so every evaluation masks alike


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask_prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of a batch: ``(masked_input_ids, labels)``, both like ``input_ids``.

    Each attended 3-mer token is chosen with probability ``mask_prob`` (at least one per
    row that has any); a chosen token becomes [MASK] (80%), a random 3-mer (10%) or
    stays (10%). ``labels`` holds the original id at chosen positions and -100
    elsewhere. Draws come from ``generator`` (on its own device, then moved), or from
    the global RNG of ``input_ids``' device when it is None.
    """
    device = generator.device if generator is not None else input_ids.device
    shape = input_ids.shape
    choose = torch.rand(shape, generator=generator, device=device)
    kind = torch.rand(shape, generator=generator, device=device)
    random_ids = torch.randint(FIRST_KMER, VOCAB_SIZE, shape, generator=generator, device=device)
    return _apply_masking(
        input_ids, attention_mask, choose.to(input_ids.device), kind.to(input_ids.device),
        random_ids.to(input_ids.device), mask_prob,
    )


def mask_tokens_keyed(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    keys: torch.Tensor,
    mask_prob: float = 0.15,
    salt: int = EVAL_SALT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mask_tokens` with draws fixed by (``keys[row]``, position, ``salt``).

    ``keys`` (B,) are integers identifying the rows (the loader's source line numbers).
    A row's mask depends only on its key, its tokens and ``salt``, not on the batch it
    sits in, and uses no RNG state. Runs on any device, vectorised.
    """
    if keys.shape != input_ids.shape[:1]:
        raise ValueError(f"keys must be (batch,) = {tuple(input_ids.shape[:1])}, not {tuple(keys.shape)}")
    keys = keys.to(device=input_ids.device, dtype=torch.int64)
    row = _hash32(_hash32((keys & _M32) ^ (salt & _M32)) ^ ((keys >> 32) & _M32))
    positions = torch.arange(input_ids.shape[1], device=input_ids.device, dtype=torch.int64)
    cell = _hash32(row[:, None] ^ _hash32(positions + 0x9E37))  # (batch, tokens)
    # Three independent streams from one cell hash; 24-bit uniforms are exact in float32.
    streams = [_hash32(cell ^ c) for c in (0x68E31DA4, 0xB5297A4D, 0x1B56C4E9)]
    choose, kind = ((s >> 8).to(torch.float32) / float(1 << 24) for s in streams[:2])
    random_ids = FIRST_KMER + streams[2] % (VOCAB_SIZE - FIRST_KMER)
    return _apply_masking(input_ids, attention_mask, choose, kind, random_ids, mask_prob)


def _apply_masking(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    choose: torch.Tensor,
    kind: torch.Tensor,
    random_ids: torch.Tensor,
    mask_prob: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The masking rule given uniform draws ``choose`` / ``kind`` and replacement ids."""
    if not 0.0 < mask_prob < 1.0:
        raise ValueError(f"mask_prob must be in (0, 1), not {mask_prob}")
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            "input_ids and attention_mask must both be (batch, tokens); "
            f"got {tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
        )
    candidate = attention_mask.bool() & (input_ids >= FIRST_KMER)
    chosen = candidate & (choose < mask_prob)
    # At least one per row: the candidate with the smallest draw (no host sync, no branch).
    fallback = torch.where(candidate, choose, torch.full_like(choose, 2.0)).argmin(dim=1, keepdim=True)
    empty = candidate.any(dim=1, keepdim=True) & ~chosen.any(dim=1, keepdim=True)
    columns = torch.arange(input_ids.shape[1], device=input_ids.device)
    chosen |= empty & (columns == fallback)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    masked = torch.where(chosen & (kind < MASK_SHARE), torch.full_like(input_ids, MASK_ID), input_ids)
    replace = chosen & (kind >= MASK_SHARE) & (kind < MASK_SHARE + RANDOM_SHARE)
    masked = torch.where(replace, random_ids.to(input_ids.dtype), masked)
    return masked, labels


def row_token_mask(lengths: torch.Tensor, frame: int | torch.Tensor, tokens: int,
                   flank_bp: int = FULL_FLANK_BP) -> torch.Tensor:
    """(n, tokens) bool: the positions whose 3-mer lies wholly inside the row, not in the vector flanks.

    Position p >= 1 holds the 3-mer starting at base ``frame + 3(p - 1)`` of the extended row,
    whose own bases start after the upstream flank (``kmer_tokenizer.vector_flanks(flank_bp)``);
    [CLS], [SEP] and [PAD] positions never do. ``frame`` is one frame for all rows or an (n,)
    tensor of each row's frame.
    """
    if isinstance(frame, torch.Tensor):
        frame = frame.to(lengths.device, torch.int64)[:, None]
    start = frame + K * (torch.arange(tokens, device=lengths.device) - 1)
    first = len(vector_flanks(flank_bp)[0])
    end = first + lengths.to(torch.int64)[:, None]
    return (start >= first) & (start + K <= end)


_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for x in [0, 2**32) without int64 overflow (two 16-bit halves)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (xor-shift-multiply, constants of C. Wellons' "lowbias32")."""
    x = x & _M32
    x = _mul32(x ^ (x >> 16), 0x7FEB352D)
    x = _mul32(x ^ (x >> 15), 0x846CA68B)
    return x ^ (x >> 16)


class MLMTask:
    """Masked-LM pretraining as the trainer drives it (same interface as the regression task)."""

    tokens = "kmer"
    """Loader token kind: 3-mer BERT ids."""
    default_view = "top"
    """Rows pretrained on: SYSU's top 20% by expression."""

    def __init__(self, config: Any) -> None:
        """``config`` is a :class:`promoter_dist.config.TrainConfig`."""
        self.settings = config.model.bert
        self.mask_prob = float(config.task.mask_prob)
        self.frame = int(config.data.kmer_frame)
        self.flank_bp = int(config.data.kmer_flank_bp)

    def build_model(self) -> nn.Module:
        """A ``BertForMaskedLM`` (random init, or continued from ``model.bert.pretrained``)."""
        if self.settings.pretrained:
            check_export_flanks(self.settings.pretrained, self.flank_bp)
        return build_mlm_model(self.settings, vocab_size=VOCAB_SIZE, pad_token_id=PAD_ID)

    @staticmethod
    def _one_sequence_per_row(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An all-frames batch (input_ids (B, 3, T)) as 3B sequences; each keeps its row's line and
        length and gets its frame (evaluation masks are keyed by line and frame)."""
        ids = batch["input_ids"]
        if ids.ndim == 2:
            return batch
        rows, frames, tokens = ids.shape
        out = {"input_ids": ids.reshape(rows * frames, tokens),
               "attention_mask": batch["attention_mask"].reshape(rows * frames, tokens),
               "frame": torch.arange(frames, device=ids.device).repeat(rows)}
        for key in ("line", "lengths"):
            if key in batch:
                out[key] = batch[key].repeat_interleave(frames)
        if "line" in out:
            out["line"] = out["line"].to(torch.int64) * frames + out["frame"].to(out["line"].device)
        return out

    def training_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over the masked tokens of the batch; masks with the global RNG."""
        batch = self._one_sequence_per_row(batch)
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        self._check_length(input_ids)
        masked, labels = mask_tokens(input_ids, attention_mask, self.mask_prob)
        logits = model(input_ids=masked, attention_mask=attention_mask).logits
        # fp32 loss even when the model runs in bf16 (HF's own MLM loss keeps the logits' dtype).
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)

    @torch.no_grad()
    def evaluate_batch(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-batch sums: ``loss_sum`` (float32), ``correct`` and ``count`` (int64), each shape (1,).

        Masks are keyed by ``batch['line']`` (:func:`mask_tokens_keyed`); a batch without
        it is masked by a generator with a fixed seed (deterministic for a fixed order).
        """
        batch = self._one_sequence_per_row(batch)
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        self._check_length(input_ids)
        if "line" in batch:
            masked, labels = mask_tokens_keyed(input_ids, attention_mask, batch["line"], self.mask_prob)
        else:
            generator = torch.Generator().manual_seed(EVAL_SALT)
            masked, labels = mask_tokens(input_ids, attention_mask, self.mask_prob, generator)
        logits = model(input_ids=masked, attention_mask=attention_mask).logits.float()
        loss_sum = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
        chosen = labels != IGNORE
        hits = (logits.argmax(dim=-1) == labels) & chosen
        out = {"loss_sum": loss_sum.reshape(1), "correct": hits.sum().reshape(1), "count": chosen.sum().reshape(1)}
        if "lengths" in batch:  # the same, over the row's own tokens only (the flanks are constant)
            frame = batch.get("frame", self.frame)
            in_row = row_token_mask(batch["lengths"].to(input_ids.device), frame, input_ids.shape[1], self.flank_bp)
            out["row_correct"] = (hits & in_row).sum().reshape(1)
            out["row_count"] = (chosen & in_row).sum().reshape(1)
        return out

    def summarize(self, gathered: dict[str, np.ndarray]) -> dict[str, float]:
        """``loss`` (mean CE per masked token), ``accuracy`` (masked-token top-1), ``perplexity``, ``tokens``
        (masked), and, when the batches carried row lengths, ``row_accuracy`` over the masked tokens that
        lie wholly inside the rows: the flanks are the same in every row and easy to predict."""
        keys = ("loss_sum", "correct", "count", "row_correct", "row_count")
        total = {key: float(np.sum(gathered.get(key, ()), dtype=np.float64)) for key in keys}
        count = total["count"]
        if count == 0:  # no rows evaluated anywhere
            return {"loss": math.nan, "accuracy": math.nan, "perplexity": math.nan, "tokens": 0.0}
        loss = total["loss_sum"] / count
        accuracy = total["correct"] / count
        perplexity = math.exp(loss) if loss < 700 else math.inf
        out = {"loss": loss, "accuracy": accuracy, "perplexity": perplexity, "tokens": count}
        if "row_count" in gathered and total["row_count"] > 0:
            out["row_accuracy"] = total["row_correct"] / total["row_count"]
        return out

    def export(self, model: nn.Module, out_dir: Path) -> None:
        """Hugging Face export (model + this run's frame tokenizer) for fine-tuning / reuse."""
        export_pretrained(model, out_dir, frame=self.frame, flank_bp=self.flank_bp)

    def _check_length(self, input_ids: torch.Tensor) -> None:
        """A clear error instead of an index error inside the position embeddings."""
        tokens = input_ids.shape[-1]
        if tokens > self.settings.max_tokens:
            raise UserError(
                f"a batch has {tokens} tokens, more than model.bert.max_tokens={self.settings.max_tokens}; "
                f"raise model.bert.max_tokens (a row of L bp gives (L + {extension_bp(self.flank_bp)} - frame) // 3 + 2 "
                "tokens)"
            )
