"""Errors that reach a user as one clear line, never as a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad input, bad option, missing file).

    The CLI prints ``str(error)`` and exits with status 2.
    """


class InputError(UserError):
    """A bad row or file, located by path, 1-based line and field."""

    def __init__(self, path: str, message: str, line: int | None = None, field: str | None = None):
        self.path = path
        self.line = line
        self.field = field
        self.reason = message
        where = path if line is None else f"{path}:{line}"
        what = f" [{field}]" if field else ""
        super().__init__(f"{where}{what}: {message}")


class NonFiniteLossError(UserError):
    """A loss that is NaN or infinite on some rank; the step was not applied."""

    def __init__(self, step: int, loss: float):
        self.step = step
        self.loss = loss
        super().__init__(
            f"non-finite loss ({loss}) at step {step}: the step was not applied and nothing was saved; lower "
            "optim.lr, set engine.gradient_clipping, or use engine.nonfinite=skip to drop such batches"
        )


class ConfigError(UserError):
    """A bad configuration value, named by its dotted key (``engine.zero_stage: ...``)."""
