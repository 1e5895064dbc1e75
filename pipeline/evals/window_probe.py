"""The window chooser's fine-tune probe: choose W by what a short WAND fine-tune keeps, not by the bare mask.

The bare mask (``pipeline.evals.window_choice``) measures the teacher before any fine-tuning; how much
of that loss a fine-tune wins back differs from family to family, so no single mark on it matched the
results table (docs/results.md: IndexTTS's failing W = 8 and CosyVoice 2's passing W = 128 have the
same bare-mask agreement). The probe fine-tunes instead, briefly and with the table's own recipe
(``pipeline.evals.ablation.train_student``):

- a **full-attention control** probe (the same steps, no window), and
- a **WAND probe** per candidate W (the hold schedule: curriculum 4W -> W over the first half of the
  steps, then W held; ``wand_at(W, hold=True)``),

then scores each teacher-forced on held-out rows (``pipeline.evals.ablation.forced``): the mean
KL(teacher || probe) at the far positions (at least 4 x ``config.window`` generated tokens from the
prefix: where every candidate W cuts). The window's cost is the WAND probe's far KL **minus the
control's**, so what any fine-tune of this length costs is taken out. The recommended W is the
smallest whose cost is at most ``MAX_KL_GAP``.

``MAX_KL_GAP`` was set from the 1,200-step window sweep on the stronger teachers
(benchmarks/results/ablation_table_strong_1200.json: the same gap, measured on the fine-tuned
students themselves, is at most 0.013 nats for every W that passes the claims' thresholds and at
least 0.020 for every W that fails, in all three families; ``kl_gaps`` reads it from the record) and
fixed before the 300-step probes were run; benchmarks/window_chooser.py sets the probe's choice
beside the table's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np

from pipeline.evals.ablation import AblationConfig, forced, teacher_targets, train_student, variant_named, wand_at
from pipeline.evals.window_choice import kv_saving

__all__ = ["MAX_KL_GAP", "PROBE_STEPS", "Probe", "ProbeChoice", "kl_gaps", "probe_windows"]

log = logging.getLogger("wand.window_probe")

MAX_KL_GAP = 0.015  # nats: far KL of the WAND probe minus the control probe's (see the module's docstring)
PROBE_STEPS = 300  # optimizer steps per probe: a quarter of the 1,200-step recipe the mark was set on


@dataclass(frozen=True)
class Probe:
    """One probe student, scored teacher-forced at the far positions of the held-out rows."""

    window: int | None  # None: the full-attention control
    kl_far: float  # mean KL(teacher || probe) over the target ids, nats
    positions: int  # far positions scored
    seconds: float  # training and scoring
    kv_saving: float = 0.0  # KV cache saved at the median held-out row (window_choice.kv_saving)


@dataclass
class ProbeChoice:
    control: Probe
    probes: list[Probe]  # one per candidate W, smallest first
    window_target: int | None  # the smallest W whose gap is <= MAX_KL_GAP (None: no W tried)
    steps: int
    notes: list[str] = field(default_factory=list)

    def gap(self, probe: Probe) -> float:
        return probe.kl_far - self.control.kl_far

    def to_json(self) -> dict:
        return {"steps": self.steps, "max_kl_gap": MAX_KL_GAP, "control_kl_far": self.control.kl_far,
                "windows": [p.window for p in self.probes], "kl_far": [p.kl_far for p in self.probes],
                "gap": [self.gap(p) for p in self.probes], "kv_saving": [p.kv_saving for p in self.probes],
                "positions": self.control.positions,
                "seconds": [self.control.seconds] + [p.seconds for p in self.probes],
                "window_target": self.window_target, "notes": self.notes}


def _probe(spec, teacher, shard_rows: list[dict], heldout: list[dict], variant, config: AblationConfig) -> Probe:
    start = time.perf_counter()
    student = train_student(spec, teacher, shard_rows, variant, config)
    scores = forced(spec, teacher, student, variant, config, heldout)
    if not scores["positions_far"]:
        raise ValueError(f"probe: no held-out row has a generated position {4 * config.window} tokens from its "
                         f"prefix (4 x window {config.window}): give longer held-out rows")
    window = None if variant.attends == "full" else variant.target(config)[0]
    prefixes = [int(r["prefix_length"]) for r in heldout]
    saving = 0.0 if window is None else kv_saving(prefixes, [len(r["input_ids"]) - p for r, p in zip(heldout, prefixes)],
                                                  window)
    probe = Probe(window, float(scores["kl_far"]), int(scores["positions_far"]), round(time.perf_counter() - start, 1),
                  saving)
    log.info("%s probe W=%s: far KL %.4f over %d positions, %.0f s", spec.name, window, probe.kl_far,
             probe.positions, probe.seconds)
    return probe


def probe_windows(spec, teacher, train_rows: list[dict], heldout: list[dict], windows: list[int],
                  config: AblationConfig = AblationConfig(), steps: int = PROBE_STEPS) -> ProbeChoice:
    """The control probe and one WAND probe per W in ``windows`` (``steps`` each, ``config``'s recipe and
    seed), on ``train_rows`` (corpus rows: the teacher's top-k is taken here) and scored on ``heldout``;
    ``teacher`` must have WAND enabled (``wand.enable_wand``)."""
    if not windows or min(windows) < 1:
        raise ValueError(f"probe: windows must be a non-empty list of W >= 1, got {windows}")
    if not train_rows or not heldout:
        raise ValueError("probe: needs training rows and held-out rows")
    config = replace(config, steps=steps)
    shard_rows = teacher_targets(spec, teacher, train_rows, config.k)
    control = _probe(spec, teacher, shard_rows, heldout, variant_named("control"), config)
    probes = [_probe(spec, teacher, shard_rows, heldout, wand_at(w, hold=True), config) for w in sorted(set(windows))]
    choice = ProbeChoice(control, probes, None, steps)
    choice.window_target = next((p.window for p in probes if choice.gap(p) <= MAX_KL_GAP), None)
    if choice.window_target is None:
        choice.notes.append(f"no W tried keeps the far KL within {MAX_KL_GAP} nats of the full-attention probe's: "
                            "try larger W, or expect the student to lose quality against full attention")
    elif (saving := next(p.kv_saving for p in probes if p.window == choice.window_target)) < 0.10:
        choice.notes.append(f"W = {choice.window_target} saves only {100 * saving:.0f}% of the KV cache at the median "
                            "held-out row: on utterances this short, full attention costs about as much")
    return choice


def kl_gaps(results: list[dict], variants: tuple[str, ...]) -> dict[str, dict[int, float]]:
    """From a results table's rows (benchmarks/ablation_table.py's JSON): per model and W, the mean far KL
    of the WAND students of ``variants`` minus the mean of that model's full-attention controls (the
    same quantity the probe measures, on the table's own fine-tuned students)."""
    control: dict[str, list[float]] = {}
    students: dict[str, dict[int, list[float]]] = {}
    for row in results:
        if row["variant"] == "control":
            control.setdefault(row["model"], []).append(row["kl_far"])
        elif row["variant"] in variants:
            students.setdefault(row["model"], {}).setdefault(row["window"], []).append(row["kl_far"])
    return {model: {w: float(np.mean(kls) - np.mean(control[model])) for w, kls in sorted(by_w.items())}
            for model, by_w in students.items() if model in control}
