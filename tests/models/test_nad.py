"""Team NAD's model: shapes, size (published layer choices and the other variant), frozen
embedding, BatchNorm modes, GloVe loading, config errors, defaults against the data's constants,
a debug-size training step, the debug recipe's variant, and both relative position biases."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from promoter_dist.data.glove import load_embedding_tensor
from promoter_dist.data.nad_words import NUM_WORDS, WORDS_PER_ROW, word_id
from promoter_dist.errors import ConfigError, UserError
from promoter_dist.models.common import count_parameters
from promoter_dist.models.nad import (
    DEFAULT_NUM_WORDS,
    BucketedPositionBias,
    ExactOffsetBias,
    LevelEncoder,
    NADConfig,
    NADModel,
    PositionDepthwise,
    SandwichLayer,
    random_embedding,
    t5_buckets,
)

REPO = Path(__file__).resolve().parents[2]
NAD_VECTORS = REPO / "data" / "dream2022" / "nad_glove" / "vectors.txt"
PUBLISHED_SIZE = 14.2e6  # NAD's published model: "about 14.2M parameters"
DEBUG = dict(channels=(32, 48, 64, 80, 96), fpn_dim=64, heads=4, head_dim=16, depths=(1, 1, 1, 1))
# The variant with one exact-offset bias table per layer, a biased attention output and unbiased depthwise convs.
EXACT_VARIANT = {"position_bias": "exact_per_layer", "attention_bias": True, "positional_depthwise_bias": False}


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
    assert trainable == 14_176_716  # the team's definition built with x-transformers 0.28.4 (models.md)

    def size(*modules: torch.nn.Module) -> int:
        return sum(count_parameters(m, trainable_only=True) for m in modules)

    heads = [encoder.head for encoder in published.encoders]
    assert size(published.stages) == 2_848_128
    assert size(published.fpn) == 804_608
    assert size(published.position_depthwise) == 840
    assert size(published.encoders) - size(*heads) == 10_522_112
    assert size(*heads) == 1_028
    # One T5 table (32 buckets x 8 heads) per encoder, none inside the layers; no attention-output bias.
    assert [e.position_bias.table.shape for e in published.encoders] == [(32, 8)] * 4
    assert all(layer.attn.position_bias is None and layer.attn.out.bias is None
               for e in published.encoders for layer in e.layers)
    # The frozen table is a buffer, so counting all parameters adds nothing.
    assert count_parameters(published, trainable_only=False) == trainable
    assert published.embedding.numel() == 1024 * 128
    assert published.config.level_lengths == (10, 20, 40, 80)
    # The quirk: the three longer levels get a depthwise conv with one channel per position.
    mixers = list(published.position_depthwise)
    assert isinstance(mixers[0], torch.nn.Identity)
    assert [m.conv.in_channels for m in mixers[1:] if isinstance(m, PositionDepthwise)] == [20, 40, 80]
    assert [len(e.layers) for e in published.encoders] == [3, 3, 2, 2]
    assert all(m.conv.bias is not None for m in mixers[1:])


def test_exact_offset_variant_parameter_count() -> None:
    torch.manual_seed(0)
    model = NADModel(NADConfig(**EXACT_VARIANT))
    trainable = count_parameters(model, trainable_only=True)
    print(f"NAD with exact-offset tables per layer: {trainable:,} trainable parameters")
    assert trainable == 14_183_312  # the module docstring's figure
    assert all(e.position_bias is None for e in model.encoders)
    tables = [layer.attn.position_bias.table.shape for e in model.encoders for layer in e.layers]
    assert tables == [(8, 19)] * 3 + [(8, 39)] * 3 + [(8, 79)] * 2 + [(8, 159)] * 2


def test_debug_recipe_selects_the_variant_it_was_tuned_with() -> None:
    settings = yaml.safe_load((REPO / "configs" / "nad" / "debug.yaml").read_text())["model"]["nad"]
    config = NADConfig(**settings)
    assert (config.position_bias, config.attention_bias, config.positional_depthwise_bias) == (
        "exact_per_layer", True, False)
    assert count_parameters(NADModel(config), trainable_only=True) == 602_784
    assert count_parameters(NADModel(NADConfig(**DEBUG)), trainable_only=True) == 601_996


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
        ({"positional_depthwise_bias": 1}, "model.nad.positional_depthwise_bias must be true or false"),
        ({"attention_bias": "no"}, "model.nad.attention_bias must be true or false"),
        ({"position_bias": "rotary"}, "model.nad.position_bias must be one of"),
        ({"position_buckets": 2}, "model.nad.position_buckets must be >= 4"),
        ({"position_max_distance": 8}, r"model.nad.position_max_distance \(8\) must exceed"),
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


@pytest.mark.parametrize("variant", ["t5_shared", "exact_per_layer"])
def test_relative_position_bias_breaks_permutation_equivariance(variant: str) -> None:
    torch.manual_seed(0)
    config = NADConfig(**{**DEBUG, "depths": (2, 1, 1, 1), "position_bias": variant})
    encoder = LevelEncoder(config, length=10, depth=2).eval()
    x = torch.randn(2, 10, 64)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(1))
    if variant == "t5_shared":
        assert isinstance(encoder.position_bias, BucketedPositionBias)
        modules = [encoder.position_bias]  # one table, read by both layers
    else:
        assert encoder.position_bias is None
        modules = [layer.attn.position_bias for layer in encoder.layers]
        assert all(isinstance(m, ExactOffsetBias) for m in modules) and modules[0] is not modules[1]
    tables = [m.table for m in modules]

    # The bias depends only on the offset j - i.
    bias = modules[0]()
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


def reference_t5_bucket(offset: int, buckets: int = 32, max_distance: int = 128) -> int:
    """T5's bidirectional bucket of key-minus-query ``offset``, written out with Python numbers."""
    half = buckets // 2
    exact = half // 2
    base = half if offset > 0 else 0
    distance = abs(offset)
    if distance < exact:
        return base + distance
    spaced = exact + int(math.log(distance / exact) / math.log(max_distance / exact) * (half - exact))
    return base + min(spaced, half - 1)


def test_t5_buckets_against_a_direct_computation() -> None:
    offsets = torch.arange(-200, 201)
    expected = torch.tensor([reference_t5_bucket(o) for o in offsets.tolist()])
    assert torch.equal(t5_buckets(offsets, 32, 128), expected)
    # Keys before the query (and the query itself) use buckets 0-15, keys after it 16-31; offsets
    # below 8 are exact; 127 still gets a bucket of its own below the last; beyond 128 all share it.
    assert t5_buckets(torch.tensor([0, -1, 1, -7, 7, -8, 8, -127, -128, -1000, 1000]), 32, 128).tolist() == [
        0, 1, 17, 7, 23, 8, 24, 15, 15, 15, 31]
    # The shortest and longest published levels (10 and 80 positions) use 17 and 29 of the 32 buckets.
    assert len(t5_buckets(torch.arange(-9, 10), 32, 128).unique()) == 17
    assert len(t5_buckets(torch.arange(-79, 80), 32, 128).unique()) == 29


def test_shared_t5_bias_is_scaled_by_the_head_width_and_reaches_every_layer() -> None:
    torch.manual_seed(0)
    config = NADConfig(**{**DEBUG, "depths": (2, 1, 1, 1)})
    encoder = LevelEncoder(config, length=10, depth=2)
    module = encoder.position_bias
    assert module.scale == math.sqrt(16)
    expected = module.table[t5_buckets(torch.arange(10)[None, :] - torch.arange(10)[:, None], 32, 128)]
    torch.testing.assert_close(module(), 4.0 * expected.permute(2, 0, 1))
    # The table is an embedding initialised N(0, 1), as the library's.
    assert 0.5 < module.table.std().item() < 1.5
    encoder.encode(torch.randn(2, 10, 64)).sum().backward()
    assert module.table.grad is not None and module.table.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="owns no position bias"):
        encoder.layers[0].attn(torch.randn(2, 10, 64))


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
