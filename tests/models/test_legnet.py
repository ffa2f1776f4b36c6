"""LegNet: published and optimised sizes, block shapes, the bilinear SE layer against the tensor
regression it stands for, soft-argmax, initialisation, determinism, gradients, bf16 autocast and
config errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from promoter_dist.errors import ConfigError
from promoter_dist.models.common import count_parameters
from promoter_dist.models.legnet import (
    LegNet,
    LegNetBlock,
    LegNetConfig,
    LowRankBilinear,
    SqueezeExcite,
    bilinear_cp_rank,
    soft_argmax,
)

PUBLISHED_SIZE = 1_852_846  # autosome.org's challenge model (models.md, "The winner: LegNet")
TINY = {"stem_channels": 16, "block_channels": (16, 8), "kernel_size": 3}


def encoded(batch: int, length: int = 150, seed: int = 0) -> torch.Tensor:
    """A batch shaped like the loader's: one-hot bases (an N as 0.25s), is-reverse, is-singleton."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 5, (batch, length), generator=generator)
    bases = F.one_hot(codes, 5)[..., :4].float()
    bases[codes == 4] = 0.25
    flags = torch.randint(0, 2, (batch, 2, 1), generator=generator).float().expand(batch, 2, length)
    return torch.cat([bases.transpose(1, 2), flags], dim=1)


def soft_targets(values: torch.Tensor, bins: int = 18) -> torch.Tensor:
    """LegNet's training target, N(y + 0.5, 0.5) over unit bins (the task's own, tested against scipy there)."""
    from promoter_dist.tasks.soft_classification import soft_targets as task_targets

    return task_targets(values, bins, shift=0.5, scale=0.5)


def parameters_without_gradient(model: torch.nn.Module) -> list[str]:
    """Names of the parameters a backward pass left without a finite, non-zero gradient."""
    return [name for name, p in model.named_parameters()
            if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum() > 0]


@pytest.fixture(scope="module")
def published() -> LegNet:
    torch.manual_seed(0)
    return LegNet(LegNetConfig())


def test_published_parameter_count(published: LegNet) -> None:
    count = count_parameters(published, trainable_only=True)
    print(f"LegNet published configuration: {count:,} trainable parameters")
    assert count == PUBLISHED_SIZE
    assert count_parameters(published, trainable_only=False) == count
    assert len(published.core.blocks) == 6
    # tensorly's CP rank at fraction 0.5 for each block's (r, r, r/2) weight, r = block input / 4.
    ranks = [m.rank for m in published.modules() if isinstance(m, LowRankBilinear)]
    assert ranks == [410, 102, 102, 26, 26, 26]
    bilinear = sum(p.numel() for m in published.modules() if isinstance(m, LowRankBilinear) for p in m.parameters())
    assert bilinear == 85_820  # the module docstring's figure


def test_optimised_variant() -> None:
    torch.manual_seed(0)
    model = LegNet(LegNetConfig.optimised())
    count = count_parameters(model, trainable_only=True)
    print(f"LegNet optimised variant: {count:,} trainable parameters")
    assert count == 2_129_602  # the module docstring's figure
    assert not any(isinstance(m, LowRankBilinear) for m in model.modules())
    first = model.core.blocks[0].residual
    spatial = first.spatial[0]
    assert spatial.groups == spatial.in_channels == spatial.out_channels == 4 * 256  # depthwise, 4 x the input
    assert isinstance(first.se, SqueezeExcite) and first.se.bilinear is None
    assert isinstance(model.head.activation, torch.nn.Identity)
    assert model(encoded(2)).shape == (2, 18)


def test_block_shapes_150bp_in_18_logits_out(published: LegNet) -> None:
    published.eval()
    x = encoded(2)
    with torch.no_grad():
        h = published.stem(x)
        assert h.shape == (2, 256, 150)
        widths = []
        for block in published.core.blocks:
            assert isinstance(block, LegNetBlock)
            # The inverted residual keeps the block's input width so that it can be concatenated.
            assert block.residual(h).shape == h.shape
            h = block(h)
            widths.append(h.shape[1])
            assert h.shape[-1] == 150
        assert widths == [128, 128, 64, 64, 64, 64]
        logits = published.head(h)
        assert logits.shape == (2, 18)
        torch.testing.assert_close(published(x), logits)
    # The published expansion: 4 x the block's output width, grouped in pairs of filters.
    spatial = published.core.blocks[0].residual.spatial[0]
    assert (spatial.in_channels, spatial.groups, spatial.kernel_size) == (512, 256, (7,))
    assert published.core.blocks[0].resize[0].in_channels == 2 * 256


def test_forward_contract(published: LegNet) -> None:
    published.eval()
    with torch.no_grad():
        logits = published(encoded(3))
        assert logits.shape == (3, 18) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
        assert LegNet.predict(logits).shape == (3,)
        # Other lengths work: every conv is 'same'-padded and the head pools over positions.
        assert published(encoded(2, length=110)).shape == (2, 18)
    with pytest.raises(ValueError, match=r"\(batch, 6, length\)"):
        published(encoded(2)[:, :5])
    with pytest.raises(ValueError, match="float"):
        published(torch.zeros(2, 6, 150, dtype=torch.long))


def test_soft_argmax_against_a_direct_computation() -> None:
    logits = torch.randn(5, 18, generator=torch.Generator().manual_seed(4)) * 3
    expected = []
    for row in logits.double().tolist():
        weights = [math.exp(v) for v in row]
        expected.append(sum(i * w for i, w in enumerate(weights)) / sum(weights))
    torch.testing.assert_close(soft_argmax(logits), torch.tensor(expected, dtype=torch.float32))
    torch.testing.assert_close(LegNet.predict(logits), soft_argmax(logits))
    # A confident bin gives its own value; uniform logits give the mean bin, 8.5.
    confident = torch.full((3, 18), -1e4)
    confident[0, 0], confident[1, 7], confident[2, 17] = 0.0, 0.0, 0.0
    torch.testing.assert_close(soft_argmax(confident), torch.tensor([0.0, 7.0, 17.0]))
    torch.testing.assert_close(soft_argmax(torch.zeros(1, 18)), torch.tensor([8.5]))
    # bf16 logits are read in float32.
    assert soft_argmax(logits.bfloat16()).dtype == torch.float32


def test_bilinear_layer_is_the_cp_tensor_regression_on_the_outer_product() -> None:
    torch.manual_seed(1)
    layer = LowRankBilinear(features=16, outputs=8, rank_fraction=0.5)
    assert layer.rank == bilinear_cp_rank(16, 8, 0.5) == round(0.5 * 16 * 16 * 8 / (16 + 16 + 8)) == 26
    # Parameters of tltorch's CP factorisation: weights (R) + factors (n, R), (n, R), (m, R) + bias (m).
    assert count_parameters(layer, trainable_only=True) == 26 + 26 * (16 + 16 + 8) + 8
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
        x = torch.randn(5, 16)
        # tltorch: inner product of x x^T (B, n, n) with the full (n, n, m) weight, plus the bias.
        direct = torch.einsum("bi,bj,ijk->bk", x, x, layer.full_weight()) + layer.bias
        torch.testing.assert_close(layer(x), direct, rtol=1e-4, atol=1e-4)
    assert bilinear_cp_rank(2, 1, 0.5) == 1  # never an empty factorisation


def test_bilinear_initialisation_follows_tltorch_normal() -> None:
    torch.manual_seed(2)
    layer = LowRankBilinear(features=64, outputs=32, rank_fraction=0.5)
    assert torch.equal(layer.scale, torch.ones(410)) and torch.equal(layer.bias, torch.zeros(32))
    factor_std = (0.00075 / math.sqrt(410)) ** (1 / 3)
    for factor in (layer.left, layer.right, layer.out):
        assert abs(factor.std().item() - factor_std) / factor_std < 0.05
    # The full weight then has about the requested spread.
    assert 0.0005 < layer.full_weight().std().item() < 0.001


def test_published_initialisation(published: LegNet) -> None:
    stem_conv = published.stem[0]
    expected = math.sqrt(2 / (7 * 256))
    assert abs(stem_conv.weight.std().item() - expected) / expected < 0.05
    for module in published.modules():
        if isinstance(module, torch.nn.Linear):
            assert abs(module.weight.std().item() - 0.001) < 0.0002
            assert torch.equal(module.bias, torch.zeros_like(module.bias))
        if isinstance(module, torch.nn.BatchNorm1d):
            assert torch.equal(module.weight, torch.ones_like(module.weight)) and module.momentum == 0.1
    assert torch.equal(published.head.conv.bias, torch.zeros(18))
    # 'torch' keeps the modules' own initialisation (uniform, bounded by 1/sqrt(fan_in)).
    torch.manual_seed(0)
    default = LegNet(LegNetConfig(init="torch"))
    linear = default.core.blocks[0].residual.se.squeeze
    assert linear.weight.abs().max() <= 1 / math.sqrt(linear.in_features) + 1e-6
    assert linear.weight.std() > 0.01


def test_same_seed_same_model_and_outputs() -> None:
    def build(seed: int) -> LegNet:
        torch.manual_seed(seed)
        return LegNet(LegNetConfig(**TINY)).eval()

    a, b, c = build(3), build(3), build(4)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    x = encoded(4, seed=5)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        assert not torch.equal(a(x), c(x))


def test_gradients_reach_every_parameter(published: LegNet) -> None:
    published.train()
    published.zero_grad(set_to_none=True)
    targets = soft_targets(torch.tensor([0.0, 3.5, 11.0, 17.0]))
    loss = F.kl_div(F.log_softmax(published(encoded(4, seed=6)), dim=-1), targets, reduction="batchmean")
    loss.backward()
    assert parameters_without_gradient(published) == []
    published.zero_grad(set_to_none=True)


@pytest.mark.parametrize("variant", ["published", "optimised"])
def test_tiny_config_trains_under_bf16_autocast(variant: str) -> None:
    torch.manual_seed(7)
    config = LegNetConfig(**TINY) if variant == "published" else LegNetConfig(
        **TINY, filters_per_group=1, se="standard", expand_from="in", head_activation="none", init="torch")
    model = LegNet(config)
    x, targets = encoded(4, seed=8), soft_targets(torch.tensor([1.0, 5.0, 9.0, 16.0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        loss = F.kl_div(F.log_softmax(logits, dim=-1), targets, reduction="batchmean")
    assert logits.dtype == torch.float32  # the loss is computed in full precision
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        full = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert (LegNet.predict(full) - LegNet.predict(low)).abs().max() < 0.1  # bf16 rounding only


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"block_channels": ()}, "model.legnet.block_channels must not be empty"),
        ({"block_channels": (128, 0)}, r"model.legnet.block_channels\[1\]"),
        ({"block_channels": 64}, "model.legnet.block_channels must be a list"),
        ({"kernel_size": 6}, "model.legnet.kernel_size must be odd"),
        ({"kernel_size": True}, "model.legnet.kernel_size must be an integer"),
        ({"bins": 1}, "model.legnet.bins must be >= 2"),
        ({"se": "complex"}, "model.legnet.se must be one of"),
        ({"expand_from": "mid"}, "model.legnet.expand_from must be one of"),
        ({"head_activation": "relu"}, "model.legnet.head_activation must be one of"),
        ({"init": "xavier"}, "model.legnet.init must be one of"),
        ({"bilinear_rank": 0}, "model.legnet.bilinear_rank must be a positive number"),
        ({"bn_momentum": 1.5}, "model.legnet.bn_momentum"),
        ({"filters_per_group": 3}, "model.legnet.filters_per_group"),
        ({"stem_channels": 4}, "model.legnet.se_reduction"),
    ],
)
def test_config_errors_name_the_field(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LegNetConfig(**changes)


def test_config_lists_become_tuples() -> None:
    assert LegNetConfig(block_channels=[64, 32]).block_channels == (64, 32)
    # The bilinear SE needs a hidden width of 2; the standard one gets by with 1.
    assert LegNetConfig(stem_channels=4, block_channels=(8,), se="standard").stem_channels == 4
