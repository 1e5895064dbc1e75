"""What every eval shares: its result (metrics + a table + a figure), the device it runs on, the
model's speech codes and generation limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

DISTANCE_BUCKETS = ("near", "mid", "far")  # generated index d < W, W <= d < 4W, d >= 4W
FAMILY_NAMES = {"cosyvoice2": "CosyVoice 2", "indextts": "IndexTTS 1.5", "sparktts": "SparkTTS"}  # for tables
FAMILIES = tuple(FAMILY_NAMES)  # the embedded default's families (a committed teacher each), in table order


@dataclass
class EvalResult:
    name: str
    metrics: dict[str, float]
    table: dict[str, list]
    figure: Any  # matplotlib Figure
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> (step, value)
    notes: list[str] = field(default_factory=list)
    device: str = ""  # what the eval ran on (its latency figures are that device's)
    host: str = ""  # host:pid of the process that ran it (a Ray worker on the cluster)


# ----------------------------------------------------------------------------- all of them
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def speech_ids(spec) -> torch.Tensor:
    from pipeline.synthetic.law import speech_codes

    return torch.from_numpy(speech_codes(spec))


def max_generated(spec) -> int | None:
    """The model's own limit on generated tokens (IndexTTS: its learned mel positions), or None."""
    return spec.max_generated_tokens


def new_figure(title: str, xlabel: str, ylabel: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    ax = fig.subplots()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax
