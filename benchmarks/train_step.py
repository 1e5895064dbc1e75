"""Training step time, WAND mask vs full attention, at sequence lengths 512 / 1,024 / 2,048.

    .venv/bin/python benchmarks/train_step.py                    # CPU: SDPA with the dense mask
    .venv/bin/python benchmarks/train_step.py --device cuda      # GPU: FlexAttention block masks

Fixed small config (Qwen2, hidden 256, 4 layers, 8 heads, 2 KV heads, speech head 6,564), batch 1,
prefix 128, W 32: forward + chunked CE/KD loss + backward + AdamW step, median of --repeats.
On CPU the dense mask changes which scores count, not how many are computed, so no speedup is
expected there; FlexAttention skips the blocks outside prefix + window (goal <= 0.8x at 2,048).
Writes benchmarks/results/train_step_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import wand  # noqa: E402
from wand.losses import wand_loss  # noqa: E402
from wand.topk import sparse_teacher_targets  # noqa: E402


def step_time(model, optimizer, length, window, prefix, device, repeats):
    ids = torch.randint(0, 6564, (1, length), device=device)
    positions = torch.arange(prefix - 1, length - 1, device=device)
    with torch.no_grad():
        teacher = torch.randn(positions.numel(), 6564, device=device)
    values, index, rest = sparse_teacher_targets(teacher, torch.arange(6564, device=device), 16)
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model(input_ids=ids, prefix_lengths=torch.tensor([prefix], device=device), window=window,
                    output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1][0, positions]
        loss = wand_loss(hidden, model.lm_head, ids[0, positions + 1], values, index, rest).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])  # the first includes warm-up / compilation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", default="512,1024,2048")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=6564, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
    model = Qwen2ForCausalLM(config).to(device)
    backend = "flex" if device.type == "cuda" else "sdpa"
    wand.enable_wand(model, 32, backend=backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rows = []
    print(f"| length | full ms | WAND ms | WAND / full |  ({device.type}, {backend})")
    print("|---:|---:|---:|---:|")
    for length in (int(x) for x in args.lengths.split(",")):
        full = step_time(model, optimizer, length, None, 128, device, args.repeats)
        windowed = step_time(model, optimizer, length, 32, 128, device, args.repeats)
        rows.append({"length": length, "full_s": full, "wand_s": windowed, "ratio": windowed / full})
        print(f"| {length} | {1e3 * full:.0f} | {1e3 * windowed:.0f} | {windowed / full:.2f} |", flush=True)
    out = ROOT / "benchmarks" / "results" / f"train_step_{device.type}.json"
    out.write_text(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU (2 cores)",
                               "backend": backend, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
