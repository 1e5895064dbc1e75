"""Teacher top-k shards: bytes per generated token vs dense logits, and stage throughput.

    .venv/bin/python -m benchmarks.topk_precompute            # CPU, a local Ray instance

1. Bytes per generated token for k in {8, 16, 32, 64, 128}: the Arrow payload (values + indices
   + the rest mass) against dense fp16 logits over each real preset's target vocabulary, and the
   measured Parquet (zstd) bytes of shards written by the stage.
2. Throughput: the whole stage (Ray Data read, row checks, shuffle into shards, teacher forward,
   top-k, writes) against a bare teacher forward over the same rows with the same batching,
   on the same machine (goal >= 0.85).
3. Mass outside the top-k (mean over positions) for the teacher used here. The teacher has random
   weights (trained teachers arrive with the embedded default), so its distributions are far
   flatter than a trained model's: read it as a worst case.
Writes benchmarks/results/topk_precompute.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from wand.models import get_spec, MODEL_NAMES

from pipeline.config import PrecomputeConfig
from pipeline.data.precompute import load_teacher, run_precompute
from pipeline.data.shards import index_type
from pipeline.synthetic.random_corpus import corpus_rows

ROOT = Path(__file__).resolve().parents[1]

KS = (8, 16, 32, 64, 128)


def payload_bytes(k: int, target_vocab: int, value_bytes: int = 2) -> int:
    """Arrow bytes per generated position: k values, k indices, one float32 rest, 3 list offsets."""
    return k * (value_bytes + index_type(target_vocab).bit_width // 8) + 4 + 3 * 4


def main() -> None:
    import ray

    out: dict = {"device": "CPU (2 cores)", "analytic": [], "measured": {}}
    print("## bytes per generated token (Arrow payload, fp16 values) vs dense fp16 logits")
    print("| preset | target vocab | dense B | " + " | ".join(f"k={k}" for k in KS) + " |")
    print("|---|---:|---:|" + "---:|" * len(KS))
    for name in MODEL_NAMES:
        spec = get_spec(name, "real")
        if spec.speech_range[0] < 0:  # Spark: ids need its tokenizer; sizes are known (codes + <|im_end|>)
            vocab = spec.extra["semantic_codes"] + 1
        else:
            vocab = len(spec.target_ids())
        dense = 2 * vocab
        cells = [f"{payload_bytes(k, vocab)} ({100 * payload_bytes(k, vocab) / dense:.2f}%)" for k in KS]
        out["analytic"].append({"preset": name, "target_vocab": vocab, "dense_bytes": dense,
                                "sparse_bytes": {k: payload_bytes(k, vocab) for k in KS}})
        print(f"| {name} | {vocab} | {dense} | " + " | ".join(cells) + " |")

    # CosyVoice 2's real vocabularies (speech 6,564, text 151,936) on a small backbone, so the
    # run fits a 2-core CPU while the shapes that drive storage are real.
    spec = get_spec("cosyvoice2", "small")
    rows = corpus_rows(spec, 96, seed=11, min_gen=200, max_gen=500)
    work = Path(tempfile.mkdtemp(prefix="wand-topk-bench-"))
    (work / "in").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), work / "in" / "corpus.parquet")
    generated = sum(len(r["input_ids"]) - r["prefix_length"] for r in rows)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)

    import pipeline.data.precompute as stage

    try:
        print("\n## measured shard bytes (Parquet, zstd) per generated token, teacher vocab 6,564")
        measured = {}
        timing = {}
        for k in KS:
            config = PrecomputeConfig(model="cosyvoice2", model_size="small", corpus=str(work / "in"),
                                      shards=str(work / f"out-k{k}"), k=k, rows_per_shard=32,
                                      max_tokens_per_batch=4096)
            start = time.perf_counter()
            manifest = run_precompute(config)
            timing[k] = time.perf_counter() - start
            size = sum((work / f"out-k{k}" / s["file"]).stat().st_size for s in manifest["shards"])
            tables = [pq.read_table(work / f"out-k{k}" / s["file"], columns=["rest_logprob"]) for s in manifest["shards"]]
            rest = np.concatenate([np.concatenate(t.column("rest_logprob").to_pylist()) for t in tables])
            measured[k] = {"parquet_bytes_per_token": size / generated, "dense_fp16_bytes": 2 * 6564,
                           "mean_mass_outside_topk": float(np.exp(rest).mean()), "stage_seconds": timing[k]}
            print(f"k={k}: {size / generated:.1f} B/token ({100 * size / generated / (2 * 6564):.2f}% of dense), "
                  f"mass outside top-k {measured[k]['mean_mass_outside_topk']:.3f}, stage {timing[k]:.1f} s", flush=True)
        out["measured"] = measured

        # Bare forward over the same rows with the same batching (load excluded, as the stage's
        # actors load once too; both include nothing else).
        config = PrecomputeConfig(model="cosyvoice2", model_size="small", corpus=str(work / "in"),
                                  shards=str(work / "unused"), k=16, max_tokens_per_batch=4096)
        teacher, _ = load_teacher(config, torch.device("cpu"))
        actor = stage.TeacherTopK.__new__(stage.TeacherTopK)
        actor.config, actor.spec, actor.device = config, spec, torch.device("cpu")
        actor.model, actor.target_ids = teacher, spec.target_ids()
        start = time.perf_counter()
        with torch.no_grad():
            order = sorted(rows, key=lambda r: len(r["input_ids"]))
            batch = []
            for r in order + [None]:
                if batch and (r is None or max(len(x["input_ids"]) for x in batch + [r]) * (len(batch) + 1) > 4096):
                    width = max(len(x["input_ids"]) for x in batch)
                    ids = torch.zeros(len(batch), width, dtype=torch.long)
                    mask = torch.zeros_like(ids)
                    for b, x in enumerate(batch):
                        ids[b, : len(x["input_ids"])] = torch.tensor(x["input_ids"])
                        mask[b, : len(x["input_ids"])] = 1
                    teacher(input_ids=ids, attention_mask=mask,
                            prefix_lengths=torch.tensor([x["prefix_length"] for x in batch]))
                    batch = []
                if r is not None:
                    batch.append(r)
        bare = time.perf_counter() - start
        out["throughput"] = {"generated_tokens": generated, "bare_forward_seconds": bare,
                             "stage_seconds_k16": timing[16], "ratio": bare / timing[16]}
        print(f"\nthroughput: bare forward {bare:.1f} s, stage (k=16) {timing[16]:.1f} s, "
              f"ratio {bare / timing[16]:.2f} (goal >= 0.85); {generated} generated tokens")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    path = ROOT / "benchmarks" / "results" / "topk_precompute.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
