"""LegNet, the DREAM 2022 winner (team autosome.org): one-hot bases -> 18 expression-bin logits.

Sources: the team's challenge code (GitHub autosome-ru/dream2022: ``model.py`` for the
network, ``train.py`` for the initialisation, ``train.sh`` for the sizes), the LegNet
repository (GitHub autosome-ru/LegNet: ``legnet/``, and ``dream_ablation/`` plus
``models/optimized/params.json`` for the post-challenge optimised variant), and Penzar et
al., "LegNet: a best-in-class deep learning model for short DNA regulatory regions",
Bioinformatics 2023, doi:10.1093/bioinformatics/btad457. Plain single-device torch.

Input ``(B, 6, L)``, float, L = 150 as published (any length works: every conv is
"same"-padded and the head pools over positions): channels 0-3 one-hot bases (an N is 0.25
in all four), channel 4 is-reverse (1 for a reverse-complemented row), channel 5
is-singleton (1 when the measured value is an integer; 0 at prediction time). The order of
the four base channels is the input encoder's business; the network does not depend on it.

Network (published defaults of :class:`LegNetConfig`)::

    stem     Conv1d(6 -> 256, k7, no bias) - BN - SiLU
    6 blocks sizes 128, 128, 64, 64, 64, 64; block i maps c_in -> c_out:
             y = InvertedResidual(x)                        # c_in -> c_in
                 Conv1x1(c_in -> 4 c_out) - BN - SiLU       # "expand"
                 Conv k7, groups 4 c_out / 2 - BN - SiLU    # 2 filters per group
                 SqueezeExcite(4 c_out, reduced to c_in / 4)
                 Conv1x1(4 c_out -> c_in) - BN - SiLU
             x = Conv(cat[x, y]: 2 c_in -> c_out, k7) - BN - SiLU   # "resize"
    head     Conv1x1(64 -> 18, bias) - SiLU - mean over positions -> logits (B, 18)

The prediction is the soft-argmax ``sum_i i * softmax(logits)_i`` over bin values 0..17
(:meth:`LegNet.predict`); training fits ``log_softmax(logits)`` to a discretised Gaussian
around the measured value (the task's business, not the model's).

Squeeze-excitation, as published: mean over positions; Linear(4 c_out -> r) - SiLU -
Linear(r -> r); then the low-rank bilinear layer's r/2 outputs are concatenated to its r
inputs; SiLU - Linear(r + r/2 -> 4 c_out) - sigmoid; the channels are scaled by the result.
The reduced width r is the block's *input* width over 4 (c_in / 4), as in the original.

The bilinear layer (:class:`LowRankBilinear`) is plain torch, not tensorly-torch. The
original is ``tltorch.TRL((r, r), r/2, rank=0.5, bias=True)`` applied to the outer product
``x x^T``: a tensor regression with a CP-factorised weight ``W[i, j, k] = sum_q s_q A[i, q]
B[j, q] C[k, q]``, where tensorly sets the CP rank R from the fraction as
``round(0.5 * r * r * (r/2) / (2r + r/2))``. Contracting ``x x^T`` with that W is
``sum_q s_q (x . A_q)(x . B_q) C[k, q]``: the same function and the same parameters
(s, A, B, C and the bias: R + R(2r + r/2) + r/2 values), computed without forming the
(B, r, r) outer product or the (r, r, r/2) weight, and with no dependency on tensorly (whose
pinned versions lag torch). Its initialisation follows tltorch's CP ``normal_(std=0.00075)``
(weights s = 1, factors N(0, (0.00075 / sqrt(R))^(1/3))). tltorch leaves the TRL bias
uninitialised memory; here it starts at zero.

Initialisation (``init='published'``, from the team's ``train.py``): every Conv1d weight
N(0, sqrt(2 / (kernel * out_channels))), every Linear weight N(0, 0.001), biases 0,
BatchNorm weight 1 and bias 0; BatchNorm momentum 0.1.

Parameter count at the published configuration (measured by ``tests/models/test_legnet.py``):
1,852,846, the published figure exactly (of which the six bilinear layers hold 85,820).

The post-challenge optimised variant (LegNet repository, ``models/optimized/params.json``)
is a set of config choices, :meth:`LegNetConfig.optimised`: depthwise convolutions
(``filters_per_group=1``), the standard SE block (``se='standard'``: Linear - SiLU - Linear
- sigmoid), the expansion counted from the block's input (``expand_from='in'``), no
activation before the head's pooling (``head_activation='none'``) and PyTorch's default
initialisation (that code applies none of its own): 2,129,602 parameters (the wider
expansion of the first block outweighs the savings). It was trained with
Lion and bf16; those are optimiser and engine settings, not model ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..choices import check_choice_fields
from ..errors import ConfigError

_FIELD = "model.legnet."  # prefix of every config field named in an error message

SqueezeExciteKind = Literal["bilinear", "standard", "none"]
"""Squeeze-excitation inside each block: LegNet's with the low-rank bilinear layer, the plain one, or none."""
HeadActivation = Literal["silu", "none"]
"""Activation between the head's 1x1 conv and its pooling."""


def check_int(key: str, value: object, minimum: int) -> None:
    """A ConfigError naming ``key`` unless ``value`` is an integer >= ``minimum`` (a bool is not an integer)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{key} must be >= {minimum}, got {value}")


def check_int_tuple(key: str, value: object, minimum: int) -> tuple[int, ...]:
    """``value`` (a non-empty list or tuple of integers >= ``minimum``) as a tuple; else a ConfigError naming ``key``."""
    if not isinstance(value, (tuple, list)):
        raise ConfigError(f"{key} must be a list of integers, got {value!r}")
    if not value:
        raise ConfigError(f"{key} must not be empty")
    for index, item in enumerate(value):
        check_int(f"{key}[{index}]", item, minimum)
    return tuple(value)


def check_number(key: str, value: object, low: float, high: float) -> float:
    """``value`` as a float in [low, high); else a ConfigError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < high:
        raise ConfigError(f"{key} must be a number in [{low}, {high}), got {value!r}")
    return float(value)


@dataclass
class LegNetConfig:
    """LegNet's architecture; defaults are the published challenge model (1,852,846 parameters)."""

    in_channels: int = 6
    """Input channels: 4 one-hot bases + is-reverse + is-singleton (published: 6)."""
    stem_channels: int = 256
    """Output channels of the stem conv (published: 256)."""
    block_channels: tuple[int, ...] = (128, 128, 64, 64, 64, 64)
    """Output channels of each block, in order (published: 128, 128, 64, 64, 64, 64)."""
    kernel_size: int = 7
    """Kernel of the stem, the grouped convs and the resize convs; odd, 'same' padding (published: 7)."""
    expand_ratio: int = 4
    """Width of a block's inverted residual as a multiple of its output (or input, see expand_from) channels."""
    expand_from: Literal["out", "in"] = "out"
    """Expanded width = expand_ratio x the block's 'out' channels (published) or its 'in' channels (optimised)."""
    filters_per_group: int = 2
    """Filters per group of the inverted residual's k conv: 2 as published; 1 is depthwise (optimised)."""
    se: SqueezeExciteKind = "bilinear"
    """Squeeze-excitation: 'bilinear' (published), 'standard' (optimised) or 'none'."""
    se_reduction: int = 4
    """SE hidden width = the block's input channels // se_reduction (published: 4)."""
    bilinear_rank: float = 0.5
    """CP rank of the SE bilinear layer as a fraction of tensorly's 'same' rank (published: 0.5)."""
    bins: int = 18
    """Expression bins, i.e. logits; the prediction is the soft-argmax over bin values 0..bins-1 (published: 18)."""
    head_activation: HeadActivation = "silu"
    """Activation between the head's 1x1 conv and its pooling: 'silu' (published) or 'none' (optimised)."""
    bn_momentum: float = 0.1
    """BatchNorm momentum of every BatchNorm (published: 0.1, PyTorch's default)."""
    init: Literal["published", "torch"] = "published"
    """Initialisation: 'published' (the team's train.py) or 'torch' (module defaults, as the optimised variant)."""

    def __post_init__(self) -> None:
        check_choice_fields(self, _FIELD.rstrip("."))
        self.block_channels = check_int_tuple(f"{_FIELD}block_channels", self.block_channels, 1)
        for name, minimum in (
            ("in_channels", 1),
            ("stem_channels", 1),
            ("kernel_size", 1),
            ("expand_ratio", 1),
            ("filters_per_group", 1),
            ("se_reduction", 1),
            ("bins", 2),
        ):
            check_int(f"{_FIELD}{name}", getattr(self, name), minimum)
        if self.kernel_size % 2 == 0:
            # 'same' padding of an even kernel is lopsided; the published kernels are odd.
            raise ConfigError(f"{_FIELD}kernel_size must be odd, got {self.kernel_size}")
        rank = self.bilinear_rank
        if isinstance(rank, bool) or not isinstance(rank, (int, float)) or not 0 < rank < math.inf:
            raise ConfigError(f"{_FIELD}bilinear_rank must be a positive number, got {rank!r}")
        self.bilinear_rank = float(rank)
        momentum = self.bn_momentum
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1:
            raise ConfigError(f"{_FIELD}bn_momentum must be a number in [0, 1], got {momentum!r}")
        self.bn_momentum = float(momentum)
        # The SE hidden width comes from each block's input; the bilinear layer needs two of them.
        smallest = {"bilinear": 2, "standard": 1, "none": 0}[self.se]
        inputs = (self.stem_channels, *self.block_channels[:-1])
        for index, (c_in, c_out) in enumerate(zip(inputs, self.block_channels)):
            if c_in // self.se_reduction < smallest:
                raise ConfigError(
                    f"{_FIELD}se_reduction ({self.se_reduction}) leaves block {index} (input {c_in} channels) an SE "
                    f"hidden width below {smallest}; lower it or widen the block's input"
                )
            inner = self.expanded_width(c_in, c_out)
            if inner % self.filters_per_group:
                raise ConfigError(
                    f"{_FIELD}filters_per_group ({self.filters_per_group}) must divide the expanded width of "
                    f"block {index} ({inner})"
                )

    def expanded_width(self, c_in: int, c_out: int) -> int:
        """Channels inside the inverted residual of a block mapping ``c_in`` to ``c_out`` channels."""
        return self.expand_ratio * (c_out if self.expand_from == "out" else c_in)

    @classmethod
    def optimised(cls) -> LegNetConfig:
        """The post-challenge optimised variant: depthwise convs, standard SE, no head activation, torch init."""
        return cls(filters_per_group=1, se="standard", expand_from="in", head_activation="none", init="torch")


# ---------------------------------------------------------------- building blocks


def conv_bn_silu(c_in: int, c_out: int, kernel_size: int, bn_momentum: float, groups: int = 1) -> nn.Sequential:
    """Conv1d (no bias, 'same' padding) - BatchNorm - SiLU: LegNet's stem, resize and inner convs."""
    return nn.Sequential(
        # No bias: BatchNorm's shift follows.
        nn.Conv1d(c_in, c_out, kernel_size, padding="same", groups=groups, bias=False),
        nn.BatchNorm1d(c_out, momentum=bn_momentum),
        nn.SiLU(),
    )


def bilinear_cp_rank(features: int, outputs: int, fraction: float) -> int:
    """tensorly's CP rank for an (features, features, outputs) weight at ``fraction`` of its 'same' rank, at least 1.

    tensorly's ``validate_cp_rank`` rounds ``fraction * prod(shape) / sum(shape)`` half to
    even, as Python's ``round`` does.
    """
    shape = (features, features, outputs)
    return max(1, round(fraction * math.prod(shape) / sum(shape)))


class LowRankBilinear(nn.Module):
    """Low-rank bilinear map (B, n) -> (B, m): ``y_k = sum_q s_q (x . A_q)(x . B_q) C_kq + b_k``.

    The function and parameters of tltorch's CP tensor regression layer on ``x x^T`` (module
    docstring), with rank :func:`bilinear_cp_rank`.
    """

    def __init__(self, features: int, outputs: int, rank_fraction: float):
        super().__init__()
        rank = bilinear_cp_rank(features, outputs, rank_fraction)
        self.rank = rank
        self.scale = nn.Parameter(torch.empty(rank))
        self.left = nn.Parameter(torch.empty(features, rank))
        self.right = nn.Parameter(torch.empty(features, rank))
        self.out = nn.Parameter(torch.empty(outputs, rank))
        self.bias = nn.Parameter(torch.empty(outputs))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.00075) -> None:
        """tltorch's CP ``normal_(std)``: unit weights, factors sized so the full weight has about ``std``."""
        factor_std = (std / math.sqrt(self.rank)) ** (1 / 3)
        with torch.no_grad():
            self.scale.fill_(1.0)
            for factor in (self.left, self.right, self.out):
                factor.normal_(0.0, factor_std)
            self.bias.zero_()

    def full_weight(self) -> torch.Tensor:
        """The (n, n, m) weight the factors stand for (for checks; the forward pass never builds it)."""
        return torch.einsum("q,iq,jq,kq->ijk", self.scale, self.left, self.right, self.out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x @ self.left) * (x @ self.right) * self.scale) @ self.out.t() + self.bias


class SqueezeExcite(nn.Module):
    """Channel gates from the mean over positions; (B, C, L) -> (B, C, L).

    ``kind='bilinear'``: Linear(C -> r) - SiLU - Linear(r -> r) - [x, bilinear(x)] - SiLU -
    Linear(r + r // 2 -> C) - sigmoid (LegNet). ``kind='standard'``: Linear(C -> r) - SiLU -
    Linear(r -> C) - sigmoid.
    """

    def __init__(self, channels: int, reduced: int, kind: Literal["bilinear", "standard"], rank_fraction: float):
        super().__init__()
        self.squeeze = nn.Linear(channels, reduced)
        if kind == "bilinear":
            self.mix = nn.Linear(reduced, reduced)
            self.bilinear = LowRankBilinear(reduced, reduced // 2, rank_fraction)
            gate_inputs = reduced + reduced // 2
        else:
            self.mix = None
            self.bilinear = None
            gate_inputs = reduced
        self.excite = nn.Linear(gate_inputs, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.squeeze(x.mean(dim=-1)))
        if self.bilinear is not None:
            h = self.mix(h)
            h = F.silu(torch.cat([h, self.bilinear(h)], dim=-1))
        return x * torch.sigmoid(self.excite(h)).unsqueeze(-1)


class InvertedResidual(nn.Module):
    """EfficientNetV2-like: 1x1 expand - grouped k conv - SE - 1x1 back to the input width; (B, C, L) -> (B, C, L)."""

    def __init__(self, c_in: int, inner: int, config: LegNetConfig):
        super().__init__()
        self.expand = conv_bn_silu(c_in, inner, 1, config.bn_momentum)
        self.spatial = conv_bn_silu(
            inner, inner, config.kernel_size, config.bn_momentum, groups=inner // config.filters_per_group
        )
        reduced = c_in // config.se_reduction  # the block's input width, as published
        self.se = (
            nn.Identity() if config.se == "none" else SqueezeExcite(inner, reduced, config.se, config.bilinear_rank)
        )
        self.project = conv_bn_silu(inner, c_in, 1, config.bn_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.se(self.spatial(self.expand(x))))


class LegNetBlock(nn.Module):
    """One LegNet block: the inverted residual's output concatenated to its input, then a k conv resize."""

    def __init__(self, c_in: int, c_out: int, config: LegNetConfig):
        super().__init__()
        self.residual = InvertedResidual(c_in, config.expanded_width(c_in, c_out), config)
        self.resize = conv_bn_silu(2 * c_in, c_out, config.kernel_size, config.bn_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resize(torch.cat([x, self.residual(x)], dim=1))


class LegNetCore(nn.Module):
    """The block stack: (B, in_channels, L) -> (B, block_channels[-1], L).

    Reads the block fields of ``config`` (block_channels, kernel_size, expand_ratio,
    expand_from, filters_per_group, se, se_reduction, bilinear_rank, bn_momentum); the
    input width is given, so other first blocks can feed it (Prix Fixe's DREAM-CNN).
    """

    def __init__(self, in_channels: int, config: LegNetConfig):
        super().__init__()
        widths = (in_channels, *config.block_channels)
        self.blocks = nn.Sequential(*(LegNetBlock(c_in, c_out, config) for c_in, c_out in pairwise(widths)))
        self.out_channels = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class BinHead(nn.Module):
    """LegNet's head: 1x1 conv to one channel per bin, optional SiLU, mean over positions -> logits (B, bins)."""

    def __init__(self, in_channels: int, bins: int, activation: HeadActivation):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, bins, 1)
        self.activation = nn.SiLU() if activation == "silu" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.conv(x)).mean(dim=-1)


def soft_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Expected bin value under softmax(logits): (..., bins) -> (...), float32, bin values 0..bins-1."""
    probabilities = torch.softmax(logits.float(), dim=-1)
    values = torch.arange(logits.shape[-1], device=logits.device, dtype=torch.float32)
    return probabilities @ values


def published_init_(module: nn.Module) -> None:
    """The team's initialisation, in place, on every submodule of ``module`` (module docstring)."""
    for child in module.modules():
        if isinstance(child, nn.Conv1d):
            nn.init.normal_(child.weight, 0.0, math.sqrt(2.0 / (child.kernel_size[0] * child.out_channels)))
            if child.bias is not None:
                nn.init.zeros_(child.bias)
        elif isinstance(child, nn.BatchNorm1d):
            nn.init.ones_(child.weight)
            nn.init.zeros_(child.bias)
        elif isinstance(child, nn.Linear):
            nn.init.normal_(child.weight, 0.0, 0.001)
            if child.bias is not None:
                nn.init.zeros_(child.bias)
        elif isinstance(child, LowRankBilinear):
            child.reset_parameters()


def check_input(x: torch.Tensor, channels: int, model: str) -> None:
    """A ValueError unless ``x`` is a float (batch, channels, length) tensor."""
    if x.dim() != 3 or x.shape[1] != channels or not x.is_floating_point():
        raise ValueError(
            f"{model} expects a float tensor of shape (batch, {channels}, length), "
            f"got {x.dtype} {tuple(x.shape)}"
        )


class LegNet(nn.Module):
    """LegNet: encoded bases (B, in_channels, L) -> bin logits (B, bins); :meth:`predict` gives the value."""

    def __init__(self, config: LegNetConfig):
        super().__init__()
        self.config = config
        self.stem = conv_bn_silu(config.in_channels, config.stem_channels, config.kernel_size, config.bn_momentum)
        self.core = LegNetCore(config.stem_channels, config)
        self.head = BinHead(self.core.out_channels, config.bins, config.head_activation)
        if config.init == "published":
            published_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encoded bases (B, in_channels, L), float -> logits (B, bins), float32 even under autocast."""
        check_input(x, self.config.in_channels, "LegNet")
        # Engines that cast the weights (DeepSpeed fp16) hand in float32 inputs: follow the weights.
        x = x.to(self.stem[0].weight.dtype)
        return self.head(self.core(self.stem(x))).float()

    @staticmethod
    def predict(logits: torch.Tensor) -> torch.Tensor:
        """The prediction: soft-argmax over bin values 0..bins-1, (B, bins) -> (B,) float32."""
        return soft_argmax(logits)
