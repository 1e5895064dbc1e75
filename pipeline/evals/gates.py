"""The pass/fail thresholds a student must meet to be promoted, fixed here before any run.

Each gate reads one figure of the evals' metrics (``run_evals``). The KV and latency gates always
apply; the quality gates apply where the content eval ran (rows with a transcript: the synthetic
corpus). Bounds: the fidelity issue's (#26) per-family thresholds where the pipeline's eval has
the figure: stops >= 98%, speaker accuracy >= 0.99, length ratio 0.9-1.1, and PER within 0.02 of
a full-attention reference (the pipeline's eval has no fine-tuned control, so the teacher stands in);
the paper's cache saving (66% at W=32) rounded down to "at least halved"; and "near-constant
per-step latency" as at most 25% slower late than early in the decode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pipeline.evals.claims import THRESHOLDS as T


@dataclass(frozen=True)
class Gate:
    name: str
    what: str  # in words, for tags and the docs
    low: float | None  # value must be >= low
    high: float | None  # value must be <= high
    value: Callable[[dict], float | None]  # the figure, from the eval metrics (None: not measured)
    required: bool = False  # not measured: missed (else the gate does not apply)


def _longest_kv_reduction(metrics: dict) -> float | None:
    """The measured (or analytic, past the model's limit) KV saving at the longest eval length."""
    lengths = [(float(k[len("kv_reduction_"):-1]), k) for k in metrics
               if k.startswith("kv_reduction_") and k.endswith("s")]
    return metrics[max(lengths)[1]] if lengths else None


def _per_gap(metrics: dict) -> float | None:
    if "per_student" not in metrics or "per_teacher" not in metrics:
        return None
    return metrics["per_student"] - metrics["per_teacher"]


GATES = (
    Gate("kv_reduction", "KV cache at the longest eval length at least halved", 0.5, None, _longest_kv_reduction,
         required=True),
    Gate("latency_flat", "per-step time late / early at most 1.25", None, 1.25,
         lambda m: m.get("latency_wand_ratio_late_early"), required=True),
    # The results table's thresholds (pipeline/evals/claims.py), read from there, not restated.
    Gate("stops", f"stops on at least {T.stops:.0%} of rows", T.stops, None, lambda m: m.get("stopped_student")),
    Gate("speaker", f"speaker accuracy at least {T.speaker}", T.speaker, None,
         lambda m: m.get("speaker_accuracy_student")),
    Gate("length_ratio", f"median length / reference within {T.length_ratio[0]}-{T.length_ratio[1]}",
         *T.length_ratio, lambda m: m.get("length_ratio_student")),
    Gate("per_gap", f"PER at most {T.control_gap_per} above the teacher's", None, T.control_gap_per, _per_gap),
)


@dataclass(frozen=True)
class GateResult:
    gate: Gate
    value: float | None

    @property
    def applies(self) -> bool:
        return self.value is not None

    @property
    def passed(self) -> bool:
        g, v = self.gate, self.value
        if v is None:
            return not g.required
        return ((g.low is None or v >= g.low) and (g.high is None or v <= g.high))

    def describe(self) -> str:
        g = self.gate
        bound = " and ".join(b for b in ((f">= {g.low:g}" if g.low is not None else ""),
                                          (f"<= {g.high:g}" if g.high is not None else "")) if b)
        return f"{g.name} {self.value:.3f} (needs {bound})" if self.applies else f"{g.name} not measured (needs {bound})"


def check_gates(metrics: dict) -> list[GateResult]:
    """Every gate against these eval metrics (a quality gate without its figure does not apply; the KV
    and latency gates without theirs are missed: no evals, no promotion)."""
    return [GateResult(g, None if (v := g.value(metrics)) is None else float(v)) for g in GATES]


def passed(results: list[GateResult]) -> bool:
    return all(r.passed for r in results)


def missed(results: list[GateResult]) -> str:
    """What a student missed, in words ("" when it passed)."""
    return "; ".join(r.describe() for r in results if not r.passed)


def gate_metrics(results: list[GateResult]) -> dict[str, float]:
    """``gate_<name>`` 1/0 for each gate that applies, and ``gates_passed``: pass/fail in MLflow's columns."""
    return {**{f"gate_{r.gate.name}": float(r.passed) for r in results if r.applies},
            "gates_passed": float(passed(results))}
