"""Expression regression for any model: NAD's four heads or a BERT regression head.

Targets follow NAD's recipe when ``task.label_map='nad'``: y <= 8 maps to 5 + 3y/8, then
(y - 5)/12, which puts the 0..17 expression range on [0, 1] and compresses the low,
noisy end (Team NAD's DREAM 2022 report). Training targets get N(0, label_noise)
noise, clipped to [0, 1]. Each of NAD's heads is trained on the label (the loss is the
mean over heads); the prediction is the mean of the heads. Predictions are reported on the original
expression scale (the inverse map), so metrics compare with the measured values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..metrics import pearson, spearman


def nad_label_map(y: torch.Tensor) -> torch.Tensor:
    """Expression (0..17) -> NAD's [0, 1] target scale."""
    y = torch.where(y <= 8, 5 + 3 * y / 8, y)
    return (y - 5) / 12


def nad_label_unmap(t: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`nad_label_map` (exact on its range; extended linearly outside)."""
    y = t * 12 + 5
    return torch.where(y <= 8, (y - 5) * 8 / 3, y)


class RegressionTask:
    """Predict expression from sequence with a regression loss on (mapped, noised) labels."""

    def __init__(self, config: Any):
        self.config = config
        self.model_name = config.model.name
        self.tokens = "nad" if self.model_name == "nad" else "kmer"

    # -- model ---------------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        """A fresh single-device model for ``config.model``."""
        if self.model_name == "nad":
            from ..data.glove import load_embedding_tensor
            from ..data.nad_words import NUM_WORDS
            from ..models.nad import NADModel

            data = self.config.data
            embedding = load_embedding_tensor(data.glove, trust_pickle=data.trust_pickled_vectors) if data.glove else None
            return NADModel(self.config.model.nad, embedding, num_words=NUM_WORDS)
        from ..data.kmer_tokenizer import PAD_ID, VOCAB_SIZE
        from ..models.bert import build_regression_model
        from .bert_io import check_export_flanks

        if self.config.model.bert.pretrained:
            check_export_flanks(self.config.model.bert.pretrained, self.config.data.kmer_flank_bp)
        return build_regression_model(self.config.model.bert, vocab_size=VOCAB_SIZE, pad_token_id=PAD_ID)

    def heads(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, heads) predictions on the target scale, in float32."""
        if self.model_name == "nad":
            return model(batch["words"]).float()
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if ids.ndim == 2:
            return model(input_ids=ids, attention_mask=mask).logits.float()
        # (B, 3, T): the three reading frames of each row as three sequences, outputs averaged.
        rows, frames, tokens = ids.shape
        out = model(input_ids=ids.reshape(rows * frames, tokens), attention_mask=mask.reshape(rows * frames, tokens))
        return out.logits.float().reshape(rows, frames, -1).mean(dim=1)

    # -- targets -------------------------------------------------------------------------

    def target(self, y: torch.Tensor, training: bool) -> torch.Tensor:
        """Labels on the target scale; in training with N(0, label_noise) added (global RNG)."""
        task = self.config.task
        # Noise is drawn on the CPU generator whatever y's device (the same noise on a GPU), then moved.
        if task.label_map == "nad":
            t = nad_label_map(y)
            if training and task.label_noise > 0:
                t = (t + torch.randn(t.shape, dtype=t.dtype).to(t.device) * task.label_noise).clamp_(0.0, 1.0)
            return t
        if training and task.label_noise > 0:
            return y + torch.randn(y.shape, dtype=y.dtype).to(y.device) * task.label_noise
        return y

    def to_expression(self, t: torch.Tensor) -> torch.Tensor:
        """Target scale -> expression scale."""
        return nad_label_unmap(t) if self.config.task.label_map == "nad" else t

    def loss(self, heads: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-row loss, averaged over heads: (B,)."""
        target = target.to(heads.device).unsqueeze(1).expand_as(heads)
        if self.config.task.loss == "mse":
            per = F.mse_loss(heads, target, reduction="none")
        else:
            per = F.smooth_l1_loss(heads, target, reduction="none", beta=self.config.task.smooth_l1_beta)
        return per.mean(dim=1)

    # -- the trainer's interface ---------------------------------------------------------

    def training_loss(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean loss of one micro batch (noise drawn from the global RNG, restored on resume)."""
        target = self.target(batch["y"], training=True)
        return self.loss(self.heads(model, batch), target).mean()

    def predict(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) predictions on the expression scale."""
        return self.to_expression(self.heads(model, batch).mean(dim=1))

    def evaluate_batch(self, model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        heads = self.heads(model, batch)
        target = self.target(batch["y"], training=False)
        return {
            "pred": self.to_expression(heads.mean(dim=1)).cpu(),
            "y": batch["y"].float().cpu(),
            "line": batch["line"].cpu(),
            "loss": self.loss(heads, target).cpu(),
        }

    def summarize(self, arrays: dict[str, np.ndarray]) -> dict[str, float]:
        pred, y = arrays["pred"].astype(np.float64), arrays["y"].astype(np.float64)
        return {"loss": float(arrays["loss"].mean()), "pearson": pearson(pred, y), "spearman": spearman(pred, y),
                "rows": float(len(y))}

    def export(self, model: nn.Module, out_dir: Path) -> None:
        """BERT regression models save in Hugging Face form; NAD's model lives in the checkpoint."""
        if self.model_name == "bert":
            from .bert_io import export_pretrained

            export_pretrained(model, out_dir, frame=self.config.data.kmer_frame, flank_bp=self.config.data.kmer_flank_bp)
