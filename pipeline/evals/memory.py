"""KV-cache memory and per-step decode latency of a real decode, full attention (teacher) vs WAND
(student), and attention FLOPs per generated token (theoretical: the paper's "speed-up").
"""

from __future__ import annotations

import numpy as np
import torch

from wand.batch import forward_inputs
from wand.kv import attention_flops_per_token, cache_bytes
from wand.profiling import bucket_stats, device_name, profile_decode

from pipeline.config import EvalConfig
from pipeline.evals.common import new_figure, EvalResult, max_generated, speech_ids

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
    full_times, ours_times = [], []
    for _ in range(cfg.latency_repeats):  # interleaved, so a busy spell on the machine meets both models
        full = profile_decode(teacher, prefix_length, None, steps, record_bytes_at=grid, prompt=prompt,
                              prefill_kwargs=inputs, token_ids=ids)
        ours = profile_decode(student, prefix_length, window, steps, record_bytes_at=grid, prompt=prompt,
                              prefill_kwargs=inputs, token_ids=ids)
        full_times.append(full.step_seconds)
        ours_times.append(ours.step_seconds)
    # Greedy decodes of one prompt: every repeat holds the same cache bytes at each step; the times differ.
    full.step_seconds, ours.step_seconds = fastest_steps(full_times), fastest_steps(ours_times)
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
    fig, ax = new_figure(f"{spec.name} ({spec.size}): KV cache vs generated length", "generated tokens", "KV cache (KiB)")
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
    fig, ax = new_figure(f"{spec.name} ({spec.size}): per-step decode time ({device_name(device)})", "step",
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


def fastest_steps(repeats: list[list[float]]) -> list[float]:
    """Each step's fastest time over repeated decodes (noise from other processes only adds time)."""
    return [min(times) for times in zip(*repeats, strict=True)]


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
    fig, ax = new_figure(f"{spec.name} ({spec.size}): attention FLOPs per token (theoretical)", "generated tokens",
                      "MFLOPs per generated token (mean)")
    xs = np.unique(np.linspace(1, spec.tokens_for_seconds(max(cfg.seconds)), 60).astype(int))
    ax.plot(xs, [attention_flops_per_token(config, prefix_length, int(x), None) / 1e6 for x in xs], label="full attention")
    ax.plot(xs, [attention_flops_per_token(config, prefix_length, int(x), window) / 1e6 for x in xs], label=f"WAND W={window}")
    ax.legend()
    return EvalResult("attention_flops", metrics, table, fig,
                      notes=["theoretical: score and value products only (P = mean held-out prefix length)"])
