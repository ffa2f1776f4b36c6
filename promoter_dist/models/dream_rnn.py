"""Prix Fixe models: a first block, a core block and LegNet's bin head; DREAM-RNN by default, DREAM-CNN by config.

Sources: Rafi et al., "A community effort to optimize sequence-based deep learning models of
gene regulation", Nature Biotechnology 2024, doi:10.1038/s41587-024-02414-w, and the
organisers' Prix Fixe framework (GitHub de-Boer-Lab/random-promoter-dream-challenge-2022,
``prixfixe/``: ``bhi/first_layers_block.py``, ``bhi/coreblock.py``, ``bhi/add_blocks.py``,
``autosome/coreblock.py``, ``autosome/final_layers_block.py``; parameter counts from its
notebook ``DREAMNets_BuildModel_Train_and_Predict.ipynb``). The organisers split the top
challenge models into interchangeable blocks and recombined them; the blocks here are built
so that a model is a choice of :class:`PrixFixeConfig` fields, not new code.

Same input and output contract as :class:`~promoter_dist.models.legnet.LegNet`: encoded
bases ``(B, 6, L)`` (L = 150 as published) -> bin logits ``(B, 18)``, prediction by
soft-argmax (:meth:`PrixFixeNet.predict`).

Blocks (defaults: DREAM-RNN)::

    first='bhi'     team BHI's first block: parallel Conv1d branches (k 9 and k 15, with
                    bias, 'same' padding) - ReLU - dropout 0.2, concatenated to
                    first_channels (320) channels. (BHI's max-pool of size 1 is the
                    identity and is left out.)
    first='legnet'  LegNet's stem: Conv1d(k7, no bias) - BN - SiLU to first_channels.
    core='lstm'     team BHI's core: bidirectional LSTM (hidden 320 per direction) over
                    positions, then conv branches (k 9 and k 15, with bias) - ReLU -
                    dropout 0.2, concatenated to core_channels (320), then dropout 0.5.
    core='legnet'   LegNet's block stack (:class:`~promoter_dist.models.legnet.LegNetCore`)
                    with Prix Fixe's settings: blocks 128, 128, 64, 64, 64, 64, k 7, 2
                    filters per group, and the *standard* SE block (Prix Fixe's autosome
                    core uses it, not the bilinear one).
    head            LegNet's :class:`~promoter_dist.models.legnet.BinHead`: 1x1 conv to 18
                    bins, mean over positions. Prix Fixe's autosome final block has no
                    activation before the pooling (``head_activation='none'``).

Published sizes, measured by ``tests/models/test_dream_rnn.py``: DREAM-RNN (``first='bhi',
core='lstm'``) 4,130,578 parameters; DREAM-CNN (``first='bhi', core='legnet'``) 1,933,970;
both the notebook's figures exactly. With ``first='legnet', first_channels=256,
core='legnet', legnet_se='bilinear', head_activation='silu'`` the composition is LegNet
itself (1,852,846).

Initialisation as in Prix Fixe: the LegNet parts (stem, core, head) get the autosome team's
initialisation (:func:`~promoter_dist.models.legnet.published_init_`); the BHI blocks keep
PyTorch's defaults (their Prix Fixe blocks define none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..choices import check_choice_fields
from ..errors import ConfigError
from .legnet import (
    BinHead,
    HeadActivation,
    LegNetConfig,
    LegNetCore,
    SqueezeExciteKind,
    check_input,
    check_int,
    check_int_tuple,
    check_number,
    conv_bn_silu,
    published_init_,
    soft_argmax,
)

CONFIG_KEY = "model.dream_rnn"
"""Where these settings sit in the run configuration (the prefix of every error message)."""
_FIELD = CONFIG_KEY + "."


@dataclass
class PrixFixeConfig:
    """A Prix Fixe composition; defaults are DREAM-RNN as published (4,130,578 parameters)."""

    first: Literal["bhi", "legnet"] = "bhi"
    """First block: 'bhi' (parallel conv branches; DREAM-RNN, DREAM-CNN) or 'legnet' (LegNet's stem)."""
    core: Literal["lstm", "legnet"] = "lstm"
    """Core block: 'lstm' (BHI's bidirectional LSTM + conv branches; DREAM-RNN) or 'legnet' (DREAM-CNN)."""
    in_channels: int = 6
    """Input channels: 4 one-hot bases + is-reverse + is-singleton (published: 6)."""
    first_channels: int = 320
    """Output channels of the first block; 'bhi' splits them evenly across its branches (published: 320)."""
    first_kernel_sizes: tuple[int, ...] = (9, 15)
    """Kernels of the BHI first block's branches, one branch each (published: 9, 15); unused by 'legnet'."""
    first_dropout: float = 0.2
    """Dropout after each BHI first-block branch (published: 0.2)."""
    lstm_hidden: int = 320
    """LSTM hidden size per direction of the 'lstm' core (published: 320)."""
    core_channels: int = 320
    """Output channels of the 'lstm' core's conv branches together (published: 320)."""
    core_kernel_sizes: tuple[int, ...] = (9, 15)
    """Kernels of the 'lstm' core's conv branches (published: 9, 15)."""
    core_dropout: float = 0.2
    """Dropout after each 'lstm' core branch (published: 0.2)."""
    core_out_dropout: float = 0.5
    """Dropout on the 'lstm' core's concatenated output (published: 0.5)."""
    legnet_blocks: tuple[int, ...] = (128, 128, 64, 64, 64, 64)
    """Output channels of the 'legnet' core's blocks (Prix Fixe: 128, 128, 64, 64, 64, 64)."""
    legnet_kernel_size: int = 7
    """Kernel of the 'legnet' core's convs and of the 'legnet' first block; odd (published: 7)."""
    legnet_se: SqueezeExciteKind = "standard"
    """SE of the 'legnet' core: 'standard' (Prix Fixe), 'bilinear' (LegNet) or 'none'."""
    bins: int = 18
    """Expression bins (logits); the prediction is the soft-argmax over bin values 0..bins-1 (published: 18)."""
    head_activation: HeadActivation = "none"
    """Activation between the head's 1x1 conv and its pooling: 'none' (Prix Fixe) or 'silu' (LegNet)."""

    def __post_init__(self) -> None:
        check_choice_fields(self, CONFIG_KEY)
        for name in ("first_kernel_sizes", "core_kernel_sizes", "legnet_blocks"):
            setattr(self, name, check_int_tuple(f"{_FIELD}{name}", getattr(self, name), 1))
        for name, minimum in (
            ("in_channels", 1),
            ("first_channels", 1),
            ("lstm_hidden", 1),
            ("core_channels", 1),
            ("legnet_kernel_size", 1),
            ("bins", 2),
        ):
            check_int(f"{_FIELD}{name}", getattr(self, name), minimum)
        for name in ("first_dropout", "core_dropout", "core_out_dropout"):
            setattr(self, name, check_number(f"{_FIELD}{name}", getattr(self, name), 0.0, 1.0))
        if self.first == "bhi" and self.first_channels % len(self.first_kernel_sizes):
            raise ConfigError(
                f"{_FIELD}first_channels ({self.first_channels}) must split evenly over the "
                f"{len(self.first_kernel_sizes)} first_kernel_sizes"
            )
        if self.core == "lstm" and self.core_channels % len(self.core_kernel_sizes):
            raise ConfigError(
                f"{_FIELD}core_channels ({self.core_channels}) must split evenly over the "
                f"{len(self.core_kernel_sizes)} core_kernel_sizes"
            )
        if self.legnet_kernel_size % 2 == 0:
            raise ConfigError(f"{_FIELD}legnet_kernel_size must be odd, got {self.legnet_kernel_size}")
        if self.core == "legnet":
            # The SE hidden width is a block's input // 4; the bilinear layer needs two units.
            smallest = 8 if self.legnet_se == "bilinear" else 4
            for key, width in (("first_channels", self.first_channels),) + tuple(
                (f"legnet_blocks[{i}]", w) for i, w in enumerate(self.legnet_blocks[:-1])
            ):
                if width < smallest:
                    raise ConfigError(
                        f"{_FIELD}{key} must be >= {smallest} to feed a 'legnet' core block "
                        f"with legnet_se={self.legnet_se!r}, got {width}"
                    )

    def legnet_core_config(self) -> LegNetConfig:
        """The LegNet settings of the 'legnet' core (Prix Fixe's fixed values for the rest); valid when core='legnet'."""
        return LegNetConfig(
            in_channels=self.in_channels,
            stem_channels=self.first_channels,
            block_channels=self.legnet_blocks,
            kernel_size=self.legnet_kernel_size,
            se=self.legnet_se,
            bins=self.bins,
            head_activation=self.head_activation,
        )


class ConvBranches(nn.Module):
    """Parallel 'same' Conv1d branches (with bias) - ReLU - dropout, concatenated: BHI's conv unit."""

    def __init__(self, c_in: int, c_out: int, kernel_sizes: tuple[int, ...], dropout: float):
        super().__init__()
        each = c_out // len(kernel_sizes)
        self.branches = nn.ModuleList(nn.Conv1d(c_in, each, k, padding="same") for k in kernel_sizes)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.dropout(torch.relu(branch(x))) for branch in self.branches], dim=1)


class LSTMCore(nn.Module):
    """BHI's core: bidirectional LSTM over positions, conv branches, dropout; (B, C, L) -> (B, core_channels, L)."""

    def __init__(self, c_in: int, config: PrixFixeConfig):
        super().__init__()
        self.lstm = nn.LSTM(c_in, config.lstm_hidden, batch_first=True, bidirectional=True)
        self.convs = ConvBranches(2 * config.lstm_hidden, config.core_channels, config.core_kernel_sizes,
                                  config.core_dropout)
        self.dropout = nn.Dropout(config.core_out_dropout)
        self.out_channels = config.core_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states, _ = self.lstm(x.transpose(1, 2))  # (B, L, 2 * hidden)
        return self.dropout(self.convs(states.transpose(1, 2)))


class PrixFixeNet(nn.Module):
    """A Prix Fixe model: encoded bases (B, in_channels, L) -> bin logits (B, bins); :meth:`predict` gives the value."""

    def __init__(self, config: PrixFixeConfig):
        super().__init__()
        self.config = config
        if config.first == "bhi":
            self.first = ConvBranches(config.in_channels, config.first_channels, config.first_kernel_sizes,
                                      config.first_dropout)
        else:
            self.first = conv_bn_silu(config.in_channels, config.first_channels, config.legnet_kernel_size,
                                      LegNetConfig.bn_momentum)
            published_init_(self.first)
        if config.core == "lstm":
            self.core: nn.Module = LSTMCore(config.first_channels, config)
            core_channels = config.core_channels
        else:
            self.core = LegNetCore(config.first_channels, config.legnet_core_config())
            published_init_(self.core)
            core_channels = self.core.out_channels
        self.head = BinHead(core_channels, config.bins, config.head_activation)
        published_init_(self.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encoded bases (B, in_channels, L), float -> logits (B, bins), float32 even under autocast."""
        check_input(x, self.config.in_channels, "Prix Fixe model")
        # Engines that cast the weights (DeepSpeed fp16) hand in float32 inputs: follow the weights.
        x = x.to(next(self.parameters()).dtype)
        return self.head(self.core(self.first(x))).float()

    @staticmethod
    def predict(logits: torch.Tensor) -> torch.Tensor:
        """The prediction: soft-argmax over bin values 0..bins-1, (B, bins) -> (B,) float32."""
        return soft_argmax(logits)
