"""Where more of a teacher's continuation recipe leads: the learning curve of a chain of continuations
(issue 26, item 1: "if 0.05 is out of reach, show the learning curve that says what would reach it").

A chain is teacher.json records each trained from the one before (``jobs.train_teachers --init-from``,
matched by the source's sha256) with the same recipe (phases, lr, rows per phase): equal increments of
training. Each continuation's gain in a held-out figure (PER, accuracy at phoneme starts) is taken to
be a constant fraction ``r`` of the one before (fit by least squares to the logs of the gains), so the
figure tends to ``last + next_gain / (1 - r)``. Two gains determine the fit exactly; each further run
tests it: ``hindcast`` is the projection made without the last run, to set beside what it measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.evals.claims import THRESHOLDS

__all__ = ["Projection", "chain", "project", "hindcast", "projection_lines", "GOALS"]

# The teacher gate of issue 26, item 1: (held-out key, goal, lower is better, how the docs print it).
GOALS = (("per", THRESHOLDS.teacher_per, True, "{:.3f}", "PER"),
         ("accuracy_phoneme_starts", THRESHOLDS.teacher_phoneme_starts, False, "{:.1%}", "phoneme starts"))
MAX_STEPS_AHEAD = 50  # how many continuations ahead "reaches the goal after k" looks


def _recipe(record: dict) -> tuple:
    t = record["train"]
    return (tuple(tuple(sorted(p.items())) for p in t["phases"]), t["lr"], t["rows_per_phase"])


def _files_key(files: dict) -> tuple:
    return tuple(sorted(files.items()))


def chain(records: list[dict]) -> list[dict]:
    """The last record's chain among ``records``: it, then its source, and so on back while each
    continuation has the last one's recipe, and the record that chain started from; oldest first.
    A branch (a run of another recipe from the same source, listed anywhere) is not part of it."""
    by_files = {_files_key(r["files"]): r for r in records}
    found = [records[-1]]
    while True:
        source = found[-1]["train"].get("init_from")
        before = by_files.get(_files_key(source["files"])) if source else None
        if before is None:
            break
        found.append(before)
        if before["train"].get("init_from") is None or _recipe(before) != _recipe(records[-1]):
            break  # the start of the chain: trained from scratch or by another recipe
    return found[::-1]


@dataclass(frozen=True)
class Projection:
    key: str
    values: tuple[float, ...]  # the chain's figures, the start first
    ratio: float | None  # each gain over the one before (fit); None: the gains do not shrink steadily
    next: float | None
    limit: float | None
    goal: float
    lower_is_better: bool
    reached_after: int | None  # continuations ahead until the goal (0: met now; None: not within reach)

    def meets(self, value: float) -> bool:
        return value <= self.goal if self.lower_is_better else value >= self.goal


def project(values: list[float], goal: float, lower_is_better: bool, key: str = "") -> Projection:
    """The geometric projection of a chain's figures (``values[0]`` the start, then one per continuation)."""
    if len(values) < 3:
        raise ValueError(f"a projection needs the start and at least 2 continuations, got {len(values)} figures")
    gains = np.diff(np.asarray(values, dtype=float))
    n = len(gains)
    ratio = next_value = limit = reached = fitted = None
    if np.all(gains != 0) and (np.all(gains > 0) or np.all(gains < 0)):
        slope, intercept = np.polyfit(np.arange(1, n + 1), np.log(np.abs(gains)), 1)
        if slope < 0:  # shrinking gains: a geometric series with a limit
            ratio = math.exp(slope)
            sign = math.copysign(1.0, gains[0])

            def gain_at(i: int) -> float:  # the fitted gain of continuation i (1: the first)
                return sign * math.exp(intercept + slope * i)

            fitted = gain_at
            next_value = values[-1] + gain_at(n + 1)
            limit = values[-1] + gain_at(n + 1) / (1 - ratio)
    projection = Projection(key, tuple(values), ratio, next_value, limit, goal, lower_is_better, None)
    if projection.meets(values[-1]):
        reached = 0
    elif fitted is not None:
        value = values[-1]
        for k in range(1, MAX_STEPS_AHEAD + 1):
            value += fitted(n + k)
            if projection.meets(value):
                reached = k
                break
    return Projection(key, tuple(values), ratio, next_value, limit, goal, lower_is_better, reached)


def hindcast(values: list[float], goal: float, lower_is_better: bool) -> Projection | None:
    """The projection made without the last figure (None: too few left), to hold against it."""
    return project(values[:-1], goal, lower_is_better) if len(values) >= 4 else None


def projection_lines(records: list[dict]) -> list[str]:
    """The docs' lines under a chain of continuations: for each goal of the teacher gate, the fit,
    the next run's and the limiting figure and whether (after how many runs) the goal is reached;
    with four runs or more, the projection made without the last one beside what it measured.
    Empty when the last record's chain holds fewer than two continuations of one recipe."""
    runs = chain(records)
    if len(runs) < 3:
        return []
    numbers = {id(r): n for n, r in enumerate(records, 1)}
    span = f"runs {', '.join(str(numbers[id(r)]) for r in runs)}"
    t = runs[-1]["train"]
    lines = []
    for key, goal, lower, fmt, label in GOALS:
        values = [r["heldout"][key] for r in runs]
        p = project(values, goal, lower, key)
        head = (f"- projection of {label} over {span} (each {t['steps']:,}-step continuation at lr {t['lr']:g} "
                f"gaining a constant fraction of the one before, fit to {len(values) - 1} gains): ")
        if p.ratio is None:
            verdict = "the gains do not shrink steadily: no limit from this curve"
        elif p.reached_after == 0:
            verdict = f"meets {fmt.format(goal)} already"
        elif p.reached_after is not None:
            verdict = f"reaches {fmt.format(goal)} after {p.reached_after} more"
        else:
            verdict = f"the limit misses {fmt.format(goal)}: more of this recipe does not reach it"
        fit = "" if p.ratio is None else f"ratio {p.ratio:.2f}; next {fmt.format(p.next)}, limit {fmt.format(p.limit)}; "
        lines.append(head + fit + verdict)
        before = hindcast(values, goal, lower)
        if before is not None:
            said = "no limit" if before.next is None else f"next {fmt.format(before.next)}"
            lines.append(f"  - made without run {numbers[id(runs[-1])]}, the same projection said {said}; "
                         f"run {numbers[id(runs[-1])]} measured {fmt.format(values[-1])}")
    return lines
