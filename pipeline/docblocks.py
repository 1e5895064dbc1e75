"""Tables that scripts write into the docs between HTML-comment markers, and read back for tests."""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["replace_block", "read_block"]


def replace_block(path: Path, start: str, end: str, table: str) -> None:
    """Put ``table`` between the ``start`` and ``end`` markers of ``path`` (both must be there)."""
    text = Path(path).read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{path} has no {start} ... {end} block to replace")
    block = f"{start}\n{table}\n{end}"
    Path(path).write_text(re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S))


def read_block(path: Path, start: str, end: str) -> str:
    """What is between the markers of ``path``, stripped."""
    text = Path(path).read_text()
    return text[text.index(start) + len(start): text.index(end)].strip()
