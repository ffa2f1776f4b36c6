"""Soft classification over expression bins, LegNet's objective, for the bin models (LegNet, Prix Fixe).

Source: the autosome.org team's challenge code (GitHub autosome-ru/dream2022, ``train.py``:
``SeqDatasetRevProb``, ``add_rev``, the KL criterion; ``test.py`` for the averaged
prediction) and Penzar et al., Bioinformatics 2023, doi:10.1093/bioinformatics/btad457.

Targets
    A measured value y becomes the distribution N(y + shift, scale) integrated over the bins
    (:func:`soft_targets`): the edges are 1, 2, ..., bins - 1, and the first and last bins
    are open (-inf, 1) and [bins - 1, inf), so every target sums to 1. LegNet: 18 bins,
    shift 0.5, scale 0.5.

Loss
    KL(target || softmax(logits)) per sample, summed over the bins, averaged over the
    samples (torch's ``KLDivLoss(reduction="batchmean")`` on ``log_softmax``): :func:`kl_per_row`.

Prediction
    The model's soft-argmax over bin values 0..bins-1 (``model.predict``): the expected bin.
    Pearson and Spearman on it, like the regression task's metrics.

Reverse complement (``task.reverse_complement``, on as published)
    Training: each row of a batch is fed twice, as read (is-reverse 0) and reverse-complemented
    (is-reverse 1), both with the row's singleton flag: a batch of B rows is 2B samples with
    the same target twice, so every row is seen in both orientations in every epoch, as the
    team's doubled table was. The doubling happens here, on the model's device, rather than in
    the loader: the loader's plan, shuffle buffer, equal steps and exact-resume state stay those
    of B rows. The published code shuffled the doubled table, so a row's two orientations fell
    in different batches; here they share one (1,024 samples are 512 rows), which leaves the
    expected gradient unchanged. Validation and prediction: the singleton channel is 0 (the
    value is unknown at prediction time) and the prediction is the mean of the two
    orientations' expected bins.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.onehot import one_hot, reverse_complement
from ..metrics import pearson, spearman


def soft_targets(y: torch.Tensor, bins: int, shift: float, scale: float) -> torch.Tensor:
    """(B,) measured values -> (B, bins) float32 probabilities of N(y + shift, scale) over the bins.

    Bin 0 is (-inf, 1), bin i is [i, i + 1), the last bin is [bins - 1, inf); computed in float64.
    """
    centre = y.to(torch.float64).reshape(-1, 1) + shift
    edges = torch.arange(1, bins, dtype=torch.float64, device=y.device)
    inner = torch.special.ndtr((edges - centre) / scale)  # CDF at the inner edges, (B, bins - 1)
    zeros = torch.zeros_like(inner[:, :1])
    cdf = torch.cat([zeros, inner, zeros + 1.0], dim=1)
    return (cdf[:, 1:] - cdf[:, :-1]).to(torch.float32)


def kl_per_row(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) KL(targets || softmax(logits)) over the bins; zero-probability target bins add nothing."""
    return F.kl_div(F.log_softmax(logits.float(), dim=-1), targets, reduction="none").sum(dim=-1)


def both_orientations(window: torch.Tensor, singleton: torch.Tensor | None) -> torch.Tensor:
    """(2B, 6, L) model inputs: the B windows as read, then their reverse complements (is-reverse 1)."""
    return torch.cat([one_hot(window, singleton, reverse=False),
                      one_hot(reverse_complement(window), singleton, reverse=True)])


class SoftClassificationTask:
    """Expression bins from one-hot windows: LegNet's soft-label KL objective and averaged prediction."""

    def __init__(self, config: Any):
        self.config = config
        self.model_name = config.model.name
        self.tokens = "onehot"
        settings = config.model.legnet if self.model_name == "legnet" else config.model.dream_rnn
        self.bins = settings.bins
        self.shift, self.scale = config.task.target_shift, config.task.target_scale
        self.reverse_complement = config.task.reverse_complement

    # -- model ---------------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        """A fresh single-device model for ``config.model``: LegNet or a Prix Fixe composition."""
        if self.model_name == "legnet":
            from ..models.legnet import LegNet

            return LegNet(self.config.model.legnet)
        from ..models.dream_rnn import PrixFixeNet

        return PrixFixeNet(self.config.model.dream_rnn)

    # -- inputs and outputs ----------------------------------------------------------------

    def targets(self, y: torch.Tensor) -> torch.Tensor:
        """(B, bins) soft labels of the measured values."""
        return soft_targets(y, self.bins, self.shift, self.scale)

    def prediction_logits(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(orientations, B, bins) logits with the singleton channel 0: as read, then reverse-complemented."""
        window = batch["window"]
        if self.reverse_complement:
            x = both_orientations(window, None)
        else:
            x = one_hot(window, None, reverse=False)
        return model(x).float().reshape(-1, window.shape[0], self.bins)

    @staticmethod
    def expected_bin(model: Any, logits: torch.Tensor) -> torch.Tensor:
        """The model's prediction of its logits (its ``predict``: soft-argmax), float32."""
        module = getattr(model, "module", model)  # DeepSpeed's engine wraps the model
        return module.predict(logits).float()

    # -- the trainer's interface ---------------------------------------------------------

    def training_loss(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean KL of one micro batch, both orientations of every row when reverse_complement is on."""
        window, singleton = batch["window"], batch["singleton"]
        targets = self.targets(batch["y"])
        if self.reverse_complement:
            x = both_orientations(window, singleton)
            targets = torch.cat([targets, targets])
        else:
            x = one_hot(window, singleton, reverse=False)
        return kl_per_row(model(x), targets).mean()

    def predict(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) predictions: the expected bin, averaged over both orientations when reverse_complement is on."""
        logits = self.prediction_logits(model, batch)
        return self.expected_bin(model, logits.flatten(0, 1)).reshape(logits.shape[:2]).mean(dim=0)

    def evaluate_batch(self, model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-row prediction, label, line and loss (the KL averaged over the orientations)."""
        logits = self.prediction_logits(model, batch)
        orientations = logits.shape[0]
        targets = self.targets(batch["y"]).repeat(orientations, 1)
        flat = logits.flatten(0, 1)
        return {
            "pred": self.expected_bin(model, flat).reshape(logits.shape[:2]).mean(dim=0).cpu(),
            "y": batch["y"].float().cpu(),
            "line": batch["line"].cpu(),
            "loss": kl_per_row(flat, targets).reshape(logits.shape[:2]).mean(dim=0).cpu(),
        }

    def summarize(self, arrays: dict[str, np.ndarray]) -> dict[str, float]:
        """Mean loss, Pearson and Spearman of the expected bin against the measured values, and the row count."""
        pred, y = arrays["pred"].astype(np.float64), arrays["y"].astype(np.float64)
        return {"loss": float(arrays["loss"].mean()), "pearson": pearson(pred, y), "spearman": spearman(pred, y),
                "rows": float(len(y))}

    def export(self, model: nn.Module, out_dir: Path) -> None:
        """Nothing beyond the checkpoint: ``promoter-dist export`` writes the weights of any ZeRO stage."""
