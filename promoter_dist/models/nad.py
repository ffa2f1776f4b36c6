"""Team NAD's model: frozen GloVe words -> 1-D CNN + FPN -> one transformer per level.

Sources: Team NAD's DREAM 2022 challenge report ("Predicting gene expression using
millions of random promoter sequences", with its model figure) and the team's published
code (GitHub de-Boer-Lab/random-promoter-dream-challenge-2022, ``dream_submissions/``);
the challenge: Rafi et al., Nature Biotechnology 2024, doi:10.1038/s41587-024-02414-w.
The team's ``Util/SimpleViTModel.py`` builds its transformers with x-transformers, pinned
at 0.28.4 (GitHub lucidrains/x-transformers): ``Encoder(dim=256, depth, heads=8,
rel_pos_bias=True, sandwich_norm=True)``; the layer choices below are that library's at
that version.
Plain single-device torch: no distributed-training code, no global state; runs under
``torch.autocast`` (bf16 on CPU is tested) and traces as one graph under
``torch.compile`` (checked with ``fullgraph=True`` on the ``aot_eager`` backend).

Data flow for a batch of word ids ``(B, 80)`` (the 5-mer words of
:mod:`promoter_dist.data.nad_words`; the task hands the model their vocabulary size):

1. Frozen GloVe lookup, ``(1024, 128)`` table -> ``(B, 128, 80)``. The table is a
   persistent buffer, not a parameter, so no optimizer (or optimizer-state
   partitioning) ever sees it, yet it is saved with the weights.
2. Five conv stages, each ``Conv1d k3`` (no bias) + BatchNorm + ELU followed by two
   residual blocks (conv3-BN-ELU-conv3-BN, add the input, ELU). Channels / strides /
   lengths 128/1/80, 160/1/80, 192/2/40, 224/2/20, 256/2/10.
3. FPN top-down over the last four stages (lengths 80, 40, 20, 10): a 1x1 lateral
   conv (with bias) maps each stage to 256 channels; starting from the shortest
   level, each longer level is its lateral plus the level below it upsampled by a
   ``ConvTranspose1d(256, 256, k3, stride 2, padding 1, output_padding 1)``, whose
   output length is (L - 1) * 2 - 2 + 3 + 1 = 2L exactly. No 3x3 smoothing convs:
   the published description lists none, and they would add 0.79M parameters past the
   published size.
4. The original's quirk, kept: the three longer levels pass a depthwise
   ``Conv1d k3`` + BatchNorm + ELU applied to the ``(B, L, 256)`` layout, so the L
   positions are the conv's channels and the kernel slides along the 256 features.
   Its sizes therefore depend on the level's length (80, 40, 20). The conv has a bias
   (published; ``positional_depthwise_bias``).
5. One transformer encoder per level, width 256, 8 heads; depths 3, 3, 2, 2 for
   levels 10, 20, 40, 80. Each layer has sandwich norm: LayerNorm before *and* after
   each sublayer, the residual added after the second one:
   ``x = x + LN(attn(LN(x)))``; ``x = x + LN(ff(LN(x)))``. Feed-forward is
   Linear(256, 1024) - GELU - Linear(1024, 256), both with bias. Attention: head width
   64 (inner 512), q, k, v and output projections without bias (``attention_bias``),
   scores ``q . k / 8`` plus a relative position bias (``position_bias``):

   - ``'t5_shared'`` (published): ONE T5-style table per encoder, shared by its
     layers: 32 buckets x 8 heads, bidirectional (16 buckets per direction: offsets
     below 8 exact, then log-spaced up to 128, beyond that the last bucket), entries
     N(0, 1) (an ``nn.Embedding``) multiplied by 8 = sqrt(head width).
   - ``'exact_per_layer'``: one learned scalar per head per exact offset ``j - i`` in
     ``-(L-1) .. L-1``, a ``(heads, 2L - 1)`` table per layer initialised N(0, 0.02^2)
     (small but non-zero, so that it breaks permutation symmetry from the start).
6. Per level: final LayerNorm, mean over positions, Linear(256, 1). ``forward``
   returns the four level predictions ``(B, 4)`` ordered like ``depths`` (shortest
   level first); the prediction is their mean (:meth:`NADModel.combine`). All four
   are trained on the same label (as published).

Parameter count (published configuration, measured by ``tests/models/test_nad.py``):
14,176,716 trainable parameters, the count of the team's definition built with
x-transformers 0.28.4. The frozen embedding (1024 x 128 = 131,072 values) is a buffer
and is *not* counted (with it: 14,307,788); BatchNorm running statistics are buffers too.
Breakdown: backbone 2,848,128; FPN 804,608; depthwise quirk 840; transformers 10,522,112
(1,051,904 per layer, 256 per encoder's bias table, 512 per final LayerNorm); heads 1,028.

The other variant (``position_bias='exact_per_layer'``, ``attention_bias=True``,
``positional_depthwise_bias=False``) has 14,183,312: per-layer exact-offset tables
(8 x (2L - 1): 152 to 1,272 each) instead of four shared ones, a bias on the attention
output, none on the depthwise convs. ``configs/nad/debug.yaml`` selects it: its learning
rate was tuned with it.

Dropout: the report mentions none, so the default is 0.

A small debug configuration (601,996 parameters; 602,784 in the earlier variant) for
fast tests::

    NADConfig(channels=(32, 48, 64, 80, 96), fpn_dim=64, heads=4, head_dim=16,
              depths=(1, 1, 1, 1))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..choices import check_choice_fields
from ..errors import ConfigError, UserError

_FIELD = "model.nad."  # prefix of every config field named in an error message

#: Words in NAD's vocabulary, the 4^5 5-mers over ACGT: the default of ``num_words``. The words
#: themselves are data (:mod:`promoter_dist.data.nad_words`); the task passes their count.
DEFAULT_NUM_WORDS = 1024


def _check_int(name: str, value: object, minimum: int) -> None:
    # bool is an int subclass; a stray True in a config file is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{_FIELD}{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{_FIELD}{name} must be >= {minimum}, got {value}")


@dataclass
class NADConfig:
    """NAD's architecture; defaults are the published configuration."""

    embed_dim: int = 128
    """Width of the GloVe word vectors; the embedding table is (1024, embed_dim)."""
    length: int = 80
    """Words per row (80: one per random-region position); must be divisible by the product of ``strides``."""
    channels: tuple[int, ...] = (128, 160, 192, 224, 256)
    """Output channels of each conv stage, in order."""
    strides: tuple[int, ...] = (1, 1, 2, 2, 2)
    """Stride of each conv stage's first conv (one entry per stage)."""
    residual_blocks: int = 2
    """Residual blocks (conv3-BN-ELU-conv3-BN + skip, ELU) per conv stage."""
    fpn_dim: int = 256
    """Channels of every FPN level, which is also the width of the transformers."""
    positional_depthwise: bool = True
    """Depthwise conv + BN + ELU with positions as channels on all but the shortest level (NAD's quirk)."""
    positional_depthwise_bias: bool = True
    """Bias on those depthwise convs (published: yes, although BatchNorm follows)."""
    heads: int = 8
    """Attention heads per transformer layer."""
    head_dim: int | None = 64
    """Width of one attention head; None means fpn_dim // heads. 64 matches the published size (module docstring)."""
    depths: tuple[int, ...] = (3, 3, 2, 2)
    """Transformer layers per FPN level, shortest (10 positions) first; levels come from the last stages."""
    ff_mult: int = 4
    """Feed-forward hidden width as a multiple of fpn_dim."""
    dropout: float = 0.0
    """Dropout on attention weights and feed-forward hidden units; 0 as published (none is reported)."""
    position_bias: Literal["t5_shared", "exact_per_layer"] = "t5_shared"
    """Relative position bias: 't5_shared' (published: T5 buckets, one table per encoder) or 'exact_per_layer' (one table of exact offsets per layer)."""
    position_buckets: int = 32
    """'t5_shared': buckets, half per direction, the nearer half of each exact (published: 32)."""
    position_max_distance: int = 128
    """'t5_shared': offset at which the log-spaced buckets end; longer offsets share the last one (published: 128)."""
    attention_bias: bool = False
    """Bias on the attention output projection (published: none; q, k and v never have one)."""

    def __post_init__(self) -> None:
        check_choice_fields(self, _FIELD.rstrip("."))
        # Config files give lists; store tuples so configs compare and hash-print alike.
        for name in ("channels", "strides", "depths"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)):
                raise ConfigError(f"{_FIELD}{name} must be a list of integers, got {value!r}")
            if not value:
                raise ConfigError(f"{_FIELD}{name} must not be empty")
            for index, item in enumerate(value):
                _check_int(f"{name}[{index}]", item, 1)
            setattr(self, name, tuple(value))
        for name, minimum in (
            ("embed_dim", 1),
            ("length", 1),
            ("residual_blocks", 0),
            ("fpn_dim", 1),
            ("heads", 1),
            ("ff_mult", 1),
            ("position_buckets", 4),
            ("position_max_distance", 1),
        ):
            _check_int(name, getattr(self, name), minimum)
        if self.position_max_distance <= self.position_buckets // 4:
            # Buckets below buckets // 4 are exact offsets; the log-spaced ones must start beyond them.
            raise ConfigError(
                f"{_FIELD}position_max_distance ({self.position_max_distance}) must exceed "
                f"position_buckets // 4 ({self.position_buckets // 4})"
            )
        if self.head_dim is None:
            if self.fpn_dim % self.heads:
                raise ConfigError(
                    f"{_FIELD}heads must divide fpn_dim when head_dim is null "
                    f"(heads {self.heads}, fpn_dim {self.fpn_dim}); or set head_dim"
                )
        else:
            _check_int("head_dim", self.head_dim, 1)
        for name in ("positional_depthwise", "positional_depthwise_bias", "attention_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{_FIELD}{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"{_FIELD}dropout must be a number in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        if len(self.strides) != len(self.channels):
            raise ConfigError(
                f"{_FIELD}strides must have one entry per conv stage: "
                f"{len(self.strides)} strides for {len(self.channels)} channels"
            )
        levels = len(self.depths)
        if levels > len(self.channels):
            raise ConfigError(
                f"{_FIELD}depths has {levels} FPN levels but there are only {len(self.channels)} conv stages"
            )
        # Each level is upsampled x2 into the next longer one by a stride-2 transposed conv.
        level_strides = self.strides[len(self.strides) - levels + 1 :]
        if any(s != 2 for s in level_strides):
            raise ConfigError(
                f"{_FIELD}strides: the last {levels - 1} stages feed FPN levels and must have stride 2, "
                f"got {list(level_strides)}"
            )
        total = math.prod(self.strides)
        if self.length % total:
            raise ConfigError(f"{_FIELD}length ({self.length}) must be divisible by the product of strides ({total})")

    @property
    def stage_lengths(self) -> tuple[int, ...]:
        """Positions after each conv stage (published: 80, 80, 40, 20, 10)."""
        lengths, length = [], self.length
        for stride in self.strides:
            length //= stride
            lengths.append(length)
        return tuple(lengths)

    @property
    def level_lengths(self) -> tuple[int, ...]:
        """Positions of each FPN level, shortest first (published: 10, 20, 40, 80)."""
        return tuple(reversed(self.stage_lengths[len(self.stage_lengths) - len(self.depths) :]))

    @property
    def attention_head_dim(self) -> int:
        """The width of one attention head as used."""
        return self.head_dim if self.head_dim is not None else self.fpn_dim // self.heads


# ---------------------------------------------------------------- backbone


def _conv3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv1d:
    # No bias: every such conv is followed by BatchNorm, whose shift makes a bias redundant.
    return nn.Conv1d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class ResidualBlock(nn.Module):
    """conv3-BN-ELU-conv3-BN, add the input, ELU."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = _conv3(channels, channels)
        self.bn1 = nn.BatchNorm1d(channels)
        self.conv2 = _conv3(channels, channels)
        self.bn2 = nn.BatchNorm1d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.elu(self.bn1(self.conv1(x)))
        return F.elu(x + self.bn2(self.conv2(y)))


class ConvStage(nn.Module):
    """Conv1d k3 (strided) + BN + ELU, then residual blocks; (B, C_in, L) -> (B, C_out, L / stride)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, blocks: int):
        super().__init__()
        self.conv = _conv3(in_channels, out_channels, stride)
        self.bn = nn.BatchNorm1d(out_channels)
        self.blocks = nn.Sequential(*(ResidualBlock(out_channels) for _ in range(blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(F.elu(self.bn(self.conv(x))))


class FeaturePyramid(nn.Module):
    """Top-down FPN: 1x1 laterals plus x2 transposed-conv upsampling, shortest level first."""

    def __init__(self, in_channels: tuple[int, ...], dim: int):
        """``in_channels``: channels of the stages feeding the levels, shortest level first."""
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv1d(c, dim, 1) for c in in_channels)
        # (L - 1) * 2 - 2 * padding + kernel + output_padding = 2L: lengths come out exact.
        self.upsample = nn.ModuleList(
            nn.ConvTranspose1d(dim, dim, 3, stride=2, padding=1, output_padding=1) for _ in in_channels[1:]
        )

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """``features``: stage outputs (B, C_i, L_i), shortest first -> levels (B, dim, L_i)."""
        levels = [self.lateral[0](features[0])]
        for lateral, upsample, feature in zip(self.lateral[1:], self.upsample, features[1:]):
            levels.append(lateral(feature) + upsample(levels[-1]))
        return levels


class PositionDepthwise(nn.Module):
    """Depthwise Conv1d k3 + BN + ELU with the positions as channels (NAD's quirk).

    Takes and returns the transformer layout (B, L, D): each of the L positions is a
    conv channel whose kernel slides along the D features, and BatchNorm normalises
    per position. The module is therefore tied to one length L.
    """

    def __init__(self, length: int, bias: bool = True):
        super().__init__()
        self.conv = nn.Conv1d(length, length, 3, padding=1, groups=length, bias=bias)
        self.bn = nn.BatchNorm1d(length)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(self.bn(self.conv(x)))


# ---------------------------------------------------------------- transformers


class ExactOffsetBias(nn.Module):
    """A learned scalar per head per exact relative offset j - i, added to attention logits."""

    def __init__(self, heads: int, length: int):
        super().__init__()
        self.table = nn.Parameter(torch.empty(heads, 2 * length - 1))
        # Small but non-zero: a zero table would leave attention permutation-equivariant.
        nn.init.normal_(self.table, std=0.02)
        positions = torch.arange(length)
        # offsets[i, j] = j - i, shifted to index the table from 0.
        offsets = positions[None, :] - positions[:, None] + (length - 1)
        self.register_buffer("offsets", offsets, persistent=False)  # derived, not state

    def forward(self) -> torch.Tensor:
        """The bias (heads, L, L) for queries i (rows) and keys j (columns)."""
        return self.table[:, self.offsets]


def t5_buckets(offsets: torch.Tensor, buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bidirectional bucket of each key-minus-query offset (x-transformers 0.28.4's rule).

    Keys after the query use the upper half of the buckets, the others the lower half. Within
    a half of h buckets, distances below h / 2 have a bucket each; longer ones share
    log-spaced buckets up to ``max_distance``, beyond which all fall in the last.
    """
    half = buckets // 2
    exact = half // 2
    distance = offsets.abs()
    # Clamped below at 1: log(0) would only feed entries that torch.where discards.
    log_spaced = exact + (
        torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact) * (half - exact)
    ).long()
    within_half = torch.where(distance < exact, distance, log_spaced.clamp(max=half - 1))
    return (offsets > 0).long() * half + within_half


class BucketedPositionBias(nn.Module):
    """T5-style relative position bias: a learned (buckets, heads) table, scaled, added to attention logits.

    As in x-transformers 0.28.4 (``rel_pos_bias=True``): the table is an embedding with
    N(0, 1) entries and its values are multiplied by ``scale`` (sqrt of the head width).
    """

    def __init__(self, heads: int, length: int, buckets: int, max_distance: int, scale: float):
        super().__init__()
        self.scale = scale
        self.table = nn.Parameter(torch.empty(buckets, heads))
        nn.init.normal_(self.table)  # nn.Embedding's initialisation
        positions = torch.arange(length)
        offsets = positions[None, :] - positions[:, None]  # key j minus query i
        self.register_buffer("buckets", t5_buckets(offsets, buckets, max_distance), persistent=False)

    def forward(self) -> torch.Tensor:
        """The bias (heads, L, L) for queries i (rows) and keys j (columns)."""
        return self.table[self.buckets].permute(2, 0, 1) * self.scale


class RelativeSelfAttention(nn.Module):
    """Multi-head self-attention with a relative position bias; (B, L, D) -> (B, L, D).

    With ``length`` the module owns an :class:`ExactOffsetBias` for that length; without,
    the bias (heads, L, L) is passed to :meth:`forward` (an encoder's shared table).
    """

    def __init__(
        self, dim: int, heads: int, head_dim: int, dropout: float, out_bias: bool = True, length: int | None = None
    ):
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, head_dim, dropout
        self.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=False)
        self.out = nn.Linear(heads * head_dim, dim, bias=out_bias)
        self.position_bias = ExactOffsetBias(heads, length) if length is not None else None

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, L, D); ``position_bias`` (heads, L, L), required when the module owns none."""
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.position_bias is not None:
            position_bias = self.position_bias()
        if position_bias is None:
            raise ValueError("RelativeSelfAttention owns no position bias: pass one to forward")
        # Under autocast q is bf16 while the table is float32; the mask must match q.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=position_bias.to(q.dtype), dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim))


class SandwichLayer(nn.Module):
    """Transformer layer with sandwich norm: x += LN(attn(LN(x))); x += LN(ff(LN(x))).

    ``length`` gives the layer its own exact-offset position bias; without it the bias is
    passed to :meth:`forward`.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        ff_mult: int,
        dropout: float,
        *,
        length: int | None = None,
        attention_bias: bool = True,
    ):
        super().__init__()
        self.attn_norm_in = nn.LayerNorm(dim)
        self.attn = RelativeSelfAttention(dim, heads, head_dim, dropout, out_bias=attention_bias, length=length)
        self.attn_norm_out = nn.LayerNorm(dim)
        self.ff_norm_in = nn.LayerNorm(dim)
        self.ff = nn.Sequential(
            nn.Linear(dim, ff_mult * dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(ff_mult * dim, dim),
        )
        self.ff_norm_out = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn_norm_out(self.attn(self.attn_norm_in(x), position_bias))
        return x + self.ff_norm_out(self.ff(self.ff_norm_in(x)))


class LevelEncoder(nn.Module):
    """One FPN level's transformer and head: (B, L, D) -> (B,) prediction."""

    def __init__(self, config: NADConfig, length: int, depth: int):
        super().__init__()
        dim, head_dim = config.fpn_dim, config.attention_head_dim
        shared = config.position_bias == "t5_shared"
        # One table for all layers (published), or one per layer kept inside each layer's attention.
        self.position_bias = (
            BucketedPositionBias(
                config.heads, length, config.position_buckets, config.position_max_distance, math.sqrt(head_dim)
            )
            if shared
            else None
        )
        self.layers = nn.ModuleList(
            SandwichLayer(
                dim,
                config.heads,
                head_dim,
                config.ff_mult,
                config.dropout,
                length=None if shared else length,
                attention_bias=config.attention_bias,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The transformer layers and the final LayerNorm, (B, L, D) -> (B, L, D)."""
        shared_bias = self.position_bias() if self.position_bias is not None else None
        for layer in self.layers:
            x = layer(x, shared_bias)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(x).mean(dim=1)).squeeze(-1)


# ---------------------------------------------------------------- model


def random_embedding(dim: int, seed: int = 0, num_words: int = DEFAULT_NUM_WORDS) -> torch.Tensor:
    """A deterministic (num_words, dim) stand-in for GloVe vectors (tests, smoke runs)."""
    generator = torch.Generator().manual_seed(seed)
    # Scale 0.3: about the standard deviation of NAD's published vectors (0.32).
    return 0.3 * torch.randn(num_words, dim, generator=generator)


class NADModel(nn.Module):
    """NAD's model: word ids (B, length) -> per-level predictions (B, levels).

    ``embedding`` is the (num_words, embed_dim) GloVe table in word-id order (the
    regression task reads it with :func:`promoter_dist.data.glove.load_embedding_tensor`);
    None gives :func:`random_embedding`. It is kept frozen as the persistent buffer
    ``embedding``. ``num_words`` is the vocabulary size, which the task takes from
    :mod:`promoter_dist.data.nad_words` (1,024).
    """

    def __init__(
        self, config: NADConfig, embedding: torch.Tensor | None = None, num_words: int = DEFAULT_NUM_WORDS
    ):
        super().__init__()
        self.config = config
        if embedding is None:
            embedding = random_embedding(config.embed_dim, num_words=num_words)
        if not isinstance(embedding, torch.Tensor) or tuple(embedding.shape) != (num_words, config.embed_dim):
            shape = tuple(embedding.shape) if isinstance(embedding, torch.Tensor) else type(embedding).__name__
            raise UserError(
                f"NAD embedding must be a ({num_words}, {config.embed_dim}) tensor "
                f"(model.nad.embed_dim), got {shape}"
            )
        if not embedding.is_floating_point():
            raise UserError(f"NAD embedding must be a float tensor, got {embedding.dtype}")
        self.register_buffer("embedding", embedding.detach().to(torch.float32).clone(), persistent=True)

        stages, in_channels = [], config.embed_dim
        for out_channels, stride in zip(config.channels, config.strides):
            stages.append(ConvStage(in_channels, out_channels, stride, config.residual_blocks))
            in_channels = out_channels
        self.stages = nn.ModuleList(stages)

        levels = len(config.depths)
        self.fpn = FeaturePyramid(tuple(reversed(config.channels[len(config.channels) - levels :])), config.fpn_dim)
        lengths = config.level_lengths
        self.position_depthwise = nn.ModuleList(
            PositionDepthwise(length, config.positional_depthwise_bias)
            if index > 0 and config.positional_depthwise
            else nn.Identity()
            for index, length in enumerate(lengths)
        )
        self.encoders = nn.ModuleList(
            LevelEncoder(config, length, depth) for length, depth in zip(lengths, config.depths)
        )

    def forward(self, words: torch.Tensor) -> torch.Tensor:
        """Word ids (B, length), any integer dtype -> predictions (B, levels), float32.

        Columns follow ``config.depths`` (shortest level first). The output is
        float32 even under autocast so that the loss is computed in full precision.
        """
        if words.dim() != 2 or words.shape[1] != self.config.length:
            raise ValueError(
                f"NAD model expects word ids of shape (batch, {self.config.length}), got {tuple(words.shape)}"
            )
        # The frozen table is a buffer: engines that cast only parameters (DeepSpeed bf16) leave it in
        # fp32, so the lookup follows the weights' dtype.
        dtype = next(self.parameters()).dtype
        x = F.embedding(words.long(), self.embedding).to(dtype).transpose(1, 2)  # (B, embed_dim, L)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        levels = len(self.encoders)
        pyramid = self.fpn(features[::-1][:levels])
        predictions = [
            encoder(mix(level.transpose(1, 2)))  # transformer layout (B, L, D)
            for level, mix, encoder in zip(pyramid, self.position_depthwise, self.encoders)
        ]
        return torch.stack(predictions, dim=1).float()

    @staticmethod
    def combine(heads: torch.Tensor) -> torch.Tensor:
        """The prediction: the mean of the level predictions, (B, levels) -> (B,)."""
        return heads.mean(dim=-1)

