"""GSAM (surrogate gap guided sharpness-aware minimisation): settings, the rule, and a one-process reference.

The DeepSpeed driver that applies the same rule to ZeRO partitions is
:mod:`promoter_dist.optim.gsam_deepspeed`; this module imports nothing of DeepSpeed.

GSAM (Zhuang et al. 2022, arXiv:2203.08065), one step:

1. g = gradient of the loss at the weights w;
2. perturb: w' = w + rho_t * g / ||g||  (adaptive variant: w' = w + rho_t * w^2 g / ||w g||, as ASAM);
3. g' = gradient at w';
4. split g into its part along g' and the remainder g_perp = g - (<g,g'>/<g',g'>) g';
5. restore w and let the base optimizer step with d = g' - alpha * g_perp.

rho_t follows the learning rate (paper, Sec. 4): rho_t = rho_min + (rho_max - rho_min) * (lr_t - lr_min) /
(lr_max - lr_min). Because d = -alpha * g + (1 + alpha <g,g'>/<g',g'>) * g' only needs the three global
inner products, each rank can form d on its own gradient partition after one scalar all-reduce: that is
how ZeRO-1/2/3 partitions are handled here, without gathering whole gradients.

Which gradient is perturbed with: the *global* gradient, averaged over all ranks and all
gradient-accumulation micro-batches (what DeepSpeed's reduction produces). The paper's implementation
perturbs each worker with its own local gradient; ZeRO-2/3 reduce gradients as they are produced and
``engine.no_sync()`` refuses them, so the toolkit uses the global gradient at every stage. The result is
therefore independent of the number of ranks: ``ReferenceGSAM`` on one process over the same global
batch gives the same update.

Precision policy: the perturbation rho * g/||g|| is small relative to the weights, and bf16 weights lose
most of it (measured: 82% of elements unchanged for rho 0.05), so with GSAM on the weights, the fp32
master, and the gradients stay fp32. bf16 is supported as compute only: ``torch.autocast`` inside
``loss_fn`` (gradients reduced in fp32; preferred), or DeepSpeed's ``torch_autocast`` section, which also
reduces the gradients of Linear/Conv parameters in bf16 (measured against fp32 reduction after 4 steps:
9e-5 at ZeRO-2/3, 1e-3 at ZeRO-1, where they are also accumulated in bf16). DeepSpeed's
``bf16.enabled`` and ``fp16.enabled`` are refused with a message saying so.

Other details, as in NAD's implementation (de-Boer-Lab/random-promoter-dream-challenge-2022,
``dream_submissions/NAD/code/Util/sam.py``): BatchNorm running statistics are not updated by the
perturbed pass, and 1e-12 guards both divisions. Unlike NAD, random draws (dropout, label noise taken
from the global RNG) are replayed in the perturbed pass, so both passes see the same function.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..errors import ConfigError, NonFiniteLossError, UserError

_KEY = "optim.gsam."  # prefix of every config key named in an error message


class NonFiniteGradientError(NonFiniteLossError):
    """A finite loss whose gradient (at w or at w + e) has a NaN/infinite norm; the step was not applied.

    A subclass so that callers handling non-finite losses (stop, or skip the step) handle this alike.
    """

    def __init__(self, step: int, loss: float, which: str):
        self.step = step
        self.loss = loss
        UserError.__init__(
            self,
            f"non-finite {which} gradient norm at step {step} (mean loss {loss:.6g}): the step was not applied; "
            "lower optim.lr or optim.gsam.rho_max, or set engine.gradient_clipping",
        )


@dataclass
class GSAMConfig:
    """GSAM settings (``optim.gsam`` in a run config). Defaults are NAD's: constant rho 0.1, alpha 0.05.

    Source: NAD's ``main.py`` builds ``SAM(..., alpha=0.05, rho=0.1)`` with no rho schedule and no
    adaptive scaling (de-Boer-Lab/random-promoter-dream-challenge-2022, dream_submissions/NAD/code), so
    rho_min = rho_max = 0.1 reproduces it; set rho_min < rho_max for the paper's LR-coupled schedule.
    """

    enabled: bool = False
    """Wrap the optimizer in GSAM (two forward/backward passes per step)."""
    rho_max: float = 0.1
    """Perturbation radius when the learning rate is at lr_max (NAD: 0.1)."""
    rho_min: float = 0.1
    """Perturbation radius when the learning rate is at its floor, schedule.final_factor x optim.lr (NAD: 0.1, i.e. constant rho)."""
    alpha: float = 0.05
    """Weight of the surrogate-gap term: d = g' - alpha * g_perp (0 gives SAM; NAD: 0.05)."""
    adaptive: bool = False
    """Scale the perturbation elementwise by |w| as in ASAM (NAD: off)."""
    eps: float = 1e-12
    """Guard added to the denominators ||g|| and <g',g'> (NAD: 1e-12)."""

    def __post_init__(self) -> None:
        for name in ("enabled", "adaptive"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{_KEY}{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("rho_max", "rho_min", "alpha", "eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{_KEY}{name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{_KEY}{name} must be a finite number >= 0, got {value}")
            setattr(self, name, float(value))
        if self.rho_min > self.rho_max:
            raise ConfigError(f"{_KEY}rho_min ({self.rho_min}) must not exceed {_KEY}rho_max ({self.rho_max})")
        if self.eps <= 0:
            raise ConfigError(f"{_KEY}eps must be > 0, got {self.eps}")


def rho_at(lr: float, lr_max: float, lr_min: float, rho_max: float, rho_min: float) -> float:
    """The perturbation radius for learning rate ``lr`` (GSAM paper, Sec. 4).

    rho = rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min), with the fraction clamped to
    [0, 1] so that a warm-up below lr_min cannot give a radius below rho_min (or a negative one); when
    lr_max == lr_min the schedule is constant at rho_max.
    """
    if lr_max == lr_min:
        return rho_max
    fraction = (lr - lr_min) / (lr_max - lr_min)
    fraction = min(1.0, max(0.0, fraction))
    return rho_min + (rho_max - rho_min) * fraction


def gsam_coefficients(g_dot_gp: float, gp_dot_gp: float, alpha: float, eps: float) -> tuple[float, float]:
    """(a, b) with d = a * g + b * g' = g' - alpha * (g - <g,g'>/(<g',g'> + eps) * g')."""
    along = g_dot_gp / (gp_dot_gp + eps)
    return -alpha, 1.0 + alpha * along


def norm_modules(model: nn.Module) -> list[nn.modules.batchnorm._NormBase]:
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats and m.running_mean is not None
    ]


@contextmanager
def frozen_running_stats(model: nn.Module, modules: Sequence[nn.Module] | None = None) -> Iterator[None]:
    """Run a block without changing any BatchNorm running statistic (restored exactly on exit).

    ``modules``: the model's normalisation modules if already listed (saves a walk over the model).
    """
    saved = []
    for m in modules if modules is not None else norm_modules(model):
        buffers = [m.running_mean, m.running_var, m.num_batches_tracked]
        saved.append((buffers, [b.clone() if b is not None else None for b in buffers]))
    try:
        yield
    finally:
        with torch.no_grad():
            for buffers, copies in saved:
                for buffer, copy in zip(buffers, copies):
                    if buffer is not None:
                        buffer.copy_(copy)


def _accelerator_has_own_rng() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def capture_rng() -> tuple[torch.Tensor, Any]:
    """The global CPU RNG state and, on a GPU, the current device's."""
    device_state = torch.cuda.get_rng_state() if _accelerator_has_own_rng() else None
    return torch.get_rng_state(), device_state


def restore_rng(state: tuple[torch.Tensor, Any]) -> None:
    cpu_state, device_state = state
    torch.set_rng_state(cpu_state)
    if device_state is not None:
        torch.cuda.set_rng_state(device_state)


class ReferenceGSAM:
    """GSAM in one process around any torch optimizer: the readable version the tests trust.

    ``step(micro_batches, loss_fn)`` averages gradients over the micro-batches (as DeepSpeed's gradient
    accumulation does, and as all ranks together do under data parallelism), and, when
    ``gradient_clipping`` > 0, clips the final direction d by its global norm with DeepSpeed's rule
    (scale by max_norm / (||d|| + 1e-6) when that is below 1) just before the base optimizer steps. It
    does not step any LR scheduler: the caller does, after ``step``.
    """

    def __init__(
        self,
        model: nn.Module,
        base_optimizer: torch.optim.Optimizer,
        config: GSAMConfig,
        lr_max: float,
        lr_min: float,
        gradient_clipping: float = 0.0,
    ):
        self.model = model
        self.base_optimizer = base_optimizer
        self.config = config
        self.lr_max = float(lr_max)
        self.lr_min = float(lr_min)
        self.gradient_clipping = float(gradient_clipping)
        self.steps = 0
        self.last_rho = float("nan")
        self.last_direction_norm = float("nan")
        """Global norm of d before clipping in the last step (what DeepSpeed reports as grad norm)."""

    def _params(self) -> list[nn.Parameter]:
        return [p for group in self.base_optimizer.param_groups for p in group["params"] if p.requires_grad]

    def _accumulate(self, micro_batches: Sequence, loss_fn: Callable[[Any], torch.Tensor], rng_states: list) -> float:
        """Zero the gradients, then sum the gradients of mean(loss over micro-batches); return that mean."""
        self.base_optimizer.zero_grad(set_to_none=True)
        total = 0.0
        replay = bool(rng_states)
        for i, batch in enumerate(micro_batches):
            if replay:
                restore_rng(rng_states[i])
            else:
                rng_states.append(capture_rng())
            loss = loss_fn(batch)
            if not torch.isfinite(loss.detach()):
                raise NonFiniteLossError(self.steps, float(loss.detach()))
            (loss / len(micro_batches)).backward()
            total += float(loss.detach())
        return total / len(micro_batches)

    def step(self, micro_batches: Sequence, loss_fn: Callable[[Any], torch.Tensor]) -> torch.Tensor:
        """One GSAM step over ``micro_batches``; returns the mean first-pass loss (detached)."""
        if len(micro_batches) == 0:
            raise ValueError("ReferenceGSAM.step needs at least one micro-batch")
        cfg = self.config
        params = self._params()
        rho = rho_at(self.base_optimizer.param_groups[0]["lr"], self.lr_max, self.lr_min, cfg.rho_max, cfg.rho_min)
        self.last_rho = rho

        rng_states: list = []
        mean_loss = self._accumulate(micro_batches, loss_fn, rng_states)
        # Parameters the loss does not reach take part with a zero gradient (as under DeepSpeed).
        g = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]

        with torch.no_grad():
            if cfg.adaptive:
                norm = torch.sqrt(sum(((p * gi) ** 2).sum() for p, gi in zip(params, g)))
                perturbation = [rho / (norm + cfg.eps) * p * p * gi for p, gi in zip(params, g)]
            else:
                norm = torch.sqrt(sum((gi**2).sum() for gi in g))
                perturbation = [rho / (norm + cfg.eps) * gi for gi in g]
            if not torch.isfinite(norm):
                raise NonFiniteGradientError(self.steps, mean_loss, "first-pass")
            saved = [p.detach().clone() for p in params]
            for p, e in zip(params, perturbation):
                p.add_(e)

        try:
            with frozen_running_stats(self.model):
                self._accumulate(micro_batches, loss_fn, rng_states)
        finally:
            with torch.no_grad():
                for p, w in zip(params, saved):
                    p.copy_(w)

        with torch.no_grad():
            g_perturbed = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
            g_dot_gp = sum((a * b).sum() for a, b in zip(g, g_perturbed))
            gp_dot_gp = sum((b * b).sum() for b in g_perturbed)
            if not torch.isfinite(g_dot_gp + gp_dot_gp):
                raise NonFiniteGradientError(self.steps, mean_loss, "perturbed")
            along = g_dot_gp / (gp_dot_gp + cfg.eps)
            directions = [gp - cfg.alpha * (gi - along * gp) for gi, gp in zip(g, g_perturbed)]
            total_norm = torch.sqrt(sum((d**2).sum() for d in directions))
            self.last_direction_norm = float(total_norm)
            if self.gradient_clipping > 0:
                clip = self.gradient_clipping / (total_norm + 1e-6)
                if clip < 1:
                    directions = [d * clip for d in directions]
            for p, d in zip(params, directions):
                p.grad = d
        self.base_optimizer.step()
        self.base_optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return torch.tensor(mean_loss)
