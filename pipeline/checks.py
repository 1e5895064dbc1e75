"""Small validators shared by the typed configs."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from typing import Any

# Seeds fit a signed 64-bit integer: torch, numpy and Arrow all take them there (2**70 killed an actor).
MAX_SEED = 2**63 - 1


def one_of(value: str, choices: Iterable[str], what: str) -> str:
    """``value`` if it is one of ``choices``; else a ValueError that lists them."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; known: {', '.join(choices)}")
    return value


def require_teacher_weights(size: str, source: str | None, field: str = "teacher_source") -> None:
    """A real-size model has no meaningful random initialisation: distilling from one would train a
    student on noise without any error. The seeded random teacher is for the small test sizes."""
    if size == "real" and not source:
        raise ValueError(
            f"{field}: a real-size model needs its released weights (a local folder or file, s3://bucket/path, "
            "or a Hugging Face id); without them the teacher would be random. Seeded random teachers are "
            "for the small, mini and tiny sizes")


def env_seconds(name: str, default: float, minimum: float = 0.0) -> float:
    """A number of seconds from environment variable ``name``: finite and >= ``minimum``, else an
    error that names the variable (never a retry loop that runs forever on ``nan``)."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}: expected a number of seconds, got {raw[:40]!r}") from None
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name}: must be a finite number of seconds >= {minimum:g}, got {raw[:40]!r}")
    return value


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
