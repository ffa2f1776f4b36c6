"""What a model is trained on: a task builds its model and turns a batch into a loss or outputs.

Every task offers the same five members, which the trainer calls:
``build_model()``, ``training_loss(model, batch)``, ``evaluate_batch(model, batch)``
(1-D tensors the trainer concatenates over batches and ranks), ``summarize(arrays)``
(metrics from those arrays) and ``export(model, out_dir)``; plus ``tokens`` (the loader's
token kind).
"""

from __future__ import annotations

from typing import Any


def build_task(config: Any) -> Any:
    """The task object for ``config.task.name`` (imports only what it needs)."""
    if config.task.name == "mlm":
        from .mlm import MLMTask

        return MLMTask(config)
    if config.task.name == "soft_classification":
        from .soft_classification import SoftClassificationTask

        return SoftClassificationTask(config)
    from .regression import RegressionTask

    return RegressionTask(config)
