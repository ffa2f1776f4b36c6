"""GSAM (surrogate gap guided sharpness-aware minimisation) around a plain optimizer or a DeepSpeed engine.

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

from ..errors import NonFiniteLossError, UserError
from .engine_grads import (
    LocalGradient,
    all_reduce_sum_,
    finite_global_sum,
    global_dots,
    local_gradient,
    managed_params,
    stage3_owned_numel,
    stage12_fragment,
    world_size,
    zero_engine_gradients,
)

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
                raise ValueError(f"{_KEY}{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("rho_max", "rho_min", "alpha", "eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{_KEY}{name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{_KEY}{name} must be a finite number >= 0, got {value}")
            setattr(self, name, float(value))
        if self.rho_min > self.rho_max:
            raise ValueError(f"{_KEY}rho_min ({self.rho_min}) must not exceed {_KEY}rho_max ({self.rho_max})")
        if self.eps <= 0:
            raise ValueError(f"{_KEY}eps must be > 0, got {self.eps}")


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


def _norm_modules(model: nn.Module) -> list[nn.modules.batchnorm._NormBase]:
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
    for m in modules if modules is not None else _norm_modules(model):
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


def check_engine_supported(engine) -> None:
    """Raise ``UserError`` for DeepSpeed configurations the GSAM driver does not handle."""
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    problems = []
    if engine.fp16_enabled():
        problems.append("fp16.enabled (loss scaling would skip steps mid-GSAM): use fp32")
    if engine.bfloat16_enabled():
        problems.append(
            "bf16.enabled (bf16 weights lose most of the perturbation): keep fp32 weights and set "
            'torch_autocast: {"enabled": true, "dtype": "bfloat16"} for bf16 compute'
        )
    offloads = {"offload_param": engine.zero_offload_param(), "offload_optimizer": engine.zero_offload_optimizer()}
    for name, offload in offloads.items():
        if offload is not None and offload.device != OffloadDeviceEnum.none:
            problems.append(f"zero_optimization.{name} (not supported with GSAM)")
    if engine.zero_optimization_stage() == 3 and engine.zero_hpz_partition_size() > 1:
        problems.append("zero_optimization.zero_hpz_partition_size > 1 (not supported with GSAM)")
    if engine.zero_quantized_weights() or engine.zero_quantized_gradients():
        problems.append("ZeRO++ quantized weights/gradients (not supported with GSAM)")
    if engine.mpu is not None:
        problems.append("model/tensor parallelism (GSAM supports data parallelism only)")
    if not engine.managed_gradient_accumulation():
        problems.append("managed_gradient_accumulation=false (GSAM sets the accumulation boundary itself)")
    if engine.optimizer is None:
        problems.append("no optimizer (pass the torch optimizer to deepspeed.initialize)")
    if problems:
        raise UserError("optim.gsam.enabled is not supported with this DeepSpeed config: " + "; ".join(problems))


class DeepSpeedGSAM:
    """GSAM driving an initialised DeepSpeed engine (ZeRO 0-3, fp32 weights, data parallel).

    The engine keeps its own optimizer, LR scheduler, reduction and clipping; this driver runs the two
    forward/backward passes, moves the weights the forward reads to w + e and back, and replaces the
    engine's reduced gradient by the GSAM direction before ``engine.step()`` (which then clips with the
    config's ``gradient_clipping``, steps the optimizer and the LR scheduler).

    ``step(micro_batches, loss_fn)`` takes exactly ``engine.gradient_accumulation_steps()`` micro-batches
    of this rank; ``loss_fn(batch)`` must run the forward through the engine (``engine(...)``, not
    ``engine.module``) and return the scalar mean loss of that micro-batch. It returns the first-pass
    loss averaged over micro-batches and ranks (the same value on every rank, detached).
    """

    def __init__(self, engine, config: GSAMConfig, lr_max: float, lr_min: float):
        check_engine_supported(engine)
        self.engine = engine
        self.config = config
        self.lr_max = float(lr_max)
        self.lr_min = float(lr_min)
        self.stage = engine.zero_optimization_stage()
        self.params = managed_params(engine)  # fixed once the engine is built
        self.norm_modules = _norm_modules(engine.module)
        self.steps = 0
        self.last_rho = float("nan")

    # ------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """The driver's own state (optimizer and scheduler state live in the engine's checkpoint)."""
        return {"steps": self.steps, "last_rho": self.last_rho}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.last_rho = float(state.get("last_rho", float("nan")))

    # ------------------------------------------------------------- passes
    def _check_loss(self, loss: torch.Tensor) -> float:
        finite, total = finite_global_sum(loss)
        if not finite:
            local = float(loss.detach())
            raise NonFiniteLossError(self.engine.global_steps, local if not math.isfinite(local) else total)
        return total

    def _run_pass(self, micro_batches: Sequence, loss_fn: Callable[[Any], torch.Tensor], rng_states: list) -> float:
        """Forward/backward every micro-batch, the last one at the accumulation boundary; global loss sum."""
        engine = self.engine
        replay = bool(rng_states)
        total = 0.0
        for i, batch in enumerate(micro_batches):
            if replay:
                restore_rng(rng_states[i])
            else:
                rng_states.append(capture_rng())
            engine.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
            loss = loss_fn(batch)
            total += self._check_loss(loss)
            engine.backward(loss)
        return total

    # ------------------------------------------------------------- weights the forward reads
    def _perturbation_targets(self, g_local: LocalGradient, g_flat: torch.Tensor) -> tuple[list, list, bool]:
        """(weight views, matching gradient views, partitioned) on which w += e is applied."""
        params = self.params
        if self.stage == 0:
            return [p.data.view(-1) for p in params], list(g_flat.split(g_local.sizes())), False
        if self.stage in (1, 2):
            # Every rank runs the forward with whole weights, so it needs the whole gradient: scatter
            # this rank's fragments into a zero vector and sum over ranks (fragments are disjoint).
            sizes = [p.numel() for p in params]
            full = torch.zeros(sum(sizes), dtype=torch.float32, device=g_flat.device)
            offset = 0
            cursor = 0
            for p, size in zip(params, sizes):
                owned = stage12_fragment(p)
                if owned is not None:
                    start, fragment = owned
                    full.narrow(0, offset + start, fragment.numel()).copy_(g_flat.narrow(0, cursor, fragment.numel()))
                    cursor += fragment.numel()
                offset += size
            if g_local.partitioned:
                all_reduce_sum_(full)
            return [p.data.view(-1) for p in params], list(full.split(sizes)), False
        # Stage 3: perturb this rank's partition of each weight; the forward gathers it.
        weights = [p.ds_tensor.data.view(-1).narrow(0, 0, stage3_owned_numel(p)) for p in params]
        return weights, list(g_flat.split(g_local.sizes())), g_local.partitioned

    def _release_gathered_weights(self) -> None:
        # ZeRO-3 keeps small ("persistent") parameters gathered between steps; drop every gathered
        # copy so that the next forward re-gathers from the (perturbed or restored) partitions.
        if self.stage == 3:
            self.engine.optimizer.empty_partition_cache()

    @torch.no_grad()
    def _perturb(self, g_local: LocalGradient, g_flat: torch.Tensor, g_dot_g: float, rho: float) -> tuple[list, list]:
        weights, grads, partitioned = self._perturbation_targets(g_local, g_flat)
        saved = [w.clone() for w in weights]
        if rho == 0.0:
            return weights, saved
        self._release_gathered_weights()
        if self.config.adaptive:
            scaled = torch._foreach_mul(weights, grads)  # w * g
            # A rank without a partition still joins the all-reduce (with nothing to add).
            flat = torch.cat(scaled) if scaled else g_flat.new_zeros(0)
            (wg_dot_wg,) = global_dots([(flat, flat)], partitioned)
            scale = rho / (math.sqrt(wg_dot_wg) + self.config.eps)
            torch._foreach_mul_(scaled, weights)  # w^2 * g
            torch._foreach_add_(weights, scaled, alpha=scale)
        else:
            scale = rho / (math.sqrt(g_dot_g) + self.config.eps)
            torch._foreach_add_(weights, grads, alpha=scale)
        return weights, saved

    @torch.no_grad()
    def _restore(self, weights: list, saved: list) -> None:
        self._release_gathered_weights()
        torch._foreach_copy_(weights, saved)
        self._release_gathered_weights()

    # ------------------------------------------------------------- the step
    def step(self, micro_batches: Sequence, loss_fn: Callable[[Any], torch.Tensor]) -> torch.Tensor:
        """One GSAM optimizer step over this rank's micro-batches; returns the global mean first-pass loss."""
        engine = self.engine
        expected = engine.gradient_accumulation_steps()
        if len(micro_batches) != expected:
            raise ValueError(
                f"DeepSpeedGSAM.step needs gradient_accumulation_steps = {expected} micro-batches, "
                f"got {len(micro_batches)}"
            )
        cfg = self.config
        rho = rho_at(engine.get_lr()[0], self.lr_max, self.lr_min, cfg.rho_max, cfg.rho_min)
        self.last_rho = rho

        # Pass 1 at w: the averaged gradient g.
        zero_engine_gradients(engine)
        rng_states: list = []
        loss_sum = self._run_pass(micro_batches, loss_fn, rng_states)
        g_local = local_gradient(engine, self.params)
        g_flat = g_local.flat_copy(engine.device)  # survives the engine's buffers being reused by pass 2
        mean_loss = loss_sum / (len(micro_batches) * world_size())
        (g_dot_g,) = global_dots([(g_flat, g_flat)], g_local.partitioned)
        if not math.isfinite(g_dot_g):  # the same value on every rank: all raise together
            zero_engine_gradients(engine)
            raise NonFiniteGradientError(engine.global_steps, mean_loss, "first-pass")

        # Pass 2 at w + e, same micro-batches and random draws, BatchNorm statistics left alone.
        weights, saved = self._perturb(g_local, g_flat, g_dot_g, rho)
        try:
            zero_engine_gradients(engine)
            with frozen_running_stats(engine.module, self.norm_modules):
                self._run_pass(micro_batches, loss_fn, rng_states)
        except BaseException:
            self._restore(weights, saved)
            zero_engine_gradients(engine)
            raise
        self._restore(weights, saved)

        # d = a * g + b * g', written over the engine's reduced gradient on each rank's partition.
        with torch.no_grad():
            gp_local = local_gradient(engine, self.params)
            gp_flat = gp_local.flat_copy(engine.device)
            g_dot_gp, gp_dot_gp = global_dots([(g_flat, gp_flat), (gp_flat, gp_flat)], gp_local.partitioned)
            if not (math.isfinite(g_dot_gp) and math.isfinite(gp_dot_gp)):
                zero_engine_gradients(engine)
                raise NonFiniteGradientError(engine.global_steps, mean_loss, "perturbed")
            a, b = gsam_coefficients(g_dot_gp, gp_dot_gp, cfg.alpha, cfg.eps)
            torch._foreach_mul_(gp_local.pieces, b)
            torch._foreach_add_(gp_local.pieces, list(g_flat.split(gp_local.sizes())), alpha=a)
            gp_local.writeback()

        engine.set_gradient_accumulation_boundary(True)
        engine.step()
        self.steps += 1
        return torch.tensor(mean_loss)
