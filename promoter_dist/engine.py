"""The DeepSpeed engine around a single-device model, built from the run config.

Precision: ``engine.precision=bf16`` is bf16 compute over fp32 weights. The model's own
``forward`` runs under ``torch.autocast`` (:func:`autocast_forward`), below the engine:
DeepSpeed's ``engine.forward`` turns autocast OFF around the module when autocast is on outside
it and the DeepSpeed config has no ``torch_autocast`` section (``autocast_if_enabled`` in
``deepspeed/runtime/torch_autocast.py``, 0.19.8), so an autocast around ``engine(...)`` would
compute in fp32 on a GPU. DeepSpeed's own ``torch_autocast`` is not used because ZeRO then
reduces (and at stage 1 accumulates) Linear/Conv gradients in bf16; with autocast inside the
module, gradients, weights, BatchNorm statistics and NAD's GloVe table stay fp32.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn

from .config import TrainConfig, to_deepspeed
from .errors import UserError

log = logging.getLogger("promoter_dist")


def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer handed to DeepSpeed.

    A torch optimizer (needs no JIT-compiled op), except for optimizer states offloaded from GPUs:
    DeepSpeed's CPU Adam, vectorised over the pinned CPU copy (torch's AdamW there would step
    element by element through pageable memory).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optim = config.optim
    kwargs = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
    if optim.name == "lion":
        kwargs.pop("eps")  # Lion takes the sign of its update: no denominator
        if config.engine.offload_optimizer == "cpu" and device.type == "cuda":
            from deepspeed.ops.lion import DeepSpeedCPULion

            return DeepSpeedCPULion(params, **kwargs)
        from lion_pytorch import Lion

        return Lion(params, **kwargs)
    if config.engine.offload_optimizer == "cpu" and device.type == "cuda":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=optim.name == "adamw", **kwargs)
    if optim.name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    return torch.optim.Adam(params, **kwargs)


def autocast_forward(model: nn.Module, device_type: str, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Make ``model``'s forward compute under ``torch.autocast(device_type, dtype)``, whoever calls it.

    The module, its parameters and its state-dict keys are unchanged (the forward is wrapped on
    the instance), so checkpoints and exports are the same as an fp32 model's.
    """
    inner = model.forward

    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type=device_type, dtype=dtype):
            return inner(*args, **kwargs)

    model.forward = forward
    return model


def set_matmul_precision(device: torch.device, tf32: bool) -> None:
    """TF32 tensor cores for fp32 matmuls and convolutions on GPUs that have them (CPU: unchanged)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def build_engine(model: nn.Module, config: TrainConfig, world_size: int, device: torch.device | None = None) -> Any:
    """``deepspeed.initialize`` with the config's optimizer and the DeepSpeed config built from it.

    ``device`` (the rank's compute device) sets the autocast device type for bf16 and the TF32
    policy; default: the CPU.
    """
    import deepspeed

    device = device if device is not None else torch.device("cpu")
    if config.engine.precision == "fp16" and device.type != "cuda":
        raise UserError(f"engine.precision=fp16: DeepSpeed runs fp16 on GPUs only, and this rank computes on the "
                        f"{device.type.upper()}; use engine.precision=bf16 or fp32")
    set_matmul_precision(device, config.engine.tf32)
    if config.engine.precision == "bf16":
        autocast_forward(model, device.type)

    ds_config = to_deepspeed(config, world_size, device.type)
    if config.engine.offload_optimizer != "none" and device.type != "cuda":
        ds_config["zero_force_ds_cpu_optimizer"] = False  # CPU ranks: keep the client torch optimizer
    optimizer = build_optimizer(model, config, device)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def set_learning_rate(engine: Any, lr: float) -> None:
    """Set the rate on every parameter group; ZeRO wrappers share the client optimizer's groups."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def set_beta1(engine: Any, beta1: float) -> None:
    """Set the first moment decay (Adam's and Lion's beta1, a one-cycle schedule's "momentum") on every group."""
    for group in engine.optimizer.param_groups:
        group["betas"] = (beta1, *tuple(group["betas"])[1:])


def parameters_finite(engine: Any) -> bool:
    """True when this rank's share of the weights holds no NaN/inf (ZeRO-3: the local partition)."""
    for param in engine.module.parameters():
        tensor = param.ds_tensor if hasattr(param, "ds_tensor") else param
        if tensor.numel() and not torch.isfinite(tensor.detach()).all():
            return False
    return True
