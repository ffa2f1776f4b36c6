"""ReferenceGSAM against GSAM worked out by hand on a linear model, and its limiting cases."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from promoter_dist.errors import ConfigError, NonFiniteLossError
from promoter_dist.optim.gsam import (
    GSAMConfig,
    NonFiniteGradientError,
    ReferenceGSAM,
    frozen_running_stats,
    gsam_coefficients,
    rho_at,
)

# ------------------------------------------------------------------ a linear model in closed form
# loss(w, b; X, y) = mean((X w + b - y)^2)  =>  dL/dw = 2/N X^T r,  dL/db = 2 mean(r),  r = X w + b - y


def linear_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(2):
        x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
        noise = 0.1 * torch.randn(5, generator=gen, dtype=torch.float64)
        y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3 + noise
        batches.append((x, y))
    return batches


def closed_form_gradient(theta: torch.Tensor, batches) -> torch.Tensor:
    """Gradient of the mean of the micro-batch mean losses; theta = (w_1, w_2, w_3, b)."""
    total = torch.zeros(4, dtype=torch.float64)
    for x, y in batches:
        r = x @ theta[:3] + theta[3] - y
        total += torch.cat([2 * x.T @ r / len(y), (2 * r.mean()).reshape(1)])
    return total / len(batches)


def linear_model(theta: torch.Tensor) -> nn.Linear:
    model = nn.Linear(3, 1).double()
    with torch.no_grad():
        model.weight.copy_(theta[:3].reshape(1, 3))
        model.bias.copy_(theta[3:])
    return model


def theta_of(model: nn.Linear) -> torch.Tensor:
    return torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])


def sgd_gsam(model, lr, lr_max=None, lr_min=None, gradient_clipping=0.0, **gsam):
    """ReferenceGSAM around plain SGD (update = -lr * d), so the expected weights are easy to write."""
    config = GSAMConfig(**gsam)
    lr_max = lr if lr_max is None else lr_max
    lr_min = lr if lr_min is None else lr_min
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return ReferenceGSAM(model, optimizer, config, lr_max, lr_min, gradient_clipping=gradient_clipping)


def mse(model):
    return lambda batch: torch.mean((model(batch[0]).squeeze(-1) - batch[1]) ** 2)


THETA0 = torch.tensor([0.4, 0.1, -0.3, 0.05], dtype=torch.float64)


def hand_gsam_direction(theta, batches, rho, alpha, adaptive=False, eps=1e-12):
    g = closed_form_gradient(theta, batches)
    if adaptive:
        e = rho * theta**2 * g / (torch.linalg.norm(theta * g) + eps)
    else:
        e = rho * g / (torch.linalg.norm(g) + eps)
    g_p = closed_form_gradient(theta + e, batches)
    g_perp = g - (g @ g_p) / (g_p @ g_p + eps) * g_p
    return g_p - alpha * g_perp


@pytest.mark.parametrize("adaptive", [False, True])
def test_matches_hand_computed_gsam_with_sgd(adaptive):
    batches = linear_batches()
    lr = 0.1
    model = linear_model(THETA0)
    gsam = sgd_gsam(model, lr, rho_max=0.2, rho_min=0.2, alpha=0.3, adaptive=adaptive)

    theta = THETA0.clone()
    for _ in range(3):
        loss = gsam.step(batches, mse(model))
        expected_loss = sum(float(torch.mean((x @ theta[:3] + theta[3] - y) ** 2)) for x, y in batches) / 2
        theta = theta - lr * hand_gsam_direction(theta, batches, rho=0.2, alpha=0.3, adaptive=adaptive)
        assert float(loss) == pytest.approx(expected_loss, rel=1e-6)  # returned as a float32 scalar
        torch.testing.assert_close(theta_of(model), theta, rtol=0, atol=1e-12)


def test_clipping_applies_deepspeed_rule_to_the_final_direction():
    batches = linear_batches()
    lr, clip = 0.1, 0.05
    model = linear_model(THETA0)
    gsam = sgd_gsam(model, lr, gradient_clipping=clip, rho_max=0.2, rho_min=0.2, alpha=0.3)
    gsam.step(batches, mse(model))

    d = hand_gsam_direction(THETA0, batches, rho=0.2, alpha=0.3)
    assert torch.linalg.norm(d) > clip  # the clip binds
    d = d * clip / (torch.linalg.norm(d) + 1e-6)
    torch.testing.assert_close(theta_of(model), THETA0 - lr * d, rtol=0, atol=1e-12)
    unclipped = hand_gsam_direction(THETA0, batches, rho=0.2, alpha=0.3)
    assert gsam.last_direction_norm == pytest.approx(float(torch.linalg.norm(unclipped)))


def test_rho_follows_the_learning_rate():
    batches = linear_batches()
    lr_max, lr_min, lr_now = 0.2, 0.02, 0.05
    model = linear_model(THETA0)
    gsam = sgd_gsam(model, lr_now, lr_max, lr_min, rho_max=0.3, rho_min=0.1, alpha=0.1)
    gsam.step(batches, mse(model))
    rho = 0.1 + 0.2 * (lr_now - lr_min) / (lr_max - lr_min)
    assert gsam.last_rho == pytest.approx(rho)
    expected = THETA0 - lr_now * hand_gsam_direction(THETA0, batches, rho=rho, alpha=0.1)
    torch.testing.assert_close(theta_of(model), expected, rtol=0, atol=1e-12)


def test_alpha_zero_is_sam():
    batches = linear_batches()
    lr, rho = 0.1, 0.2
    model = linear_model(THETA0)
    gsam = sgd_gsam(model, lr, rho_max=rho, rho_min=rho, alpha=0.0)
    gsam.step(batches, mse(model))
    g = closed_form_gradient(THETA0, batches)
    sam_direction = closed_form_gradient(THETA0 + rho * g / torch.linalg.norm(g), batches)  # SAM: gradient at w + e
    torch.testing.assert_close(theta_of(model), THETA0 - lr * sam_direction, rtol=0, atol=1e-12)


# ------------------------------------------------------------------ a network with dropout and BatchNorm


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 1))

    def forward(self, x):
        return self.layers(x).squeeze(-1)


def net_batches(n: int = 3):
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(6, 4, generator=gen), torch.randn(6, generator=gen)) for _ in range(n)]


def net_loss(model):
    return lambda batch: nn.functional.mse_loss(model(batch[0]), batch[1])


def test_rho_zero_is_the_base_optimizer_with_same_dropout_draws():
    """rho = 0: the perturbed pass is the first pass replayed (same dropout masks), so d = g."""
    batches = net_batches()
    net, plain = Net(), Net()
    no_rho = GSAMConfig(rho_max=0.0, rho_min=0.0, alpha=0.05)
    gsam = ReferenceGSAM(net, torch.optim.AdamW(net.parameters(), lr=0.01), no_rho, 0.01, 0.01)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=0.01)
    for step in range(3):
        torch.manual_seed(100 + step)
        gsam.step(batches, net_loss(net))
        torch.manual_seed(100 + step)
        plain_opt.zero_grad()
        for batch in batches:
            (net_loss(plain)(batch) / len(batches)).backward()
        plain_opt.step()
    for a, b in zip(net.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for a, b in zip(net.buffers(), plain.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_batchnorm_running_stats_untouched_by_the_perturbed_pass():
    batches = net_batches()
    net = Net()
    first_pass_only = copy.deepcopy(net)
    gsam = ReferenceGSAM(net, torch.optim.SGD(net.parameters(), lr=0.1), GSAMConfig(rho_max=0.5, rho_min=0.5), 0.1, 0.1)
    gsam.step(batches, net_loss(net))
    with torch.no_grad():
        for x, _ in batches:
            first_pass_only(x)  # train mode: the same running-statistics updates as pass 1 at w
    bn, expected = net.layers[1], first_pass_only.layers[1]
    torch.testing.assert_close(bn.running_mean, expected.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(bn.running_var, expected.running_var, rtol=0, atol=0)
    assert int(bn.num_batches_tracked) == len(batches)


def test_frozen_running_stats_restores_exactly():
    net = Net()
    before = [b.clone() for b in net.buffers()]
    with frozen_running_stats(net):
        net(torch.randn(6, 4))
    for a, b in zip(net.buffers(), before):
        assert torch.equal(a, b)


def test_non_finite_loss_raises_and_leaves_weights():
    net = Net()
    before = [p.detach().clone() for p in net.parameters()]
    gsam = ReferenceGSAM(net, torch.optim.SGD(net.parameters(), lr=0.1), GSAMConfig(), 0.1, 0.1)
    calls = []

    def loss_fn(batch):
        calls.append(1)
        loss = net_loss(net)(batch)
        return loss * math.nan if len(calls) == 4 else loss  # first micro-batch of the perturbed pass

    with pytest.raises(NonFiniteLossError) as caught:
        gsam.step(net_batches(), loss_fn)
    assert caught.value.step == 0 and math.isnan(caught.value.loss)
    for p, b in zip(net.parameters(), before):
        assert torch.equal(p.detach(), b)


def test_linear_combination_identity():
    """d = a g + b g' (the form the DeepSpeed driver uses per partition) equals the explicit decomposition."""
    gen = torch.Generator().manual_seed(9)
    g, gp = torch.randn(50, generator=gen, dtype=torch.float64), torch.randn(50, generator=gen, dtype=torch.float64)
    alpha = 0.05
    a, b = gsam_coefficients(float(g @ gp), float(gp @ gp), alpha, 1e-12)
    g_perp = g - (g @ gp) / (gp @ gp + 1e-12) * gp
    torch.testing.assert_close(a * g + b * gp, gp - alpha * g_perp, rtol=0, atol=1e-14)
    assert abs(float(g_perp @ gp)) < 1e-12  # the remainder is orthogonal to g'


# ------------------------------------------------------------------ schedule and config


def test_rho_at_schedule():
    assert rho_at(0.2, 0.2, 0.02, 0.3, 0.1) == pytest.approx(0.3)
    assert rho_at(0.02, 0.2, 0.02, 0.3, 0.1) == pytest.approx(0.1)
    assert rho_at(0.11, 0.2, 0.02, 0.3, 0.1) == pytest.approx(0.2)
    assert rho_at(0.001, 0.2, 0.02, 0.3, 0.1) == pytest.approx(0.1)  # warm-up below lr_min: clamped
    assert rho_at(0.5, 0.2, 0.02, 0.3, 0.1) == pytest.approx(0.3)
    assert rho_at(0.07, 0.07, 0.07, 0.3, 0.1) == 0.3  # constant LR: rho_max


def test_config_defaults_are_nad():
    cfg = GSAMConfig()
    values = (cfg.enabled, cfg.rho_max, cfg.rho_min, cfg.alpha, cfg.adaptive, cfg.eps)
    assert values == (False, 0.1, 0.1, 0.05, False, 1e-12)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"rho_max": -0.1}, "optim.gsam.rho_max"),
        ({"rho_min": 0.2}, "optim.gsam.rho_min"),
        ({"alpha": float("nan")}, "optim.gsam.alpha"),
        ({"eps": 0.0}, "optim.gsam.eps"),
        ({"enabled": "yes"}, "optim.gsam.enabled"),
        ({"adaptive": 1}, "optim.gsam.adaptive"),
        ({"rho_max": "0.1"}, "optim.gsam.rho_max"),
    ],
)
def test_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        GSAMConfig(**kwargs)


def test_non_finite_gradient_with_finite_loss_raises():
    net = Net()
    before = [p.detach().clone() for p in net.parameters()]
    gsam = ReferenceGSAM(net, torch.optim.SGD(net.parameters(), lr=0.1), GSAMConfig(), 0.1, 0.1)

    def loss_fn(batch):
        prediction = net(batch[0])
        # + sqrt(|0|): the loss stays finite, its gradient is NaN.
        return nn.functional.mse_loss(prediction, batch[1]) + torch.sqrt((prediction - prediction.detach()).abs().sum())

    with pytest.raises(NonFiniteLossError) as caught:
        gsam.step(net_batches(), loss_fn)
    assert isinstance(caught.value, NonFiniteGradientError) and "gradient norm" in str(caught.value)
    assert math.isfinite(caught.value.loss)
    for p, b in zip(net.parameters(), before):
        assert torch.equal(p.detach(), b)
