"""GSAM driving a DeepSpeed engine: the rule of :mod:`promoter_dist.optim.gsam` on ZeRO partitions.

Each rank forms the GSAM direction on its own share of the averaged gradient after one scalar
all-reduce of the three inner products (see the rule's derivation in :mod:`promoter_dist.optim.gsam`),
so no whole gradient is ever gathered; :mod:`promoter_dist.optim.engine_grads` says where each ZeRO
stage keeps that share.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from ..distributed import all_reduce_sum_, finite_global_sum, world_size
from ..errors import NonFiniteLossError, UserError
from .engine_grads import (
    LocalGradient,
    global_dots,
    local_gradient,
    managed_params,
    stage3_owned_numel,
    stage12_fragment,
    zero_engine_gradients,
)
from .gsam import (
    GSAMConfig,
    NonFiniteGradientError,
    capture_rng,
    frozen_running_stats,
    gsam_coefficients,
    norm_modules,
    restore_rng,
    rho_at,
)


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
        self.norm_modules = norm_modules(engine.module)
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
