"""Optimizer wrappers: GSAM around a plain torch optimizer or a DeepSpeed engine."""

from .engine_grads import all_ranks_finite, zero_engine_gradients
from .gsam import DeepSpeedGSAM, GSAMConfig, NonFiniteGradientError, ReferenceGSAM, rho_at

__all__ = [
    "DeepSpeedGSAM",
    "GSAMConfig",
    "NonFiniteGradientError",
    "ReferenceGSAM",
    "all_ranks_finite",
    "rho_at",
    "zero_engine_gradients",
]
