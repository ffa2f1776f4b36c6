"""Optimizer wrappers.

- :mod:`promoter_dist.optim.gsam`: GSAM settings, the update rule and a one-process reference.
- :mod:`promoter_dist.optim.gsam_deepspeed`: GSAM driving a DeepSpeed engine (ZeRO 0-3).
- :mod:`promoter_dist.optim.engine_grads`: where each ZeRO stage keeps the accumulated gradient.
"""
