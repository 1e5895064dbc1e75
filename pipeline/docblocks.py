"""Tables that scripts write into the docs between HTML-comment markers, and read back for tests."""

from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = ["replace_block", "read_block", "has_block", "write_result"]


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


def has_block(path: Path, start: str, end: str) -> bool:
    """Whether ``path`` is a file holding both markers (checked before a measurement, not after)."""
    text = Path(path).read_text() if Path(path).is_file() else ""
    return start in text and end in text


def write_result(output: Path, saved: dict, table: str, docs: Path | None, start: str, end: str) -> None:
    """A benchmark's end: ``saved`` as JSON into ``output``, ``table`` printed and, unless ``docs`` is
    None, put between that document's markers; says what it wrote."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(saved, indent=2) + "\n")
    print(table)
    if docs is not None:
        replace_block(docs, start, end, table)
    print(f"wrote {output}" + ("" if docs is None else f" and its table in {docs}"))
