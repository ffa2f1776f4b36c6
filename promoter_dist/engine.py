"""The DeepSpeed engine around a single-device model, built from the run config."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .config import TrainConfig, to_deepspeed

log = logging.getLogger("promoter_dist")


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The torch optimizer handed to DeepSpeed (a client optimizer needs no JIT-compiled op)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optim = config.optim
    kwargs = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
    if optim.name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    return torch.optim.Adam(params, **kwargs)


def build_engine(model: nn.Module, config: TrainConfig, world_size: int) -> Any:
    """``deepspeed.initialize`` with the config's optimizer and the DeepSpeed config built from it."""
    import deepspeed

    ds_config = to_deepspeed(config, world_size)
    if config.engine.offload_optimizer != "none":
        ds_config["zero_force_ds_cpu_optimizer"] = False  # keep the client torch optimizer
    optimizer = build_optimizer(model, config)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def set_learning_rate(engine: Any, lr: float) -> None:
    """Set the rate on every parameter group; ZeRO wrappers share the client optimizer's groups."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def parameters_finite(engine: Any) -> bool:
    """True when this rank's share of the weights holds no NaN/inf (ZeRO-3: the local partition)."""
    for param in engine.module.parameters():
        tensor = param.ds_tensor if hasattr(param, "ds_tensor") else param
        if tensor.numel() and not torch.isfinite(tensor.detach()).all():
            return False
    return True
