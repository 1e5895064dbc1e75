"""Per-step decode latency and KV-cache bytes vs generated length: full attention vs WAND.

    .venv/bin/python -m benchmarks.decode_latency                       # small long-context config, CPU
    .venv/bin/python -m benchmarks.decode_latency --config cosyvoice2 --device cuda --dtype bfloat16
    .venv/bin/python -m benchmarks.decode_latency --config indextts --device cuda --dtype bfloat16

Random weights (shapes are what matter for latency and memory). Prints a table, writes
benchmarks/results/decode_latency_<config>_<device>.{json,png}. Both modes run under
wand.profiling.timing_conditions: on CUDA, SDPA pinned to flash / memory-efficient (the fair
full-attention baseline: flash; WAND's dense mask: memory-efficient); on CPU, denormals flushed.
Target: WAND latency ratio (step 3,000 / step 100) <= 1.05, full attention grows, WAND bytes flat.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from wand.profiling import device_name, profile_decode

# Backbone shapes of the paper's models (see ../shared/WAND.md section 4). The vocabulary is
# cut to the speech vocabulary: the head size changes per-step cost equally for both modes.
CONFIGS = {
    # Long-context-heavy small config for CPU: wide attention, thin MLP, so attention dominates.
    "small": lambda: Qwen2ForCausalLM(Qwen2Config(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=8192)),
    "cosyvoice2": lambda: Qwen2ForCausalLM(Qwen2Config(  # Qwen2.5-0.5B backbone, 6561+3 speech head
        vocab_size=6564, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6)),
    "sparktts": lambda: Qwen2ForCausalLM(Qwen2Config(  # Qwen2.5-0.5B with Spark's extended vocab
        vocab_size=166000, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6)),
    "indextts": lambda: GPT2LMHeadModel(GPT2Config(  # IndexTTS 1.5 GPT: 1280-d, 24 layers, 20 heads
        vocab_size=8194, n_embd=1280, n_layer=24, n_head=20, n_positions=8192, bos_token_id=8192, eos_token_id=8193)),
}
DEFAULT_WINDOW = {"small": 32, "cosyvoice2": 32, "sparktts": 64, "indextts": 32}
DEFAULT_PREFIX = {"small": 128, "cosyvoice2": 182, "sparktts": 227, "indextts": 74}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--steps", type=int, default=4000, help="generated tokens per run")
    parser.add_argument("--window", type=int, default=None, help="W (default: the paper's for the config)")
    parser.add_argument("--prefix", type=int, default=None, help="prefix length P (default: the paper's)")
    parser.add_argument("--points", default="100,500,1000,2000,3000,4000",
                        help="steps at which latency (median of +-HALF steps) and bytes are reported")
    parser.add_argument("--half", type=int, default=100,
                        help="half width of the median window per reported step (CPU timers are noisy)")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    window = args.window or DEFAULT_WINDOW[args.config]
    prefix = args.prefix or DEFAULT_PREFIX[args.config]
    points = [p for p in (int(x) for x in args.points.split(",")) if p <= args.steps]
    torch.manual_seed(0)
    model = CONFIGS[args.config]().to(device=device, dtype=dtype).eval()
    model.set_attn_implementation("sdpa")

    # Warm-up (allocator, kernels) so step 100 is not inflated by first-call costs.
    profile_decode(model, prefix, window, 50)
    profile_decode(model, prefix, None, 50)
    results = {}
    for name, w in (("full", None), ("wand", window)):
        prof = profile_decode(model, prefix, w, args.steps, record_bytes_at=points)
        results[name] = prof
        if name == "full":
            print(f"# {args.config} on {device_name(device)}, {dtype}, P={prefix}, W={window}, {args.steps} steps, "
                  f"attention: {prof.attention}", flush=True)
        print(f"  {name}: done ({sum(prof.step_seconds):.1f} s)", flush=True)

    rows = []
    print(f"{'step':>6} | {'full ms':>8} | {'wand ms':>8} | {'full KV MiB':>11} | {'wand KV MiB':>11}")
    for p in points:
        row = {
            "step": p,
            "full_ms": 1e3 * results["full"].latency_at(p - 1, args.half),
            "wand_ms": 1e3 * results["wand"].latency_at(p - 1, args.half),
            "full_bytes": results["full"].cache_bytes[p],
            "wand_bytes": results["wand"].cache_bytes[p],
        }
        rows.append(row)
        print(f"{p:>6} | {row['full_ms']:8.3f} | {row['wand_ms']:8.3f} | "
              f"{row['full_bytes'] / 2**20:11.2f} | {row['wand_bytes'] / 2**20:11.2f}")
    late = 3000 if 3000 in points else points[-1]
    first = points[0]
    ratio = {m: results[m].latency_at(late - 1, args.half) / results[m].latency_at(first - 1, args.half) for m in results}
    print(f"latency ratio step {late} / step {first}: full {ratio['full']:.3f}, wand {ratio['wand']:.3f} "
          f"(target wand <= 1.05)")

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"decode_latency_{args.config}_{device.type}"
    summary = {
        "config": args.config, "device": device_name(device), "dtype": str(dtype), "attention": results["full"].attention,
        "prefix": prefix,
        "window": window, "steps": args.steps, "median_half_width": args.half, "rows": rows, "ratio_late_over_early": ratio,
        "ratio_steps": [late, first],
    }
    (out_dir / f"{stem}.json").write_text(json.dumps(summary, indent=2))
    plot(results, points, out_dir / f"{stem}.png", summary)
    print(f"wrote {out_dir / stem}.json and .png")


def plot(results, points, path: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
    for name, prof in results.items():
        xs = list(range(25, len(prof.step_seconds) - 25, 25))
        ax_lat.plot(xs, [1e3 * prof.latency_at(x) for x in xs], label=name)
        ax_mem.plot(points, [prof.cache_bytes[p] / 2**20 for p in points], marker="o", label=name)
    ax_lat.set(xlabel="generated tokens", ylabel="ms per step (median of 51)", title="decode latency")
    ax_mem.set(xlabel="generated tokens", ylabel="KV cache MiB", title="KV cache")
    for ax in (ax_lat, ax_mem):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"{summary['config']} on {summary['device']} ({summary['dtype']}), "
                 f"P={summary['prefix']}, W={summary['window']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
