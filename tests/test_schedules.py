"""Learning-rate schedules (pure functions of the step) and the checkpointable ReduceLROnPlateau."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from promoter_dist.schedules import Plateau, lr_at, one_cycle_lr, one_cycle_momentum

LR = 2e-4
SPE = 10  # steps per epoch


def rates(n_steps: int, **kwargs) -> list[float]:
    kwargs.setdefault("base_lr", LR)
    kwargs.setdefault("steps_per_epoch", SPE)
    return [lr_at(step, **kwargs) for step in range(n_steps)]


def test_linear_per_epoch_is_constant_within_each_epoch_and_steps_down_linearly():
    epochs = 5
    got = rates(epochs * SPE, name="linear", decay_epochs=epochs, final_factor=0.01, per_epoch=True)
    for epoch in range(epochs):
        within = got[epoch * SPE:(epoch + 1) * SPE]
        assert len(set(within)) == 1, (epoch, within)
        assert within[0] == pytest.approx(LR * (1 - 0.99 * epoch / epochs), rel=1e-12)
    assert got[0] == LR
    # As torch's LinearLR(start_factor=1, end_factor=0.01, total_iters=epochs) stepped once per epoch.
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.01, total_iters=epochs)
    for epoch in range(epochs):
        assert got[epoch * SPE] == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9)
        optimizer.step()
        scheduler.step()


def test_linear_reaches_final_factor_at_decay_epochs_and_stays():
    for per_epoch in (True, False):
        end = lr_at(4 * SPE, base_lr=LR, steps_per_epoch=SPE, name="linear", decay_epochs=4, final_factor=0.01,
                    per_epoch=per_epoch)
        assert end == pytest.approx(0.01 * LR, rel=1e-12)
        later = lr_at(9 * SPE + 3, base_lr=LR, steps_per_epoch=SPE, name="linear", decay_epochs=4,
                      final_factor=0.01, per_epoch=per_epoch)
        assert later == pytest.approx(0.01 * LR, rel=1e-12)


def test_linear_per_step_decays_every_step():
    got = rates(4 * SPE, name="linear", decay_epochs=4, final_factor=0.0, per_epoch=False)
    assert all(b < a for a, b in zip(got, got[1:]))
    for step, rate in enumerate(got):
        assert rate == pytest.approx(LR * (1 - step / (4 * SPE)), rel=1e-12)


def test_warmup_ramps_from_near_zero_then_follows_the_shape():
    got = rates(30, name="linear", warmup_steps=5, decay_epochs=3, final_factor=0.1, per_epoch=False)
    assert got[:5] == pytest.approx([LR * k / 5 for k in range(1, 6)], rel=1e-12)
    assert got[4] == pytest.approx(LR)
    no_warmup = rates(30, name="linear", decay_epochs=3, final_factor=0.1, per_epoch=False)
    assert got[5:] == no_warmup[5:]
    constant = rates(8, name="constant", warmup_steps=4)
    assert constant == pytest.approx([LR / 4, LR / 2, 3 * LR / 4, LR, LR, LR, LR, LR], rel=1e-12)


def test_cosine_end_points_and_midpoint():
    kwargs = dict(base_lr=LR, steps_per_epoch=SPE, name="cosine", decay_epochs=4, final_factor=0.05, per_epoch=False)
    assert lr_at(0, **kwargs) == pytest.approx(LR)
    assert lr_at(2 * SPE, **kwargs) == pytest.approx(LR * (0.05 + 0.95 * 0.5), rel=1e-12)
    assert lr_at(4 * SPE, **kwargs) == pytest.approx(0.05 * LR, rel=1e-12)
    assert lr_at(100 * SPE, **kwargs) == pytest.approx(0.05 * LR, rel=1e-12)
    got = [lr_at(s, **kwargs) for s in range(4 * SPE + 1)]
    assert all(b < a for a, b in zip(got, got[1:]))
    per_epoch = rates(4 * SPE, **{**kwargs, "per_epoch": True})
    assert len(set(per_epoch[SPE:2 * SPE])) == 1


def test_constant_and_plateau_base_rate_never_move():
    for name in ("constant", "plateau"):
        assert set(rates(50, name=name, decay_epochs=2, final_factor=0.01)) == {LR}


def test_unknown_shape_raises():
    with pytest.raises(ValueError):
        lr_at(3, base_lr=LR, steps_per_epoch=SPE, name="exponential")


# --------------------------------------------------------------------------- Plateau

LOSSES = [1.0, 0.9, 0.9, 0.95, 0.91, 0.89, 0.8999, 0.8, 0.8, 0.81, 0.80, 0.8, 0.79999, 0.7, 0.7, 0.7, 0.7, 0.7,
          float("nan"), 0.6, 0.6, 0.6, 0.6]
PEARSONS = [0.1, 0.2, 0.2, 0.19, 0.2, 0.25, 0.25001, 0.25, 0.3, 0.3, 0.3, 0.31, 0.3, 0.3, 0.3, 0.4, float("nan"),
            0.4, 0.4, 0.4, 0.4]


def torch_scales(values: list[float], mode: str, factor: float, patience: int) -> list[float]:
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=factor, patience=patience,
                                                           threshold=1e-4, threshold_mode="rel", eps=0.0)
    out = []
    for value in values:
        scheduler.step(value)
        out.append(optimizer.param_groups[0]["lr"])
    return out


@pytest.mark.parametrize("mode, values", [("min", LOSSES), ("max", PEARSONS)])
@pytest.mark.parametrize("factor, patience", [(0.5, 2), (0.1, 0), (0.5, 1), (0.3, 4)])
def test_plateau_matches_torch_reduce_lr_on_plateau(mode, values, factor, patience):
    plateau = Plateau(factor=factor, patience=patience, mode=mode)
    ours = [plateau.update(v) for v in values]
    expected = torch_scales(values, mode, factor, patience)
    assert ours == pytest.approx(expected, rel=1e-12)
    assert min(ours) < 1.0  # the sequences do stall


def test_plateau_counts_patience_then_cuts_and_restarts():
    plateau = Plateau(factor=0.5, patience=2, mode="min")
    assert [plateau.update(v) for v in (1.0, 1.0, 1.0)] == [1.0, 1.0, 1.0]
    assert plateau.update(1.0) == 0.5  # the third evaluation without improvement
    assert plateau.bad_evals == 0
    assert [plateau.update(v) for v in (1.0, 1.0)] == [0.5, 0.5]
    assert plateau.update(0.5) == 0.5 and plateau.best == 0.5 and plateau.bad_evals == 0


def test_plateau_improvement_must_beat_the_relative_threshold():
    plateau = Plateau(factor=0.5, patience=0, mode="min", threshold=0.01)
    plateau.update(1.0)
    assert plateau.update(0.995) == 0.5  # 0.5% better is not 1% better
    assert plateau.best == 1.0
    plateau = Plateau(factor=0.5, patience=0, mode="max", threshold=0.01)
    plateau.update(0.5)
    assert plateau.update(0.504) == 0.5 and plateau.best == 0.5


def test_plateau_negative_metric_worse_value_is_not_an_improvement():
    """Where this differs from torch (whose rel rule inverts for negative values): a worse value never counts."""
    plateau = Plateau(factor=0.5, patience=0, mode="max")
    plateau.update(-0.2)
    assert plateau.update(-0.20001) == 0.5 and plateau.best == -0.2
    assert plateau.update(-0.1) == 0.5 and plateau.best == -0.1
    low = Plateau(factor=0.5, patience=0, mode="min")
    low.update(-1.0)
    assert low.update(-0.99995) == 0.5 and low.best == -1.0


def test_plateau_non_finite_value_is_a_bad_evaluation():
    plateau = Plateau(factor=0.5, patience=0, mode="min")
    assert plateau.update(float("nan")) == 0.5 and plateau.best is None
    assert plateau.update(float("inf")) == 0.25
    assert plateau.update(3.0) == 0.25 and plateau.best == 3.0


def test_plateau_state_dict_round_trip_continues_identically():
    values = LOSSES
    whole = Plateau(factor=0.5, patience=1, mode="min")
    expected = [whole.update(v) for v in values]
    first = Plateau(factor=0.5, patience=1, mode="min")
    got = [first.update(v) for v in values[:9]]
    state = first.state_dict()
    assert set(state) == {"scale", "best", "bad_evals"}
    import json

    state = json.loads(json.dumps(state))  # plain values, as in a checkpoint
    second = Plateau(factor=0.5, patience=1, mode="min")
    second.load_state_dict(state)
    assert (second.scale, second.best, second.bad_evals) == (first.scale, first.best, first.bad_evals)
    got += [second.update(v) for v in values[9:]]
    assert got == expected
    fresh = Plateau()
    fresh.load_state_dict(Plateau().state_dict())
    assert fresh.best is None and fresh.scale == 1.0 and not math.isnan(fresh.scale)


# --------------------------------------------------------------------------- one cycle (LegNet)


def torch_one_cycle(total: int, max_lr: float, pct_start: float, div_factor: float,
                    final_div_factor: float = 1e4) -> tuple[list[float], list[float]]:
    """(rates, beta1s) of every step of torch's OneCycleLR on AdamW, as the team's train.py built it."""
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=max_lr / div_factor, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total, pct_start=pct_start,
                                                    div_factor=div_factor, final_div_factor=final_div_factor)
    rates, betas = [], []
    for step in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        betas.append(optimizer.param_groups[0]["betas"][0])
        optimizer.step()
        if step < total - 1:
            scheduler.step()
    return rates, betas


@pytest.mark.parametrize("total, pct_start, div_factor, final_div", [
    (1000, 0.3, 25.0, 1e4),  # LegNet's shape (its run: 80,000 steps)
    (37, 0.3, 25.0, 1e4),  # phase boundary between steps
    (10, 0.25, 10.0, 100.0),
])
def test_one_cycle_matches_torch_one_cycle_lr_step_by_step(total, pct_start, div_factor, final_div):
    expected_rates, expected_betas = torch_one_cycle(total, 0.005, pct_start, div_factor, final_div)
    rates = [one_cycle_lr(s, max_lr=0.005, total_steps=total, pct_start=pct_start, div_factor=div_factor,
                          final_div_factor=final_div) for s in range(total)]
    betas = [one_cycle_momentum(s, total_steps=total, pct_start=pct_start) for s in range(total)]
    assert rates == pytest.approx(expected_rates, rel=1e-9, abs=1e-15)
    assert betas == pytest.approx(expected_betas, rel=1e-12)
    # through lr_at, as the trainer calls it: decay_steps, or decay_epochs x steps per epoch
    via = [lr_at(s, base_lr=0.005, steps_per_epoch=7, name="one_cycle", decay_steps=total,
                            pct_start=pct_start, div_factor=div_factor, final_div_factor=final_div)
                      for s in range(0, total, max(total // 97, 1))]
    assert via == pytest.approx(expected_rates[:: max(total // 97, 1)], rel=1e-9, abs=1e-15)
    assert via[0] == pytest.approx(0.005 / div_factor)


def test_one_cycle_shape_and_end():
    total = 80_000
    rates = [one_cycle_lr(s, max_lr=0.005, total_steps=total) for s in range(total)]
    peak = int(np.argmax(rates))
    assert peak == 23_999 and rates[peak] == pytest.approx(0.005)  # pct_start 0.3: the peak at step 0.3 x 80,000 - 1
    assert rates[0] == pytest.approx(0.0002) and rates[-1] == pytest.approx(0.0002 / 1e4)
    assert all(b >= a for a, b in zip(rates[:peak], rates[1:peak + 1]))
    assert all(b <= a for a, b in zip(rates[peak:], rates[peak + 1:]))
    # past the end the rate and beta1 stay where the cycle ended (torch raises instead)
    assert one_cycle_lr(total + 5, max_lr=0.005, total_steps=total) == rates[-1]
    assert one_cycle_momentum(peak, total_steps=total) == pytest.approx(0.85)
    assert one_cycle_momentum(total * 2, total_steps=total) == pytest.approx(0.95)
    epochs = [lr_at(s, base_lr=0.005, steps_per_epoch=1000, name="one_cycle", decay_epochs=80) for s in (0, 23_999)]
    assert epochs == pytest.approx([rates[0], rates[23_999]])  # 80 epochs of 1,000 steps = decay_steps 80,000


def test_decay_steps_replace_decay_epochs_for_linear_and_cosine():
    for name in ("linear", "cosine"):
        by_steps = rates(40, name=name, decay_steps=20, decay_epochs=99, final_factor=0.1, per_epoch=False)
        by_epochs = rates(40, name=name, decay_epochs=2, final_factor=0.1, per_epoch=False)
        assert by_steps == pytest.approx(by_epochs, rel=1e-12)
