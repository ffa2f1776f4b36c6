"""Team NAD's model: shapes, size, frozen embedding, BatchNorm modes, GloVe loading,
config errors, defaults against the data's constants, a debug-size training step, and the
relative position bias."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from promoter_dist.data.glove import load_embedding_tensor
from promoter_dist.data.nad_words import NUM_WORDS, WORDS_PER_ROW, word_id
from promoter_dist.errors import ConfigError, UserError
from promoter_dist.models.common import count_parameters
from promoter_dist.models.nad import (
    DEFAULT_NUM_WORDS,
    LevelEncoder,
    NADConfig,
    NADModel,
    PositionDepthwise,
    SandwichLayer,
    random_embedding,
)

NAD_VECTORS = Path(__file__).resolve().parents[2] / "data" / "dream2022" / "nad_glove" / "vectors.txt"
PUBLISHED_SIZE = 14.2e6  # NAD's published model: "about 14.2M parameters"
DEBUG = dict(channels=(32, 48, 64, 80, 96), fpn_dim=64, heads=4, head_dim=16, depths=(1, 1, 1, 1))


def words(batch: int, length: int = 80, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, NUM_WORDS, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def published() -> NADModel:
    torch.manual_seed(0)
    return NADModel(NADConfig())


@pytest.fixture()
def debug() -> NADModel:
    torch.manual_seed(0)
    return NADModel(NADConfig(**DEBUG))


def test_forward_shapes_and_combine(debug: NADModel) -> None:
    out = debug(words(3))
    assert out.shape == (3, 4) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    combined = NADModel.combine(out)
    assert combined.shape == (3,)
    torch.testing.assert_close(combined, out.mean(dim=1))
    torch.testing.assert_close(NADModel.combine(torch.tensor([[1.0, 2.0, 3.0, 6.0]])), torch.tensor([3.0]))


def test_fpn_levels_have_exact_lengths(debug: NADModel) -> None:
    x = torch.nn.functional.embedding(words(2), debug.embedding).transpose(1, 2)
    features = []
    for stage in debug.stages:
        x = stage(x)
        features.append(x)
    assert [f.shape[-1] for f in features] == [80, 80, 40, 20, 10]
    levels = debug.fpn(features[::-1][:4])
    assert [tuple(level.shape) for level in levels] == [(2, 64, 10), (2, 64, 20), (2, 64, 40), (2, 64, 80)]


def test_published_parameter_count(published: NADModel) -> None:
    trainable = count_parameters(published, trainable_only=True)
    print(f"NAD published configuration: {trainable:,} trainable parameters "
          f"(+{published.embedding.numel():,} frozen embedding values, not counted)")
    assert abs(trainable - PUBLISHED_SIZE) / PUBLISHED_SIZE < 0.02
    assert trainable == 14_183_312  # the module docstring's figure
    # The frozen table is a buffer, so counting all parameters adds nothing.
    assert count_parameters(published, trainable_only=False) == trainable
    assert published.embedding.numel() == 1024 * 128
    assert published.config.level_lengths == (10, 20, 40, 80)
    # The quirk: the three longer levels get a depthwise conv with one channel per position.
    mixers = list(published.position_depthwise)
    assert isinstance(mixers[0], torch.nn.Identity)
    assert [m.conv.in_channels for m in mixers[1:] if isinstance(m, PositionDepthwise)] == [20, 40, 80]
    assert [len(e.layers) for e in published.encoders] == [3, 3, 2, 2]


def test_embedding_is_frozen_buffer_and_all_parameters_learn(published: NADModel) -> None:
    model = published
    assert "embedding" in dict(model.named_buffers())
    assert "embedding" in model.state_dict()
    assert all(p is not model.embedding for p in model.parameters())
    before = model.embedding.clone()
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(words(2))
    NADModel.combine(out).sum().backward()
    assert model.embedding.grad is None and not model.embedding.requires_grad
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    # An update over model.parameters() (what any optimizer is given) leaves the table alone.
    with torch.no_grad():
        for p in model.parameters():
            p -= 1e-3 * p.grad
    assert torch.equal(model.embedding, before)
    model.zero_grad(set_to_none=True)


def test_batchnorm_train_versus_eval(debug: NADModel) -> None:
    batch = words(4, seed=1)
    other = words(3, seed=2)
    bn = debug.stages[0].bn
    debug.train()
    mean_before = bn.running_mean.clone()
    first_train = debug(batch)[0]
    assert not torch.equal(bn.running_mean, mean_before)  # statistics updated in train mode
    mixed_train = debug(torch.cat([batch[:1], other]))[0]
    # Train mode normalises with batch statistics: row 0 depends on its batch companions.
    assert (first_train - mixed_train).abs().max() > 1e-4

    debug.eval()
    frozen = bn.running_mean.clone()
    with torch.no_grad():
        first_eval = debug(batch)[0]
        alone_eval = debug(batch[:1])[0]
        mixed_eval = debug(torch.cat([batch[:1], other]))[0]
    assert torch.equal(bn.running_mean, frozen)  # no update in eval mode
    torch.testing.assert_close(first_eval, alone_eval, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first_eval, mixed_eval, rtol=1e-5, atol=1e-5)


def test_load_embedding_tensor_matches_file() -> None:
    table = load_embedding_tensor(NAD_VECTORS)
    assert table.shape == (1024, 128) and table.dtype == torch.float32
    lines = NAD_VECTORS.read_text().splitlines()
    for line in (lines[2], lines[500]):  # TGGGG and a word from the middle of the file
        word, *values = line.split()
        expected = torch.tensor([float(v) for v in values], dtype=torch.float32)
        assert torch.equal(table[word_id(word)], expected), word
    model = NADModel(NADConfig(**{**DEBUG, "embed_dim": 128}), embedding=table)
    assert torch.equal(model.embedding, table)


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"heads": 3, "head_dim": None}, "model.nad.heads must divide fpn_dim"),
        ({"head_dim": 0}, "model.nad.head_dim"),
        ({"channels": (32, 48, 64, 80)}, "model.nad.strides"),
        ({"channels": (32, 0, 64, 80, 96)}, r"model.nad.channels\[1\]"),
        ({"strides": (1, 2, 1, 2, 2)}, "model.nad.strides"),
        ({"depths": (1, 1, 1, 1, 1, 1)}, "model.nad.depths"),
        ({"depths": ()}, "model.nad.depths"),
        ({"length": 84}, r"model.nad.length \(84\) must be divisible"),
        ({"dropout": 1.0}, "model.nad.dropout"),
        ({"ff_mult": 0}, "model.nad.ff_mult"),
        ({"embed_dim": True}, "model.nad.embed_dim"),
        ({"positional_depthwise": "yes"}, "model.nad.positional_depthwise"),
    ],
)
def test_config_errors_name_the_field(changes: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        NADConfig(**{**DEBUG, **changes})


def test_defaults_equal_the_data_constants() -> None:
    """The model knows its vocabulary and row length only as plain defaults; they match the words."""
    assert DEFAULT_NUM_WORDS == NUM_WORDS == 1024
    assert NADConfig().length == WORDS_PER_ROW == 80
    assert random_embedding(16).shape == (NUM_WORDS, 16)
    # A vocabulary passed in sizes the random table and the check of a given one.
    model = NADModel(NADConfig(**DEBUG), num_words=12)
    assert model.embedding.shape == (12, NADConfig().embed_dim)
    with pytest.raises(UserError, match=r"\(12, 128\)"):
        NADModel(NADConfig(**DEBUG), embedding=torch.zeros(NUM_WORDS, 128), num_words=12)


def test_config_lists_become_tuples_and_bad_embedding_is_named() -> None:
    config = NADConfig(**{**DEBUG, "channels": [32, 48, 64, 80, 96], "depths": [1, 1, 1, 1]})
    assert config.channels == (32, 48, 64, 80, 96) and config.depths == (1, 1, 1, 1)
    with pytest.raises(UserError, match="model.nad.embed_dim"):
        NADModel(config, embedding=torch.zeros(1024, 64))


def test_debug_config_trains_and_runs_under_autocast(debug: NADModel) -> None:
    batch = words(4, seed=3).to(torch.int16)  # the loader's dtype
    target = torch.rand(4)
    debug.eval()
    with torch.no_grad():
        before = debug(batch)
    debug.train()
    loss = torch.nn.functional.smooth_l1_loss(NADModel.combine(debug(batch)), target, beta=0.1)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in debug.parameters())
    with torch.no_grad():  # a plain SGD step (torch.optim's first step has a slow one-off import)
        for p in debug.parameters():
            p -= 0.1 * p.grad
    debug.eval()
    with torch.no_grad():
        after = debug(batch)
        assert (after - before).abs().max() > 1e-4  # the step changed the model
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = debug(batch)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert (low - after).abs().max() < 0.25  # bf16 rounding, not a different computation


def test_other_lengths_divisible_by_eight() -> None:
    model = NADModel(NADConfig(**{**DEBUG, "length": 48}))
    assert model(words(2, length=48)).shape == (2, 4)
    with pytest.raises(ValueError, match="48"):
        model(words(2, length=80))


def test_relative_position_bias_breaks_permutation_equivariance() -> None:
    torch.manual_seed(0)
    config = NADConfig(**{**DEBUG, "depths": (2, 1, 1, 1)})
    encoder = LevelEncoder(config, length=10, depth=2).eval()
    x = torch.randn(2, 10, 64)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(1))
    tables = [layer.attn.position_bias.table for layer in encoder.layers]

    # The bias depends only on the offset j - i.
    bias = encoder.layers[0].attn.position_bias()
    assert bias.shape == (4, 10, 10)
    torch.testing.assert_close(bias[:, 1:, 1:], bias[:, :-1, :-1])

    with torch.no_grad():
        for table in tables:
            table.normal_(std=1.0)
        gap = (encoder.encode(x[:, perm]) - encoder.encode(x)[:, perm]).abs().max()
        # Control: without the bias nothing else in the encoder sees positions, so it
        # is permutation-equivariant, which shows the check above can detect it.
        for table in tables:
            table.zero_()
        control = (encoder.encode(x[:, perm]) - encoder.encode(x)[:, perm]).abs().max()
    assert gap > 0.1
    assert control < 1e-4


def test_sandwich_norm_sits_on_the_branch_before_the_residual_add() -> None:
    torch.manual_seed(0)
    layer = SandwichLayer(dim=16, heads=2, head_dim=8, length=6, ff_mult=4, dropout=0.0)
    x = torch.randn(3, 6, 16)
    with torch.no_grad():
        assert (layer(x) - x).abs().max() > 1e-2
        # Zeroing the closing LayerNorms silences both branches: only the residual remains,
        # which holds only if each closes its branch before the add (a norm after the
        # add would give zeros instead).
        for norm in (layer.attn_norm_out, layer.ff_norm_out):
            norm.weight.zero_()
            norm.bias.zero_()
        torch.testing.assert_close(layer(x), x)
        # With unit gain the branch outputs are normalised: the attention branch adds a
        # per-position update with zero mean and unit variance over features.
        layer.attn_norm_out.weight.fill_(1.0)
        update = layer(x) - x
    torch.testing.assert_close(update.mean(dim=-1), torch.zeros(3, 6), atol=1e-5, rtol=0)
    torch.testing.assert_close(update.var(dim=-1, unbiased=False), torch.ones(3, 6), atol=1e-3, rtol=0)
