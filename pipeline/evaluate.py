"""Evaluations of a distilled student against its teacher, each as metrics + a table + a figure.

* ``kv_memory``: KV-cache bytes vs generated length (10 / 30 / 60 s of audio at the model's token
  rate), read from the caches of a real decode, full attention vs WAND, next to the analytic figure.
* ``decode_latency``: per-step decode time vs step (p50 / p90 per bucket), teacher (full attention,
  DynamicCache) vs student (WAND, WandCache), on the device the eval runs on.
* ``attention_flops``: attention FLOPs per generated token, full vs WAND (theoretical; the paper's
  "speed-up" is this ratio).
* ``quality``: teacher-forced top-1 agreement and KL(teacher || student) per generated position on
  held-out rows, split by distance from the prefix: near (< W), mid (W .. 4W), far (>= 4W).
* ``window_chooser``: the teacher's attention mass on the prefix and on the last W generated tokens
  for several W (pick W before training).

Nothing here talks to MLflow: ``pipeline.tracking`` logs the results.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

import wand
from wand.kv import attention_flops_per_token, cache_bytes
from wand.profiling import bucket_stats, profile_decode

from . import storage

__all__ = ["EvalConfig", "EvalResult", "run_evals", "read_rows", "device_name", "DISTANCE_BUCKETS"]

log = logging.getLogger("wand.evaluate")
DISTANCE_BUCKETS = ("near", "mid", "far")
MAX_SECONDS = 3600.0  # an hour of audio per memory/latency point: beyond it an eval decodes for days  # generated index d < W, W <= d < 4W, d >= 4W


class EvalConfig(BaseModel):
    """The ``evaluate:`` section of an experiment config."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True, allow_inf_nan=False)

    enabled: bool = True
    corpus: str | None = Field(None, description="held-out rows (corpus schema); None: the training corpus (flagged)")
    rows: int = Field(8, ge=1, description="held-out sequences for the quality and attention-mass evals")
    seconds: list[Annotated[float, Field(gt=0, le=MAX_SECONDS)]] = Field(
        [10.0, 30.0, 60.0], min_length=1, description=f"audio lengths for memory/latency/FLOPs (0 < s <= {MAX_SECONDS})")
    windows: list[Annotated[int, Field(ge=1)]] = Field([4, 8, 16, 32, 64, 128], min_length=1,
                                                       description="W values for the window chooser")
    latency_buckets: int = Field(10, ge=1)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda|cuda:[0-9]{1,3})$",
                        description="auto (cuda if available) | cpu | cuda | cuda:N")
    num_gpus: float | Literal["auto"] = Field(
        "auto", description="GPUs of the Ray task the evals run in; auto: 1 when the experiment trains on GPUs "
        "or the cluster has one, else 0")
    num_cpus: float = Field(1.0, gt=0, description="CPUs of that task")
    allow_training_corpus: bool = Field(
        False, description="allow evals on the training corpus (they then score rows the student trained on)")

    @field_validator("num_gpus", mode="before")
    @classmethod
    def _gpus(cls, value):
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise ValueError("must be >= 0 or 'auto'")
        return value

    def resolved_gpus(self, trains_on_gpu: bool, cluster_gpus: float) -> float:
        if self.num_gpus != "auto":
            return float(self.num_gpus)
        return 1.0 if trains_on_gpu or cluster_gpus >= 1 else 0.0


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


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------- inputs
def read_rows(uri: str, endpoint: str | None, limit: int | None) -> list[dict]:
    """The first ``limit`` rows (by id; None: all) of a corpus folder of Parquet or JSONL files."""
    import pyarrow.parquet as pq

    fs, path = storage.resolve(uri, endpoint)
    files = storage.list_files(fs, path, (".parquet", ".jsonl"))
    if not files:
        raise ValueError(f"evaluate.corpus: no .parquet or .jsonl files under {uri}")
    rows: list[dict] = []
    for name in files:
        if name.endswith(".parquet"):
            rows.extend(pq.read_table(name, filesystem=fs).to_pylist())
        else:
            text = storage.read_bytes(fs, name).decode()
            rows.extend(json.loads(line) for line in text.splitlines() if line.strip())
    rows.sort(key=lambda r: str(r["id"]))
    return rows[:limit]


def forward_inputs(spec, row: dict, device: torch.device) -> dict:
    """Forward kwargs of one unpadded row (plus its prefix length under ``prefix_length``)."""
    ids = torch.tensor([row["input_ids"]], dtype=torch.long, device=device)
    spec.check_token_ids(ids)
    prefix = int(row["prefix_length"])
    if not 0 < prefix < ids.shape[1]:
        raise ValueError(f"evaluate: row {row['id']}: prefix_length {prefix} must be in [1, {ids.shape[1]})")
    return {"input_ids": ids, "prefix_length": prefix, **spec.row_inputs([row], device)}


def speech_ids(spec) -> torch.Tensor:
    from .synthetic import speech_codes

    return torch.from_numpy(speech_codes(spec))


def max_generated(spec) -> int | None:
    """The model's own limit on generated tokens (IndexTTS: its learned mel positions), or None."""
    return spec.max_generated_tokens


def _figure(title: str, xlabel: str, ylabel: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    ax = fig.subplots()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


# ----------------------------------------------------------------------------- memory + latency
def memory_and_latency(spec, teacher, student, window: int, row: dict, cfg: EvalConfig,
                       device: torch.device) -> tuple[EvalResult, EvalResult]:
    """One decode per model from a held-out row's prefix, long enough for the longest audio length."""
    inputs = forward_inputs(spec, row, device)
    prefix_length = inputs.pop("prefix_length")
    prompt = inputs.pop("input_ids")[:, :prefix_length]
    wanted = {s: spec.tokens_for_seconds(s) for s in cfg.seconds}
    cap = max_generated(spec)
    notes = []
    if cap is not None and max(wanted.values()) > cap:
        notes.append(f"{spec.name} generates at most {cap} tokens ({cap / spec.token_rate_hz:.0f} s): longer lengths "
                     "have analytic figures only")
    steps = min(max(wanted.values()), cap) if cap is not None else max(wanted.values())
    grid = sorted({*range(max(1, steps // 40), steps + 1, max(1, steps // 40)), *(g for g in wanted.values() if g <= steps)})
    ids = speech_ids(spec)
    full = profile_decode(teacher, prefix_length, None, steps, record_bytes_at=grid, prompt=prompt,
                          prefill_kwargs=inputs, token_ids=ids)
    ours = profile_decode(student, prefix_length, window, steps, record_bytes_at=grid, prompt=prompt,
                          prefill_kwargs=inputs, token_ids=ids)
    per_token = spec.kv_bytes_per_token(next(student.parameters()).dtype)

    table: dict[str, list] = {k: [] for k in ("seconds", "generated_tokens", "full_bytes", "wand_bytes",
                                              "full_bytes_analytic", "wand_bytes_analytic", "reduction")}
    metrics: dict[str, float] = {}
    for seconds, generated in wanted.items():
        measured = generated <= steps
        full_b = full.cache_bytes[generated] if measured else None
        wand_b = ours.cache_bytes[generated] if measured else None
        full_a = cache_bytes(per_token, prefix_length, generated, None)
        wand_a = cache_bytes(per_token, prefix_length, generated, window)
        table["seconds"].append(seconds)
        table["generated_tokens"].append(generated)
        table["full_bytes"].append(full_b)
        table["wand_bytes"].append(wand_b)
        table["full_bytes_analytic"].append(full_a)
        table["wand_bytes_analytic"].append(wand_a)
        table["reduction"].append(1 - (wand_b if measured else wand_a) / (full_b if measured else full_a))
        tag = f"{seconds:g}s"
        metrics[f"kv_reduction_{tag}"] = table["reduction"][-1]
        metrics[f"kv_full_bytes_analytic_{tag}"] = full_a
        metrics[f"kv_wand_bytes_analytic_{tag}"] = wand_a
        if measured:
            metrics[f"kv_full_bytes_{tag}"] = full_b
            metrics[f"kv_wand_bytes_{tag}"] = wand_b
    fig, ax = _figure(f"{spec.name} ({spec.size}): KV cache vs generated length", "generated tokens", "KV cache (KiB)")
    xs = sorted(full.cache_bytes)
    ax.plot(xs, [full.cache_bytes[x] / 1024 for x in xs], label="full attention (measured)")
    ax.plot(xs, [ours.cache_bytes[x] / 1024 for x in xs], label=f"WAND W={window} (measured)")
    ax.plot(xs, [cache_bytes(per_token, prefix_length, x, None) / 1024 for x in xs], ":", label="full (analytic)")
    ax.plot(xs, [cache_bytes(per_token, prefix_length, x, window) / 1024 for x in xs], ":", label="WAND (analytic)")
    for seconds, generated in wanted.items():
        if generated <= steps:
            ax.axvline(generated, color="grey", lw=0.5)
            ax.text(generated, ax.get_ylim()[1] * 0.95, f"{seconds:g} s", fontsize=8)
    ax.legend(loc="center right")
    memory = EvalResult("kv_memory", metrics, table, fig, notes=notes, curves={
        "kv_bytes_full": [(x, float(full.cache_bytes[x])) for x in xs],
        "kv_bytes_wand": [(x, float(ours.cache_bytes[x])) for x in xs]})

    bucket = max(1, steps // cfg.latency_buckets)
    teacher_stats, student_stats = bucket_stats(full.step_seconds, bucket), bucket_stats(ours.step_seconds, bucket)
    lat = {"bucket_start": [s for s, _, _ in teacher_stats],
           "full_p50_ms": [p50 * 1e3 for _, p50, _ in teacher_stats], "full_p90_ms": [p90 * 1e3 for _, _, p90 in teacher_stats],
           "wand_p50_ms": [p50 * 1e3 for _, p50, _ in student_stats], "wand_p90_ms": [p90 * 1e3 for _, _, p90 in student_stats]}
    # Flatness: the last bucket's median step time over the second bucket's (the first holds warm-up).
    early = 1 if len(teacher_stats) > 2 else 0
    metrics = {"latency_full_ratio_late_early": lat["full_p50_ms"][-1] / lat["full_p50_ms"][early],
               "latency_wand_ratio_late_early": lat["wand_p50_ms"][-1] / lat["wand_p50_ms"][early],
               "latency_full_p50_ms_late": lat["full_p50_ms"][-1], "latency_wand_p50_ms_late": lat["wand_p50_ms"][-1],
               "decode_steps": steps}
    fig, ax = _figure(f"{spec.name} ({spec.size}): per-step decode time ({device_name(device)})", "step",
                      "ms per step")
    for key, label in (("full", "full attention"), ("wand", f"WAND W={window}")):
        line, = ax.plot(lat["bucket_start"], lat[f"{key}_p50_ms"], marker="o", label=f"{label} p50")
        ax.plot(lat["bucket_start"], lat[f"{key}_p90_ms"], "--", color=line.get_color(), label=f"{label} p90")
    ax.set_ylim(bottom=0)
    ax.legend()
    latency = EvalResult("decode_latency", metrics, lat, fig, curves={
        "latency_full_p50_ms": list(zip(lat["bucket_start"], lat["full_p50_ms"])),
        "latency_wand_p50_ms": list(zip(lat["bucket_start"], lat["wand_p50_ms"]))})
    return memory, latency


# ----------------------------------------------------------------------------- FLOPs
def attention_flops(spec, window: int, prefix_length: int, cfg: EvalConfig) -> EvalResult:
    config = spec.backbone_config()
    table: dict[str, list] = {k: [] for k in ("seconds", "generated_tokens", "full_mflops_per_token",
                                              "wand_mflops_per_token", "theoretical_speedup")}
    metrics = {}
    for seconds in cfg.seconds:
        generated = spec.tokens_for_seconds(seconds)
        full = attention_flops_per_token(config, prefix_length, generated, None)
        ours = attention_flops_per_token(config, prefix_length, generated, window)
        for key, value in zip(table, (seconds, generated, full / 1e6, ours / 1e6, full / ours)):
            table[key].append(value)
        metrics[f"attn_flops_speedup_{seconds:g}s"] = full / ours
    fig, ax = _figure(f"{spec.name} ({spec.size}): attention FLOPs per token (theoretical)", "generated tokens",
                      "MFLOPs per generated token (mean)")
    xs = np.unique(np.linspace(1, spec.tokens_for_seconds(max(cfg.seconds)), 60).astype(int))
    ax.plot(xs, [attention_flops_per_token(config, prefix_length, int(x), None) / 1e6 for x in xs], label="full attention")
    ax.plot(xs, [attention_flops_per_token(config, prefix_length, int(x), window) / 1e6 for x in xs], label=f"WAND W={window}")
    ax.legend()
    return EvalResult("attention_flops", metrics, table, fig,
                      notes=["theoretical: score and value products only (P = mean held-out prefix length)"])


# ----------------------------------------------------------------------------- quality
def distance_bucket(distance: int, window: int) -> str:
    return "near" if distance < window else "mid" if distance < 4 * window else "far"


@torch.no_grad()
def position_scores(spec, teacher, student, window: int | None, row: dict, device: torch.device,
                    student_prefix: int | None = None) -> dict[str, np.ndarray]:
    """Per generated position of one row: distance from the prefix, top-1 agreement, KL(teacher || student),
    and whether the student's top-1 is the row's true token.

    Both models see the row's true tokens (teacher forcing); the teacher with full attention, the
    student with the hard WAND mask at ``window`` (None: full attention) over the row's prefix, or
    over its first ``student_prefix`` tokens (e.g. 4 attention sinks for a StreamingLLM-style
    cache); distributions over the spec's target ids."""
    inputs = forward_inputs(spec, row, device)
    prefix = inputs.pop("prefix_length")
    prefix_lengths = torch.tensor([prefix], device=device)
    targets = spec.target_ids().to(device)
    logits = {}
    student_prefixes = prefix_lengths if student_prefix is None else torch.tensor([student_prefix], device=device)
    for name, model, w, p in (("teacher", teacher, None, prefix_lengths), ("student", student, window, student_prefixes)):
        out = model(**inputs, prefix_lengths=p, window=w, model_prefix_lengths=prefix_lengths)
        # position p predicts token p + 1: the generated tokens are predicted from p = prefix - 1 on
        logits[name] = out.logits[0, prefix - 1 : -1][:, targets].float()
    log_t, log_s = torch.log_softmax(logits["teacher"], -1), torch.log_softmax(logits["student"], -1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    agree = log_t.argmax(-1) == log_s.argmax(-1)
    truth = inputs["input_ids"][0, prefix:]
    correct = targets[log_s.argmax(-1)] == truth
    return {"distance": np.arange(len(kl)), "agree": agree.cpu().numpy(), "kl": kl.cpu().numpy(),
            "correct": correct.cpu().numpy()}


def quality(spec, teacher, student, window: int, rows: list[dict], device: torch.device) -> EvalResult:
    scores = [position_scores(spec, teacher, student, window, row, device) for row in rows]
    distance = np.concatenate([s["distance"] for s in scores])
    agree = np.concatenate([s["agree"] for s in scores]).astype(float)
    kl = np.concatenate([s["kl"] for s in scores])
    buckets = np.array([distance_bucket(int(d), window) for d in distance])
    table: dict[str, list] = {"bucket": [], "distance_range": [], "positions": [], "top1_agreement": [], "kl_teacher_student": []}
    metrics = {"top1_agreement": float(agree.mean()), "kl_teacher_student": float(kl.mean()),
               "heldout_rows": len(rows)}
    ranges = {"near": f"[0, {window})", "mid": f"[{window}, {4 * window})", "far": f">= {4 * window}"}
    for name in DISTANCE_BUCKETS:
        pick = buckets == name
        n = int(pick.sum())
        table["bucket"].append(name)
        table["distance_range"].append(ranges[name])
        table["positions"].append(n)
        table["top1_agreement"].append(float(agree[pick].mean()) if n else None)
        table["kl_teacher_student"].append(float(kl[pick].mean()) if n else None)
        metrics[f"positions_{name}"] = n
        if n:
            metrics[f"top1_agreement_{name}"] = table["top1_agreement"][-1]
            metrics[f"kl_{name}"] = table["kl_teacher_student"][-1]
    fig, ax = _figure(f"{spec.name} ({spec.size}): student vs teacher by distance from the prefix",
                      "generated position (distance from the prefix)", "top-1 agreement")
    width = max(1, window // 2)
    edges = np.arange(0, distance.max() + width + 1, width)
    centers, agreement, divergence = [], [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        pick = (distance >= lo) & (distance < hi)
        if pick.any():
            centers.append((lo + hi) / 2)
            agreement.append(agree[pick].mean())
            divergence.append(kl[pick].mean())
    ax.plot(centers, agreement, marker="o", label="top-1 agreement")
    ax.set_ylim(0, 1.05)
    ax.axvline(window, color="grey", lw=0.5)
    ax.axvline(4 * window, color="grey", lw=0.5)
    twin = ax.twinx()
    twin.plot(centers, divergence, color="tab:red", marker="x", label="KL(teacher || student)")
    twin.set_ylabel("KL (nats)")
    fig.legend(loc="lower left")
    return EvalResult("quality", metrics, table, fig)


@torch.no_grad()
def content(spec, teacher, student, window: int, rows: list[dict], device: torch.device) -> EvalResult | None:
    """Does the student still say the text? On rows of the synthetic corpus (they carry ``text`` and
    ``speaker``), teacher (full attention) and student (WAND) decode greedily from each row's prefix
    until the stop id (at most twice the reference's length) and the speech is transcribed exactly
    (``pipeline.transcribe``): PER, speaker accuracy, law consistency, and how many stopped.
    None for rows without a transcript (real data needs an ASR model: not part of these evals)."""
    from .synthetic import SyntheticTask
    from .transcribe import score, speech_codes_of

    rows = [r for r in rows if r.get("text") is not None and r.get("speaker") is not None]
    if not rows:
        return None
    codes = len(speech_ids(spec))
    metrics: dict[str, float] = {"content_rows": len(rows)}
    table: dict[str, list] = {"model": [], "per": [], "speaker_accuracy": [], "law_consistency": [], "stopped": []}
    for name, model, w in (("teacher", teacher, None), ("student", student, window)):
        said = []
        for row in rows:
            inputs = forward_inputs(spec, row, device)
            prefix = inputs.pop("prefix_length")
            reference = len(row["input_ids"]) - prefix
            cap = min(2 * reference, max_generated(spec) or 2 * reference)
            out = wand.generate(model, inputs.pop("input_ids")[:, :prefix], [prefix], w, cap,
                                eos_token_id=list(spec.stop_token_ids), prefill_kwargs=inputs)
            generated = out[0, prefix:].tolist()
            task = SyntheticTask(seed=int(row.get("task_seed") or 0))  # the law the corpus was made with
            result = score(task, codes, speech_codes_of(spec, generated), list(row["text"]), int(row["speaker"]))
            result["stopped"] = any(t in spec.stop_token_ids for t in generated)
            said.append(result)
        table["model"].append(name)
        for key in ("per", "speaker_accuracy", "law_consistency", "stopped"):
            value = float(np.mean([s[key] for s in said]))
            table[key].append(value)
            metrics[f"{key}_{name}"] = value
    fig, ax = _figure(f"{spec.name} ({spec.size}): what the models say (synthetic transcriber)", "metric", "value")
    keys = ("per", "speaker_accuracy", "law_consistency", "stopped")
    x = np.arange(len(keys))
    for i, name in enumerate(table["model"]):
        ax.bar(x + 0.4 * i, [table[k][i] for k in keys], width=0.4, label=name)
    ax.set_xticks(x + 0.2, ["PER", "speaker acc.", "law", "stopped"])
    ax.legend()
    return EvalResult("content", metrics, table, fig)


def window_chooser(spec, teacher, rows: list[dict], windows: list[int], device: torch.device) -> EvalResult:
    from .window_choice import choose_window  # it builds on this module's inputs

    try:
        choice = choose_window(spec, teacher, rows, windows, device)
    except ValueError as err:
        raise ValueError(f"evaluate.{err}") from None
    masses, notes = choice.masses, choice.notes
    table = {"window": [m.window for m in masses], "prefix_share": [m.prefix for m in masses],
             "window_share": [m.window_share for m in masses], "kept": [m.kept for m in masses],
             "dropped": [m.dropped for m in masses], "queries": [m.queries for m in masses]}
    metrics = {f"attn_kept_w{m.window}": m.kept for m in masses}
    fig, ax = _figure(f"{spec.name} ({spec.size}): teacher attention mass by window", "W", "share of attention mass")
    labels = [str(m.window) for m in masses]
    ax.bar(labels, table["prefix_share"], label="prefix")
    ax.bar(labels, table["window_share"], bottom=table["prefix_share"], label="last W generated")
    ax.bar(labels, table["dropped"], bottom=table["kept"], label="outside (dropped by WAND)", alpha=0.4)
    ax.set_ylim(0, 1.0)
    ax.legend()
    return EvalResult("window_chooser", metrics, table, fig, notes=notes)


# ----------------------------------------------------------------------------- all of them
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
