"""Settings chosen from a fixed set: a value checked against its ``Literal`` type.

A choice's allowed values are written once, in its type (``Literal["fp32", "bf16", "fp16"]``).
The config coercer checks values read from YAML or overrides here, and settings classes
built directly in code (the loader's) check their fields here too, so both give the same
error: a :class:`~promoter_dist.errors.ConfigError` naming the dotted key and the choices.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

from .errors import ConfigError


def is_choice(tp: Any) -> bool:
    """Whether the annotation ``tp`` is a ``Literal[...]`` of allowed values."""
    return typing.get_origin(tp) is Literal


def check_choice(value: Any, tp: Any, key: str) -> Any:
    """``value`` when it is one of the values of the ``Literal`` type ``tp``; else a ConfigError naming ``key``."""
    allowed = typing.get_args(tp)
    # Equal is not enough: True == 1 and 2.0 == 2, yet neither is a ZeRO stage or a reading frame.
    if not any(type(value) is type(choice) and value == choice for choice in allowed):
        raise ConfigError(f"{key} must be one of {list(allowed)}, not {value!r}")
    return value


def check_choice_fields(settings: Any, prefix: str) -> None:
    """Every ``Literal``-typed field of the dataclass instance ``settings`` checked; keys read ``prefix.field``."""
    hints = typing.get_type_hints(type(settings))
    for field in dataclasses.fields(settings):
        if is_choice(hints[field.name]):
            check_choice(getattr(settings, field.name), hints[field.name], f"{prefix}.{field.name}")
