"""All evals of one experiment's student against its teacher (``run_evals``): memory and latency,
attention FLOPs, quality, content and the window chooser, each an ``EvalResult``. Nothing here
talks to MLflow: ``pipeline.tracking`` logs the results.
"""

from __future__ import annotations

import logging
import os
import socket

import numpy as np
import torch

import wand
from wand.profiling import device_name

from pipeline.config import EvalConfig
from pipeline.evals.common import new_figure, EvalResult, resolve_device
from pipeline.evals.memory import attention_flops, memory_and_latency
from pipeline.evals.quality import content, quality

log = logging.getLogger("wand.evaluate")


def window_chooser(spec, teacher, rows: list[dict], windows: list[int], device: torch.device) -> EvalResult:
    from pipeline.evals.window_choice import choose_window  # it builds on this module's inputs

    try:
        choice = choose_window(spec, teacher, rows, windows, device)
    except ValueError as err:
        raise ValueError(f"evaluate.{err}") from None
    masses, notes = choice.masses, choice.notes
    table = {"window": [m.window for m in masses], "mask_agreement": [q.agreement for q in choice.qualities],
             "mask_kl": [q.kl for q in choice.qualities], "kv_saving": [q.kv_saving for q in choice.qualities],
             "prefix_share": [m.prefix for m in masses], "window_share": [m.window_share for m in masses],
             "kept": [m.kept for m in masses], "dropped": [m.dropped for m in masses],
             "queries": [m.queries for m in masses]}
    metrics = choice.metrics()
    fig, ax = new_figure(f"{spec.name} ({spec.size}): teacher attention mass by window", "W", "share of attention mass")
    labels = [str(m.window) for m in masses]
    ax.bar(labels, table["prefix_share"], label="prefix")
    ax.bar(labels, table["window_share"], bottom=table["prefix_share"], label="last W generated")
    ax.bar(labels, table["dropped"], bottom=table["kept"], label="outside (dropped by WAND)", alpha=0.4)
    ax.set_ylim(0, 1.0)
    ax.legend()
    return EvalResult("window_chooser", metrics, table, fig, notes=notes)


def run_evals(spec, teacher: torch.nn.Module, student: torch.nn.Module, window: int, rows: list[dict],
              cfg: EvalConfig) -> list[EvalResult]:
    """Every eval on the given models (teacher: the full-attention original; student: distilled)."""
    if not rows:
        raise ValueError("evaluate: no held-out rows")
    device = resolve_device(cfg.device)
    teacher, student = teacher.to(device).eval(), student.to(device).eval()
    for model in (teacher, student):
        if not wand.is_enabled(model):
            wand.enable_wand(model, window)
    log.info("evals on %s: %d held-out rows, W=%d", device_name(device), len(rows), window)
    prefix_mean = round(float(np.mean([r["prefix_length"] for r in rows])))
    longest = max(rows, key=lambda r: len(r["input_ids"]))
    memory, latency = memory_and_latency(spec, teacher, student, window, longest, cfg, device)
    results = [memory, latency, attention_flops(spec, window, prefix_mean, cfg),
               quality(spec, teacher, student, window, rows, device),
               window_chooser(spec, teacher, rows, cfg.windows, device)]
    said = content(spec, teacher, student, window, rows, device)
    if said is not None:
        results.append(said)
    for r in results:
        r.metrics = {k: float(v) for k, v in r.metrics.items()}
        r.device = device_name(device)
        r.host = f"{socket.gethostname()}:{os.getpid()}"
    return results
