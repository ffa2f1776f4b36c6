"""Prix Fixe models: DREAM-RNN and DREAM-CNN at their published sizes, LegNet as a composition of the
same blocks, shapes, dropout modes, initialisation, determinism, gradients, bf16 autocast and config
errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from promoter_dist.errors import ConfigError
from promoter_dist.models.common import count_parameters
from promoter_dist.models.dream_rnn import (
    ConvBranches,
    LSTMCore,
    PrixFixeConfig,
    PrixFixeNet,
)
from promoter_dist.models.legnet import (
    BinHead,
    LegNet,
    LegNetConfig,
    LegNetCore,
    soft_argmax,
)

from .test_legnet import encoded, parameters_without_gradient, soft_targets

DREAM_RNN_SIZE = 4_130_578  # the organisers' notebook (models.md, "Prix Fixe")
DREAM_CNN_SIZE = 1_933_970
TINY = {"first_channels": 8, "lstm_hidden": 6, "core_channels": 8, "legnet_blocks": (8, 8), "legnet_kernel_size": 3}


def build(seed: int = 0, **changes) -> PrixFixeNet:
    torch.manual_seed(seed)
    return PrixFixeNet(PrixFixeConfig(**changes))


def test_dream_rnn_published_size_and_blocks() -> None:
    model = build()
    count = count_parameters(model, trainable_only=True)
    print(f"DREAM-RNN (BHI first + BiLSTM core + LegNet head): {count:,} trainable parameters")
    assert count == DREAM_RNN_SIZE
    assert isinstance(model.first, ConvBranches) and isinstance(model.core, LSTMCore)
    assert isinstance(model.head, BinHead) and isinstance(model.head.activation, torch.nn.Identity)
    assert [c.kernel_size for c in model.first.branches] == [(9,), (15,)]
    assert [c.out_channels for c in model.first.branches] == [160, 160]
    lstm = model.core.lstm
    assert (lstm.input_size, lstm.hidden_size, lstm.bidirectional) == (320, 320, True)
    assert [c.in_channels for c in model.core.convs.branches] == [640, 640]


def test_dream_cnn_is_a_config_of_the_same_blocks() -> None:
    model = build(core="legnet")
    count = count_parameters(model, trainable_only=True)
    print(f"DREAM-CNN (BHI first + LegNet core + LegNet head): {count:,} trainable parameters")
    assert count == DREAM_CNN_SIZE
    assert isinstance(model.first, ConvBranches) and isinstance(model.core, LegNetCore)
    # Prix Fixe's LegNet core: the standard SE block, fed by the 320 BHI channels.
    assert model.core.blocks[0].residual.se.bilinear is None
    assert model.core.blocks[0].residual.expand[0].in_channels == 320
    assert model(encoded(2)).shape == (2, 18)


def test_legnet_is_a_composition_of_the_same_blocks() -> None:
    composed = build(first="legnet", first_channels=256, core="legnet", legnet_se="bilinear", head_activation="silu")
    assert count_parameters(composed, trainable_only=True) == 1_852_846
    torch.manual_seed(1)
    legnet = LegNet(LegNetConfig()).eval()
    # Same function: LegNet's weights, its stem renamed to the first block, give the same logits.
    state = {key.replace("stem.", "first.", 1): value for key, value in legnet.state_dict().items()}
    composed.load_state_dict(state)
    composed.eval()
    x = encoded(3)
    with torch.no_grad():
        torch.testing.assert_close(composed(x), legnet(x))


@pytest.mark.parametrize("core", ["lstm", "legnet"])
def test_forward_contract_and_dropout_modes(core: str) -> None:
    model = build(core=core, **TINY)
    x = encoded(3)
    model.eval()
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (3, 18) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
        assert torch.equal(model(x), logits)  # no dropout in eval mode
        torch.testing.assert_close(PrixFixeNet.predict(logits), soft_argmax(logits))
        assert model(encoded(2, length=110)).shape == (2, 18)
    if core == "lstm":
        model.train()
        with torch.no_grad():
            assert not torch.equal(model(x), model(x))  # dropout 0.2 / 0.5 in training
    with pytest.raises(ValueError, match=r"\(batch, 6, length\)"):
        model(x[:, :4])


def test_initialisation_as_in_prix_fixe() -> None:
    model = build(core="legnet")
    # LegNet parts: the autosome team's initialisation (zero biases, Linear N(0, 0.001)).
    assert torch.equal(model.head.conv.bias, torch.zeros(18))
    squeeze = model.core.blocks[0].residual.se.squeeze
    assert abs(squeeze.weight.std().item() - 0.001) < 0.0002
    # BHI blocks: PyTorch's defaults (non-zero biases).
    assert model.first.branches[0].bias.abs().sum() > 0


def test_same_seed_same_model_and_outputs() -> None:
    a, b, c = build(3, **TINY).eval(), build(3, **TINY).eval(), build(4, **TINY).eval()
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    x = encoded(4, seed=5)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        assert not torch.equal(a(x), c(x))


@pytest.mark.parametrize("core", ["lstm", "legnet"])
def test_gradients_reach_every_parameter(core: str) -> None:
    model = build(core=core, **TINY).train()
    targets = soft_targets(torch.tensor([0.0, 4.0, 12.5, 17.0]))
    loss = F.kl_div(F.log_softmax(model(encoded(4, seed=6)), dim=-1), targets, reduction="batchmean")
    loss.backward()
    assert parameters_without_gradient(model) == []


@pytest.mark.parametrize("core", ["lstm", "legnet"])
def test_tiny_config_trains_under_bf16_autocast(core: str) -> None:
    model = build(7, core=core, **TINY)
    x, targets = encoded(4, seed=8), soft_targets(torch.tensor([2.0, 6.0, 10.0, 15.0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        loss = F.kl_div(F.log_softmax(logits, dim=-1), targets, reduction="batchmean")
    assert logits.dtype == torch.float32
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        full = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert (PrixFixeNet.predict(full) - PrixFixeNet.predict(low)).abs().max() < 0.1


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"first": "unlockdna"}, "model.dream_rnn.first must be one of"),
        ({"core": "attention"}, "model.dream_rnn.core must be one of"),
        ({"legnet_se": "complex"}, "model.dream_rnn.legnet_se must be one of"),
        ({"head_activation": "relu"}, "model.dream_rnn.head_activation must be one of"),
        ({"first_channels": 321}, r"model.dream_rnn.first_channels \(321\) must split evenly"),
        ({"core_channels": 321}, r"model.dream_rnn.core_channels \(321\) must split evenly"),
        ({"first_kernel_sizes": ()}, "model.dream_rnn.first_kernel_sizes must not be empty"),
        ({"core_kernel_sizes": (9, 0)}, r"model.dream_rnn.core_kernel_sizes\[1\]"),
        ({"lstm_hidden": 0}, "model.dream_rnn.lstm_hidden must be >= 1"),
        ({"first_dropout": 1.0}, "model.dream_rnn.first_dropout"),
        ({"core_out_dropout": -0.1}, "model.dream_rnn.core_out_dropout"),
        ({"legnet_kernel_size": 8}, "model.dream_rnn.legnet_kernel_size must be odd"),
        ({"bins": 1}, "model.dream_rnn.bins must be >= 2"),
        ({"core": "legnet", "legnet_blocks": (64, 2, 64)}, r"model.dream_rnn.legnet_blocks\[1\] must be >= 4"),
        ({"core": "legnet", "legnet_se": "bilinear", "first_channels": 6, "first_kernel_sizes": (9,)},
         "model.dream_rnn.first_channels must be >= 8"),
    ],
)
def test_config_errors_name_the_field(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PrixFixeConfig(**changes)


def test_small_widths_are_fine_for_the_lstm_core() -> None:
    # The LegNet core's width limits do not apply when it is not used.
    model = build(first_channels=2, first_kernel_sizes=(9,), lstm_hidden=2, core_channels=2, core_kernel_sizes=(3,))
    assert model(encoded(2)).shape == (2, 18)
