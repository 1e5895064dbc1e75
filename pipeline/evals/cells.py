"""The results tables' cells: means over seeds with their spread, KiB, the runs of one table row."""

from __future__ import annotations

import statistics

__all__ = ["kib", "grouped", "cell"]


def kib(n: int) -> str:
    return f"{n / 1024:.0f} KiB" if n >= 10 * 1024 else f"{n / 1024:.1f} KiB"


def grouped(results: list[dict]) -> list[list[dict]]:
    """The results of one (model, variant), all its seeds together, in table order."""
    groups: dict = {}
    for r in results:
        groups.setdefault((r["model"], r["variant"]), []).append(r)
    return list(groups.values())


def cell(runs: list[dict], key: str, digits: int = 2, spread: bool = False) -> str:
    """Mean over the seeds; with ``spread`` and several seeds, +- their standard deviation."""
    values = [r.get(key) for r in runs]
    if any(v is None for v in values):
        return "n/a"
    mean = statistics.fmean(values)
    if spread and len(values) > 1:
        return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"
    return f"{mean:.{digits}f}"
