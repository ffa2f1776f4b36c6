"""LegNet's soft classification: targets, the KL loss against a direct computation, both orientations, config."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from promoter_dist.config import load_config
from promoter_dist.data.onehot import one_hot, reverse_complement
from promoter_dist.errors import ConfigError
from promoter_dist.models.dream_rnn import PrixFixeNet
from promoter_dist.models.legnet import LegNet
from promoter_dist.tasks import build_task
from promoter_dist.tasks.soft_classification import SoftClassificationTask, kl_per_row, soft_targets

TINY = ["model.name=legnet", "task.name=soft_classification", "model.legnet.stem_channels=16",
        "model.legnet.block_channels=[16,8]", "model.legnet.expand_ratio=2"]
POINTS = np.array([-np.inf, *range(1, 18), np.inf])  # the team's bin edges (train.py)


def task(*overrides: str) -> SoftClassificationTask:
    built = build_task(load_config(overrides=[*TINY, *overrides]))
    assert isinstance(built, SoftClassificationTask)
    return built


def batch(rows: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    window = torch.randint(0, 5, (rows, 150), generator=gen, dtype=torch.uint8)  # N included
    y = torch.tensor([0.0, 3.0, 7.25, 11.5, 16.0, 17.0, 9.0, 2.5][:rows])
    singleton = (y == y.round()).to(torch.uint8)
    return {"window": window, "singleton": singleton, "y": y, "line": torch.arange(1, rows + 1)}


def published_targets(y: float, shift: float = 0.5, scale: float = 0.5) -> np.ndarray:
    """``SeqDatasetRevProb.__getitem__``: the normal CDF at the edges, differenced."""
    cumprobs = scipy.stats.norm(loc=y + shift, scale=scale).cdf(POINTS)
    return cumprobs[1:] - cumprobs[:-1]


# --------------------------------------------------------------------------- targets and loss


@pytest.mark.parametrize("shift, scale", [(0.5, 0.5), (0.0, 1.5), (0.25, 0.1)])
def test_soft_targets_are_the_published_discretised_gaussian(shift, scale):
    y = torch.tensor([0.0, 0.5, 3.0, 8.3, 16.99, 17.0, -1.0, 20.0])
    targets = soft_targets(y, 18, shift, scale)
    assert targets.shape == (8, 18) and targets.dtype == torch.float32
    expected = np.stack([published_targets(float(v), shift, scale) for v in y])
    np.testing.assert_allclose(targets.numpy(), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(targets.sum(dim=1).numpy(), 1.0, rtol=1e-6)  # open end bins: nothing lost
    assert (targets >= 0).all()


def test_target_of_an_integer_value_sits_in_its_own_bin():
    targets = soft_targets(torch.tensor([5.0]), 18, 0.5, 0.5)[0]
    assert int(targets.argmax()) == 5
    assert float(targets[5]) == pytest.approx(scipy.stats.norm.cdf(1.0) - scipy.stats.norm.cdf(-1.0), rel=1e-6)


def test_kl_loss_against_a_direct_computation():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 18, generator=gen) * 3
    y = torch.tensor([0.0, 4.0, 9.5, 13.0, 17.0])
    targets = soft_targets(y, 18, 0.5, 0.5)
    per_row = kl_per_row(logits, targets)
    # directly: sum_i p_i (log p_i - log q_i), with 0 log 0 = 0
    q = np.exp(logits.double().numpy()) / np.exp(logits.double().numpy()).sum(axis=1, keepdims=True)
    p = np.stack([published_targets(float(v)) for v in y])
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    np.testing.assert_allclose(per_row.numpy(), terms.sum(axis=1), rtol=1e-5, atol=1e-6)
    # the team's criterion: KLDivLoss(reduction="batchmean") on log-probabilities
    batchmean = nn.KLDivLoss(reduction="batchmean")(torch.log_softmax(logits, dim=1), targets)
    assert float(per_row.mean()) == pytest.approx(float(batchmean), rel=1e-6)
    assert (per_row >= 0).all()


# --------------------------------------------------------------------------- orientations


class Recorder(nn.Module):
    """A bin model stand-in that records its inputs; logits depend on the input so orientations differ."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(-1, 1, 18))
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        position = torch.arange(x.shape[2], dtype=x.dtype)
        summary = (x[:, 0] * position).mean(dim=1) / 10 + x[:, 4].mean(dim=1) + 2 * x[:, 5].mean(dim=1)
        return summary[:, None] * self.scale

    @staticmethod
    def predict(logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), dim=-1) @ torch.arange(18, dtype=torch.float32)


def test_training_feeds_both_orientations_with_the_singleton_flag():
    soft = task()
    model, rows = Recorder(), batch()
    loss = soft.training_loss(model, rows)
    (x,) = model.inputs
    forward = one_hot(rows["window"], rows["singleton"], reverse=False)
    reverse = one_hot(reverse_complement(rows["window"]), rows["singleton"], reverse=True)
    torch.testing.assert_close(x, torch.cat([forward, reverse]), rtol=0, atol=0)
    targets = soft_targets(rows["y"], 18, 0.5, 0.5)
    expected = torch.cat([kl_per_row(model(forward), targets), kl_per_row(model(reverse), targets)]).mean()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    loss.backward()
    assert model.scale.grad is not None


def test_prediction_averages_both_orientations_with_singleton_zero():
    soft = task()
    model, rows = Recorder(), batch()
    predicted = soft.predict(model, rows)
    (x,) = model.inputs
    assert (x[:, 5] == 0).all() and x.shape[0] == 2 * len(rows["y"])  # the value is unknown at prediction time
    forward = Recorder.predict(model(one_hot(rows["window"], None, reverse=False)))
    reverse = Recorder.predict(model(one_hot(reverse_complement(rows["window"]), None, reverse=True)))
    torch.testing.assert_close(predicted, (forward + reverse) / 2)
    assert not torch.allclose(forward, reverse)  # the average is not trivially one orientation's
    outputs = soft.evaluate_batch(model, rows)
    assert set(outputs) == {"pred", "y", "line", "loss"}
    assert all(v.shape == (len(rows["y"]),) for v in outputs.values())
    torch.testing.assert_close(outputs["pred"], predicted)


def test_reverse_complement_off_trains_and_predicts_one_orientation():
    soft = task("task.reverse_complement=false")
    model, rows = Recorder(), batch()
    soft.training_loss(model, rows)
    soft.predict(model, rows)
    train_x, predict_x = model.inputs
    assert train_x.shape[0] == predict_x.shape[0] == len(rows["y"])
    assert (train_x[:, 4] == 0).all() and (predict_x[:, 5] == 0).all()
    torch.testing.assert_close(train_x[:, 5], rows["singleton"].float()[:, None].expand(-1, 150))


def test_metrics_summarize_like_regression():
    soft = task()
    y = np.array([1.0, 5.0, 9.0, 14.0])
    metrics = soft.summarize({"pred": y * 2 + 1, "y": y, "loss": np.array([0.5, 1.5, 1.0, 1.0])})
    assert metrics == {"loss": 1.0, "pearson": pytest.approx(1.0), "spearman": pytest.approx(1.0), "rows": 4.0}


# --------------------------------------------------------------------------- models and config


def test_builds_legnet_and_prix_fixe_models_that_train():
    legnet = task()
    model = legnet.build_model()
    assert isinstance(model, LegNet)
    loss = legnet.training_loss(model, batch())
    loss.backward()
    assert torch.isfinite(loss) and float(loss.detach()) > 0
    cnn = build_task(load_config(overrides=["model.name=dream_rnn", "task.name=soft_classification",
                                            "model.dream_rnn.core=legnet", "model.dream_rnn.first_channels=16",
                                            "model.dream_rnn.legnet_blocks=[16,8]"]))
    model = cnn.build_model()
    assert isinstance(model, PrixFixeNet) and model.config.core == "legnet"
    model.eval()
    with torch.no_grad():
        assert cnn.predict(model, batch()).shape == (6,)


def test_config_pairs_bin_models_with_soft_classification():
    config = load_config(overrides=TINY)
    assert config.tokens == "onehot" and config.view == "all" and config.run.best_metric == "pearson"
    assert config.loader_config("train", True).tokens == "onehot"
    with pytest.raises(ConfigError, match="soft_classification"):
        load_config(overrides=["model.name=legnet"])  # task.name defaults to regression
    with pytest.raises(ConfigError, match="soft_classification"):
        load_config(overrides=["task.name=soft_classification"])  # model.name defaults to nad
    with pytest.raises(ConfigError, match="task.target_scale"):
        load_config(overrides=[*TINY, "task.target_scale=0"])
    with pytest.raises(ConfigError, match="warmup_steps"):
        load_config(overrides=[*TINY, "schedule.name=one_cycle", "schedule.warmup_steps=10"])


def test_repository_recipes_load():
    from tests.conftest import REPO

    counts = {}
    for name in ("legnet/full", "legnet/optimised", "legnet/debug", "dream_rnn/full", "dream_rnn/debug",
                 "dream_cnn/debug"):
        config = load_config(REPO / "configs" / f"{name}.yaml")
        assert config.task.name == "soft_classification" and config.schedule.name == "one_cycle"
        counts[name] = sum(p.numel() for p in build_task(config).build_model().parameters())
    assert counts["legnet/full"] == 1_852_846
    assert counts["legnet/optimised"] == 2_129_602
    assert counts["dream_rnn/full"] == 4_130_578
    full = load_config(REPO / "configs" / "legnet" / "full.yaml")
    assert (full.data.batch_size, full.run.max_steps, full.schedule.decay_steps) == (512, 80_000, 80_000)
    assert (full.optim.lr, full.optim.weight_decay, full.run.seed) == (0.005, 0.01, 42)
    optimised = load_config(REPO / "configs" / "legnet" / "optimised.yaml")
    assert (optimised.optim.name, optimised.engine.precision) == ("lion", "bf16")
