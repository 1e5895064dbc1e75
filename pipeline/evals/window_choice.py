"""Choosing W before training: the teacher's attention mass on the prefix + the last W tokens.

The paper's Table 2 analysis, on the user's teacher and data: for each candidate W, the mean share
of every generated query's attention (over layers, heads and queries farther than W from the
prefix) that falls on the conditioning prefix or on the last W generated tokens, overall and per
layer. WAND keeps exactly that mass and drops the rest, so the smallest W that keeps 95% is the
recommended ``window_target``, and the curriculum starts at 4x that or more (the paper: 128 -> 32).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from wand.attention_mass import attention_mass, AttentionMass
from wand.batch import forward_inputs

__all__ = ["COVERAGES", "DEFAULT_WINDOWS", "WindowChoice", "choose_window"]

COVERAGES = (0.90, 0.95, 0.99)
RECOMMEND_AT = 0.95
DEFAULT_WINDOWS = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@dataclass
class WindowChoice:
    masses: list[AttentionMass]
    smallest: dict[float, int | None]  # coverage -> smallest W that keeps it (None: no W tried does)
    window_target: int
    window_start: int
    rows: int
    longest_generation: int
    notes: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        out = {f"attn_kept_w{m.window}": m.kept for m in self.masses}
        out.update({f"window_for_{round(c * 100)}pct": float(w) for c, w in self.smallest.items() if w is not None})
        return {**out, "recommended_window_target": float(self.window_target),
                "recommended_window_start": float(self.window_start)}

    def table(self) -> str:
        layers = len(self.masses[0].layers) if self.masses else 0
        lines = ["| W | prefix | last W | kept | dropped | lowest layer (kept) |", "|---:|---:|---:|---:|---:|---|"]
        for m in self.masses:
            low = min(range(layers), key=lambda i: m.layers[i]) if layers else None
            lowest = f"layer {low}: {m.layers[low]:.3f}" if low is not None else "-"
            lines.append(f"| {m.window} | {m.prefix:.3f} | {m.window_share:.3f} | {m.kept:.3f} | {m.dropped:.3f} | "
                         f"{lowest} |")
        reached = ", ".join(f"{round(c * 100)}%: {'W = ' + str(w) if w else 'none of these W'}"
                            for c, w in self.smallest.items())
        lines += ["", f"Smallest W keeping {reached}.",
                  f"Recommended: curriculum.window_target: {self.window_target}, curriculum.window_start: {self.window_start} "
                  f"({self.rows} rows, generations up to {self.longest_generation} tokens)."]
        return "\n".join(lines + [f"Note: {n}" for n in self.notes])


def choose_window(spec, teacher: torch.nn.Module, rows: list[dict], windows: list[int],
                  device: torch.device) -> WindowChoice:
    if not rows:
        raise ValueError("choose_window: no rows")
    sequences = [forward_inputs(spec, row, device) for row in rows]
    longest = max(int(s["input_ids"].shape[1]) - s["prefix_length"] for s in sequences)
    usable = [w for w in sorted(set(windows)) if w < longest]
    notes = [] if usable == sorted(set(windows)) else [
        f"W >= the longest generation in the sample ({longest} tokens) left out: nothing to measure there"]
    if not usable:
        raise ValueError(f"windows: every W is >= the longest generation in the sample ({longest} tokens)")
    masses = attention_mass(teacher.to(device).eval(), sequences, usable)
    smallest = {c: next((m.window for m in masses if m.kept >= c), None) for c in COVERAGES}
    target = smallest[RECOMMEND_AT]
    if target is None:
        target = usable[-1]
        notes.append(f"no W tried keeps {round(RECOMMEND_AT * 100)}% of the mass; recommending the largest, {target}")
    return WindowChoice(masses, smallest, target, 4 * target, len(rows), longest, notes)
