"""Learning-rate schedules as pure functions of the step, plus ReduceLROnPlateau with explicit state.

The one-cycle schedule (:func:`one_cycle_lr`, :func:`one_cycle_momentum`) is torch's
``OneCycleLR`` with cosine annealing and two phases, written as functions of the step so that
a resumed run needs no scheduler state: the rate rises from ``max_lr / div_factor`` to
``max_lr`` over the first ``pct_start`` of the steps, then falls to ``max_lr / div_factor /
final_div_factor``; Adam's beta1 (the "momentum") moves the opposite way between
``max_momentum`` and ``base_momentum``. LegNet's recipe (GitHub autosome-ru/dream2022,
``train.py``) uses it with max 0.005, div 25, pct_start 0.3 and torch's other defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ONE_CYCLE = "one_cycle"


def lr_at(step: int, *, base_lr: float, steps_per_epoch: int, name: str = "linear", warmup_steps: int = 0,
          decay_epochs: float = 50.0, final_factor: float = 0.01, per_epoch: bool = True, decay_steps: int = 0,
          pct_start: float = 0.3, div_factor: float = 25.0, final_div_factor: float = 1e4) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of a run.

    'linear' falls from ``base_lr`` to ``final_factor * base_lr`` over ``decay_steps`` steps
    (0: ``decay_epochs`` epochs); 'cosine' does the same on a half cosine; 'constant' stays at
    ``base_lr``. With ``per_epoch`` the rate changes only at epoch boundaries (NAD stepped its
    scheduler once per epoch). Warm-up ramps linearly from 0 over the first ``warmup_steps``
    steps, whatever the shape. 'one_cycle' is :func:`one_cycle_lr` with ``base_lr`` as its
    peak over the same span, moving every step (``per_epoch``, ``warmup_steps`` and
    ``final_factor`` do not apply).
    """
    if name == ONE_CYCLE:
        return one_cycle_lr(step, max_lr=base_lr, total_steps=span_steps(steps_per_epoch, decay_epochs, decay_steps),
                            pct_start=pct_start, div_factor=div_factor, final_div_factor=final_div_factor)
    span = decay_steps if decay_steps else decay_epochs * steps_per_epoch
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if name == "constant" or name == "plateau":
        return base_lr
    progress_steps = (step // steps_per_epoch) * steps_per_epoch if per_epoch else step
    fraction = min(progress_steps / max(span, 1.0), 1.0)
    if name == "linear":
        factor = 1.0 - (1.0 - final_factor) * fraction
    elif name == "cosine":
        factor = final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * fraction))
    else:
        raise ValueError(f"unknown schedule {name!r}")
    return base_lr * factor


def span_steps(steps_per_epoch: int, decay_epochs: float, decay_steps: int = 0) -> int:
    """Optimizer steps a schedule spans: ``decay_steps``, or (when 0) ``decay_epochs`` epochs, at least 1."""
    return max(decay_steps if decay_steps else round(decay_epochs * steps_per_epoch), 1)


def _cosine(start: float, end: float, fraction: float) -> float:
    """From ``start`` (fraction 0) to ``end`` (fraction 1) on a half cosine, as torch's ``_annealing_cos``."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * fraction) + 1)


def _one_cycle(step: int, total_steps: int, pct_start: float, rising: tuple[float, float],
               falling: tuple[float, float]) -> float:
    """Torch's two-phase one-cycle interpolation at ``step``; ``step`` >= total_steps stays at the end value.

    Phase 1 ends at step ``pct_start * total_steps - 1`` (a float, as in torch), phase 2 at
    ``total_steps - 1``; each phase interpolates from where the previous one ended.
    """
    if total_steps < 1:
        raise ValueError(f"one-cycle total_steps must be >= 1, got {total_steps}")
    if not 0 <= pct_start <= 1:
        raise ValueError(f"one-cycle pct_start must be in [0, 1], got {pct_start}")
    rise_end = float(pct_start * total_steps) - 1
    last = total_steps - 1
    step = min(step, last)
    if step <= rise_end:
        return _cosine(*rising, step / rise_end if rise_end > 0 else 1.0)
    if last <= rise_end:  # a one-step cycle: nothing left to fall through
        return falling[1]
    return _cosine(*falling, (step - rise_end) / (last - rise_end))


def one_cycle_lr(step: int, *, max_lr: float, total_steps: int, pct_start: float = 0.3, div_factor: float = 25.0,
                 final_div_factor: float = 1e4) -> float:
    """Rate of step ``step`` (0-based) under torch's ``OneCycleLR`` (cosine, two phases); constant past the end."""
    initial = max_lr / div_factor
    return _one_cycle(step, total_steps, pct_start, (initial, max_lr), (max_lr, initial / final_div_factor))


def one_cycle_momentum(step: int, *, total_steps: int, pct_start: float = 0.3, base_momentum: float = 0.85,
                       max_momentum: float = 0.95) -> float:
    """Adam's beta1 at step ``step`` under ``OneCycleLR(cycle_momentum=True)``: max -> base while the rate rises, back after."""
    return _one_cycle(step, total_steps, pct_start, (max_momentum, base_momentum), (base_momentum, max_momentum))


@dataclass
class Plateau:
    """ReduceLROnPlateau on a validation metric, with its state in plain fields (checkpointed).

    Same rule as torch's: a value better than the best by more than ``threshold`` (relative)
    resets the count; after more than ``patience`` evaluations without one, the rate is
    multiplied by ``factor`` and the count restarts.
    """

    factor: float = 0.5
    patience: int = 2
    mode: str = "min"
    threshold: float = 1e-4
    scale: float = 1.0
    best: float | None = None
    bad_evals: int = 0

    def update(self, value: float) -> float:
        """Record one evaluation; returns the multiplier to apply to the base rate."""
        if not math.isfinite(value):
            improved = False
        elif self.best is None:
            improved = True
        elif self.mode == "min":
            improved = value < self.best * (1 - self.threshold) if self.best > 0 else value < self.best - abs(self.best) * self.threshold
        else:
            improved = value > self.best * (1 + self.threshold) if self.best > 0 else value > self.best + abs(self.best) * self.threshold
        if improved:
            self.best, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
            if self.bad_evals > self.patience:
                self.scale *= self.factor
                self.bad_evals = 0
        return self.scale

    def state_dict(self) -> dict:
        return {"scale": self.scale, "best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.best, self.bad_evals = float(state["scale"]), state["best"], int(state["bad_evals"])
