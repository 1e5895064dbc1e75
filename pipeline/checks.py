"""Small validators shared by the typed configs."""

from __future__ import annotations

from collections.abc import Iterable


def one_of(value: str, choices: Iterable[str], what: str) -> str:
    """``value`` if it is one of ``choices``; else a ValueError that lists them."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; known: {', '.join(choices)}")
    return value
