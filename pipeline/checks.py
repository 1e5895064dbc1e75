"""Small validators shared by the typed configs."""

from __future__ import annotations

from collections.abc import Iterable


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
