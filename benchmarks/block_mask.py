"""Building the training forward's FlexAttention BlockMask: torch's dense pass against WAND's tiles.

    .venv/bin/python -m benchmarks.block_mask                   # CPU
    .venv/bin/python -m benchmarks.block_mask --device cuda     # GPU (make gpu-check)

``create_block_mask`` evaluates the WAND mask_mod on every (query, key) pair of the batch (B x T x T)
and reads the block counts back; ``wand.blocks.wand_tile_block_mask`` decides each 128 x 128 tile from
its corners (B x (T/128)^2) and caches the result per (prefix lengths, W, length). Timed: the dense
build, the tile build with the cache cleared, and a cached lookup (a batch seen again). Each length
at --tokens tokens (batch = tokens / length), prefix 182, W 32; median of --repeats after one warm-up.
The two masks are checked equal before anything is timed. Writes benchmarks/results/block_mask_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import create_block_mask

from wand.blocks import clear_block_mask_cache, wand_tile_block_mask
from wand.masks import wand_mask_mod
from wand.profiling import device_name

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")


def median_ms(build, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        mask = build()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        del mask
    return 1e3 * statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", default="2048,8192")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per batch (batch = tokens / length)")
    parser.add_argument("--prefix", type=int, default=182)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    if any(length % 128 or length <= args.prefix for length in lengths):
        parser.error(f"--lengths must be multiples of 128 longer than --prefix ({args.prefix})")
    if args.repeats < 1 or args.tokens < 1:
        parser.error("--repeats and --tokens must be >= 1")
    device = torch.device(args.device)
    print(f"# {device_name(device)}; prefix {args.prefix}, W {args.window}, {args.tokens} tokens per batch")
    print("| length | batch | dense build ms | tile build ms | cached ms | dense / tiles |")
    print("|---:|---:|---:|---:|---:|---:|")
    rows = []
    for length in lengths:
        batch = max(1, args.tokens // length)
        prefix = torch.full((batch,), args.prefix, device=device)

        def dense():
            return create_block_mask(wand_mask_mod(prefix, args.window), B=batch, H=None, Q_LEN=length,
                                     KV_LEN=length, device=device)

        def tiles():
            clear_block_mask_cache()
            return wand_tile_block_mask(prefix, args.window, length, device)

        reference, ours = dense(), tiles()
        for field in FIELDS:  # the figure is about building the same mask, so check it is the same
            if not torch.equal(getattr(reference, field), getattr(ours, field)):
                raise SystemExit(f"the tile mask differs from create_block_mask in {field} at length {length}")
        row = {"length": length, "batch": batch, "dense_ms": median_ms(dense, device, args.repeats),
               "tiles_ms": median_ms(tiles, device, args.repeats),
               "cached_ms": median_ms(lambda: wand_tile_block_mask(prefix, args.window, length, device),
                                      device, args.repeats)}
        rows.append(row)
        print(f"| {length} | {batch} | {row['dense_ms']:.2f} | {row['tiles_ms']:.2f} | {row['cached_ms']:.3f} | "
              f"{row['dense_ms'] / row['tiles_ms']:.0f}x |", flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"block_mask_{device.type}.json"
    out.write_text(json.dumps({"device": device_name(device), "torch": torch.__version__, "prefix": args.prefix,
                               "window": args.window, "tokens": args.tokens, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
