"""Choosing W before training: what the window costs the teacher, and what it saves.

For each candidate W, on the user's teacher and a sample of their data:

- **the bare mask's quality** (the recommendation's criterion): the teacher under the WAND mask at W,
  not fine-tuned, teacher-forced, against the same teacher with full attention: top-1 agreement and
  KL at the generated positions the window cuts (at least W generated tokens before them). The
  recommended ``window_target`` is the smallest W whose agreement there reaches ``MIN_AGREEMENT``.
  The threshold is calibrated on the results table's window sweep (docs/results.md: the smallest W
  whose fine-tuned student passes the claims' thresholds, per family), which attention mass failed
  to predict (issue 26: 95% mass asked for W = 256 where W = 64 students pass).
- **the KV saving**: 1 - (prefix + min(W, generated)) / (prefix + generated) at the sample's median
  row, so a W that saves nothing says so.
- the paper's Table 2 analysis, kept as a reading aid: the mean share of every generated query's
  attention (over layers, heads and queries farther than W from the prefix) on the prefix and on the
  last W generated tokens, overall and per layer: what WAND keeps and what it drops.

The curriculum starts at 4x the target (the paper: 128 -> 32).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

import wand
from wand.attention_mass import attention_mass, AttentionMass
from wand.batch import forward_inputs

from pipeline.evals.quality import position_scores

__all__ = ["COVERAGES", "DEFAULT_WINDOWS", "MIN_AGREEMENT", "MaskQuality", "WindowChoice", "mask_quality",
           "kv_saving", "choose_window"]

COVERAGES = (0.90, 0.95, 0.99)
DEFAULT_WINDOWS = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIN_AGREEMENT = 0.90  # bare-mask top-1 agreement at the cut positions: calibrated on the table's window sweep


@dataclass(frozen=True)
class MaskQuality:
    """The teacher under the bare WAND mask at ``window`` against itself with full attention,
    teacher-forced, at the generated positions the window cuts."""

    window: int
    agreement: float  # top-1 agreement
    kl: float  # mean KL(full || masked) over the target ids, nats
    positions: int  # generated positions with at least ``window`` generated tokens before them
    kv_saving: float  # KV cache saved at the sample's median row (prefix + W vs prefix + generated)


@dataclass
class WindowChoice:
    masses: list[AttentionMass]
    smallest: dict[float, int | None]  # attention-mass coverage -> smallest W that keeps it (None: no W tried does)
    window_target: int
    window_start: int
    rows: int
    longest_generation: int
    qualities: list[MaskQuality] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        out = {f"attn_kept_w{m.window}": m.kept for m in self.masses}
        out.update({f"window_for_{round(c * 100)}pct": float(w) for c, w in self.smallest.items() if w is not None})
        for q in self.qualities:
            out.update({f"mask_agreement_w{q.window}": q.agreement, f"mask_kl_w{q.window}": q.kl,
                        f"kv_saving_w{q.window}": q.kv_saving})
        return {**out, "recommended_window_target": float(self.window_target),
                "recommended_window_start": float(self.window_start)}

    def table(self) -> str:
        layers = len(self.masses[0].layers) if self.masses else 0
        lines = [f"| W | bare-mask agreement (>= {MIN_AGREEMENT}) | KL | KV saved | attention: prefix | last W | kept | "
                 "lowest layer (kept) |", "|---:|---:|---:|---:|---:|---:|---:|---|"]
        for m, q in zip(self.masses, self.qualities):
            low = min(range(layers), key=lambda i: m.layers[i]) if layers else None
            lowest = f"layer {low}: {m.layers[low]:.3f}" if low is not None else "-"
            lines.append(f"| {m.window} | {q.agreement:.3f} | {q.kl:.3f} | {100 * q.kv_saving:.0f}% | {m.prefix:.3f} | "
                         f"{m.window_share:.3f} | {m.kept:.3f} | {lowest} |")
        reached = ", ".join(f"{round(c * 100)}%: {'W = ' + str(w) if w else 'none of these W'}"
                            for c, w in self.smallest.items())
        saving = next((q.kv_saving for q in self.qualities if q.window == self.window_target), 0.0)
        lines += ["", f"Smallest W keeping attention mass {reached} (a reading aid: it does not predict quality).",
                  f"Recommended (smallest W whose bare-mask agreement reaches {MIN_AGREEMENT}): "
                  f"curriculum.window_target: {self.window_target}, curriculum.window_start: {self.window_start}; "
                  f"saves {100 * saving:.0f}% of the KV cache at the median row "
                  f"({self.rows} rows, generations up to {self.longest_generation} tokens)."]
        return "\n".join(lines + [f"Note: {n}" for n in self.notes])


def kv_saving(prefixes: list[int], generated: list[int], window: int) -> float:
    """KV cache WAND saves at the median row: 1 - (prefix + min(W, generated)) / (prefix + generated)."""
    savings = [1 - (p + min(window, g)) / (p + g) for p, g in zip(prefixes, generated)]
    return float(np.median(savings))


def mask_quality(spec, teacher: torch.nn.Module, rows: list[dict], windows: list[int],
                 device: torch.device) -> list[MaskQuality]:
    """Per W: the bare mask's agreement and KL against full attention where the window cuts
    (``pipeline.evals.quality.position_scores``, the results table's teacher-forced columns)."""
    prefixes = [int(r["prefix_length"]) for r in rows]
    generated = [len(r["input_ids"]) - p for r, p in zip(rows, prefixes)]
    out = []
    for window in windows:
        agree, kl = [], []
        for row in rows:
            scores = position_scores(spec, teacher, teacher, window, row, device)
            cut = scores["distance"] >= window
            agree.append(scores["agree"][cut])
            kl.append(scores["kl"][cut])
        agree_a, kl_a = np.concatenate(agree).astype(float), np.concatenate(kl)
        out.append(MaskQuality(window, float(agree_a.mean()) if len(agree_a) else 1.0,
                               float(kl_a.mean()) if len(kl_a) else 0.0, int(len(agree_a)),
                               kv_saving(prefixes, generated, window)))
    return out


def choose_window(spec, teacher: torch.nn.Module, rows: list[dict], windows: list[int],
                  device: torch.device) -> WindowChoice:
    """The candidate W's costs and savings on ``teacher`` and ``rows``, and the recommended W."""
    if not rows:
        raise ValueError("choose_window: no rows")
    sequences = [forward_inputs(spec, row, device) for row in rows]
    longest = max(int(s["input_ids"].shape[1]) - s["prefix_length"] for s in sequences)
    usable = [w for w in sorted(set(windows)) if w < longest]
    notes = [] if usable == sorted(set(windows)) else [
        f"W >= the longest generation in the sample ({longest} tokens) left out: it would save nothing"]
    if not usable:
        raise ValueError(f"windows: every W is >= the longest generation in the sample ({longest} tokens): "
                         "none would save any KV cache")
    teacher = teacher.to(device).eval()
    masses = attention_mass(teacher, sequences, usable)
    wand.enable_wand(teacher, usable[0])  # the bare mask: the teacher's own forward, given a window per call
    qualities = mask_quality(spec, teacher, rows, usable, device)
    smallest = {c: next((m.window for m in masses if m.kept >= c), None) for c in COVERAGES}
    target = next((q.window for q in qualities if q.agreement >= MIN_AGREEMENT), None)
    if target is None:
        target = usable[-1]
        notes.append(f"no W tried reaches bare-mask agreement {MIN_AGREEMENT}; recommending the largest, {target}: "
                     "expect the student to lose quality against full attention")
    saving = next(q.kv_saving for q in qualities if q.window == target)
    if saving < 0.10:
        notes.append(f"W = {target} saves only {100 * saving:.0f}% of the KV cache at the median row: "
                     "on utterances this short, full attention costs about as much")
    return WindowChoice(masses, smallest, target, 4 * target, len(rows), longest, qualities, notes)
