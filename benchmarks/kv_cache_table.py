"""KV-cache size, full attention vs WAND, at 10 / 30 / 60 s of audio for every model preset.

    .venv/bin/python -m benchmarks.kv_cache_table                      # analytic + measured (<= 1.5B params)
    .venv/bin/python -m benchmarks.kv_cache_table --measure-max-params 0  # analytic only (instant)

Analytic: (P + G) vs (P + W) tokens x the spec's KV bytes per token (bf16), with the paper's
prefix lengths P (about 182, 74, 227 tokens; 200 for presets the paper does not cover) and the
target W. Measured: the real-size model with random weights (bf16, CPU) prefilled with P + G
tokens once with transformers' DynamicCache (full) and once with a WandCache; the bytes are read
from the caches. Prints a Markdown table and writes benchmarks/results/kv_cache_table.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers.cache_utils import DynamicCache

import wand
from wand.kv import cache_bytes
from wand.models import get_spec, MODEL_NAMES
from wand.profiling import cache_nbytes

PAPER_REDUCTION_10S = {"cosyvoice2": 49.9, "indextts": 66.2, "sparktts": 60.5}
DEFAULT_PREFIX = 200


@torch.no_grad()
def measure(model, spec, prefix: int, generated: int, window: int | None) -> int:
    """Prefill prefix + generated speech-range ids; return the bytes the cache then holds."""
    lo, hi = spec.speech_range if spec.speech_range[0] >= 0 else (0, spec.vocab_size)
    ids = torch.randint(lo, hi, (1, prefix + generated))
    cache = DynamicCache() if window is None else wand.WandCache(torch.tensor([prefix]), window)
    kwargs = {}
    if spec.latent_shape is not None:  # IndexTTS
        kwargs["conditioning_latents"] = torch.zeros(1, *spec.latent_shape, dtype=torch.bfloat16)
    model(input_ids=ids, prefix_lengths=torch.tensor([prefix]), window=window, cache=cache, use_cache=True, **kwargs)
    return cache_nbytes(cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", default="10,30,60")
    parser.add_argument("--models", default=",".join(MODEL_NAMES))
    parser.add_argument("--measure-max-params", type=float, default=1.5e9,
                        help="measure only presets up to this many parameters (CPU time and memory)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "kv_cache_table.json"))
    args = parser.parse_args()
    seconds = [float(s) for s in args.seconds.split(",")]
    rows = []
    print("| model | audio | P | G | W | full MiB | WAND MiB | reduction | paper | measured full MiB | measured WAND MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        spec = get_spec(name, "real")
        per_token = spec.kv_bytes_per_token(torch.bfloat16)
        prefix = spec.paper_prefix_length or DEFAULT_PREFIX
        window = spec.target_window
        with torch.device("meta"):
            n_params = sum(p.numel() for p in spec.build().parameters())
        model = None
        if n_params <= args.measure_max_params:
            torch.manual_seed(0)
            model = wand.enable_wand(spec.build(dtype=torch.bfloat16).eval(), window)
        for sec in seconds:
            generated = spec.tokens_for_seconds(sec)
            full = cache_bytes(per_token, prefix, generated, None)
            small = cache_bytes(per_token, prefix, generated, window)
            row = dict(model=name, seconds=sec, prefix=prefix, generated=generated, window=window,
                       full_bytes=full, wand_bytes=small, reduction=1 - small / full,
                       paper_reduction=PAPER_REDUCTION_10S.get(name) if sec == 10 else None)
            if model is not None:
                start = time.perf_counter()
                row["measured_full_bytes"] = measure(model, spec, prefix, generated, None)
                row["measured_wand_bytes"] = measure(model, spec, prefix, generated, window)
                row["measure_seconds"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            mib = lambda b: f"{b / 2**20:.2f}" if b is not None else "-"  # noqa: E731
            paper = f"{row['paper_reduction']:.1f}%" if row["paper_reduction"] else "-"
            print(f"| {name} | {sec:.0f} s | {prefix} | {generated} | {window} | {mib(full)} | {mib(small)} | "
                  f"{100 * row['reduction']:.1f}% | {paper} | {mib(row.get('measured_full_bytes'))} | "
                  f"{mib(row.get('measured_wand_bytes'))} |", flush=True)
        del model
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": "CPU", "dtype": "bfloat16", "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
