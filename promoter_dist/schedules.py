"""Learning-rate schedules as pure functions of the step, plus ReduceLROnPlateau with explicit state."""

from __future__ import annotations

import math
from dataclasses import dataclass


def lr_at(step: int, *, base_lr: float, steps_per_epoch: int, name: str = "linear", warmup_steps: int = 0,
          decay_epochs: float = 50.0, final_factor: float = 0.01, per_epoch: bool = True) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of a run.

    'linear' falls from ``base_lr`` to ``final_factor * base_lr`` over ``decay_epochs``; 'cosine' does
    the same on a half cosine; 'constant' stays at ``base_lr``. With ``per_epoch`` the rate changes
    only at epoch boundaries (NAD stepped its scheduler once per epoch). Warm-up ramps linearly
    from 0 over the first ``warmup_steps`` steps, whatever the shape.
    """
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if name == "constant" or name == "plateau":
        return base_lr
    progress_steps = (step // steps_per_epoch) * steps_per_epoch if per_epoch else step
    fraction = min(progress_steps / max(decay_epochs * steps_per_epoch, 1.0), 1.0)
    if name == "linear":
        factor = 1.0 - (1.0 - final_factor) * fraction
    elif name == "cosine":
        factor = final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * fraction))
    else:
        raise ValueError(f"unknown schedule {name!r}")
    return base_lr * factor


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
