"""What every model shares: counting its parameters."""

from __future__ import annotations

from torch import nn


def count_parameters(model: nn.Module, *, trainable_only: bool) -> int:
    """Number of parameter values in ``model``.

    Tied weights count once (``model.parameters()`` yields a shared tensor once); buffers
    (NAD's frozen GloVe table, BatchNorm statistics) never count. ``trainable_only`` leaves
    out parameters with ``requires_grad=False``.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
