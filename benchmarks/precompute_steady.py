"""The teacher top-k precompute at steady state, against a bare teacher forward on the same cores.

    .venv/bin/python -m benchmarks.precompute_steady                      # 2,000 rows per family, ~20 min
    .venv/bin/python -m benchmarks.precompute_steady --rows 300 --models cosyvoice2   # a quick look

For each family: a synthetic corpus (pipeline/synthetic/law.py, --rows utterances) and the committed
teacher (teachers/<model>). The stage (pipeline.data.precompute.run_precompute, k = 16, one actor, on a
local Ray instance with 2 CPUs) is timed from its start to each shard's completion (the sidecar each
shard writes last): start-up is the time to the first shard (Ray Data read, row checks, the shuffle
into shards, actor start and teacher load, the first forward); steady state is the rows of the
other shards over the time between the first and the last shard. The bare forward runs the same
teacher over the same rows in the same length-sorted token-budget batches (wand.batch.collate, no
top-k, no Ray) with one torch thread, as the actor has (Ray gives a 0.5-CPU actor one thread).
Also: Parquet bytes per generated token of the shards (target <= 60 at k = 16).
Writes benchmarks/results/precompute_steady.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]

from pipeline.synthetic.law import synthetic_rows
from pipeline.config import PrecomputeConfig
from pipeline.data.precompute import run_precompute
from pipeline.evals.common import FAMILIES
from wand.models.weights import teacher_weights
from pipeline.synthetic.teachers import read_teacher_record
from wand.batch import collate
from wand.models import get_spec
from wand.profiling import cpu_device



@torch.no_grad()
def bare_forward(spec, model, rows: list[dict], max_tokens: int) -> float:
    """Seconds for the teacher's forward over ``rows`` in the stage's batching (no top-k, no Ray)."""
    order = sorted(rows, key=lambda r: len(r["input_ids"]))
    start = time.perf_counter()
    batch: list[dict] = []
    for row in order + [None]:
        longest = max([len(r["input_ids"]) for r in batch] + ([len(row["input_ids"])] if row else [0]))
        if batch and (row is None or longest * (len(batch) + 1) > max_tokens):
            model(**collate(spec, batch).model_inputs(), window=None)
            batch = []
        if row is not None:
            batch.append(row)
    return time.perf_counter() - start


def measure(name: str, rows_n: int, work: Path, rows_per_shard: int) -> dict:
    import wand

    record = read_teacher_record(ROOT / "teachers" / name)
    spec = get_spec(name, record["size"])
    rows = synthetic_rows(spec, rows_n, seed=7, split="bench")
    corpus = work / f"{name}-corpus"
    corpus.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), corpus / "corpus.parquet")
    generated = sum(len(r["input_ids"]) - r["prefix_length"] for r in rows)
    config = PrecomputeConfig(model=name, model_size=record["size"], teacher_source=str(ROOT / "teachers" / name),
                              corpus=str(corpus), shards=str(work / f"{name}-shards"), k=16,
                              rows_per_shard=rows_per_shard)
    start = time.time()
    manifest = run_precompute(config)
    total = time.time() - start
    shards = work / f"{name}-shards"
    done = sorted((shards / s["file"].replace(".parquet", ".json")).stat().st_mtime for s in manifest["shards"])
    first, last = done[0] - start, done[-1] - start
    steady_rows = rows_n - manifest["shards"][0]["rows"]  # the rows of every shard after the first
    steady = steady_rows / max(last - first, 1e-9)
    size = sum((shards / s["file"]).stat().st_size for s in manifest["shards"])

    torch.set_num_threads(1)
    teacher = wand.enable_wand(teacher_weights(spec, config.teacher_source, 0, None).eval(), None)
    bare_forward(spec, teacher, rows[:8], config.max_tokens_per_batch)  # warm-up
    bare = bare_forward(spec, teacher, rows, config.max_tokens_per_batch)
    result = {
        "model": name, "rows": rows_n, "generated_tokens": generated, "shards": len(manifest["shards"]),
        "stage_seconds": round(total, 1), "startup_seconds": round(first, 1),
        "stage_rows_per_s_overall": rows_n / total, "stage_rows_per_s_steady": steady,
        "stage_tokens_per_s_steady": steady * generated / rows_n,
        "bare_rows_per_s": rows_n / bare, "bare_tokens_per_s": generated / bare,
        "steady_over_bare": steady / (rows_n / bare), "overall_over_bare": (rows_n / total) / (rows_n / bare),
        "parquet_bytes_per_generated_token": size / generated,
    }
    print(f"{name}: stage {total:.0f} s (start-up {first:.0f} s to the first of {len(manifest['shards'])} shards), "
          f"steady {steady:.1f} rows/s vs bare forward {rows_n / bare:.1f} rows/s = {result['steady_over_bare']:.2f}x "
          f"(overall {result['overall_over_bare']:.2f}x); shards {result['parquet_bytes_per_generated_token']:.1f} "
          "B per generated token", flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--rows", type=int, default=2000, help="synthetic utterances per family")
    parser.add_argument("--rows-per-shard", type=int, default=250)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/precompute_steady.json")
    args = parser.parse_args(argv)
    if args.rows < 2 * args.rows_per_shard:
        parser.error("--rows must hold at least two shards (--rows-per-shard): steady state is measured after the first")
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    work = Path(tempfile.mkdtemp(prefix="wand-precompute-steady-"))
    try:
        results = [measure(name, args.rows, work, args.rows_per_shard) for name in args.models]
    finally:
        shutil.rmtree(work, ignore_errors=True)
        ray.shutdown()
    device = f"{cpu_device(cores=True)}, torch {torch.__version__}"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"device": device, "results": results}, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
