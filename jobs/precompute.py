"""Precompute the frozen teacher's top-k log-probabilities of one experiment as sharded Parquet (a Ray Data stage).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m jobs.precompute --config jobs/configs/tiny.yaml --only cosyvoice2 --root "$PWD"
    python -m jobs.precompute --config jobs/configs/paper.yaml --only cosyvoice2 --set shards=s3://bucket/topk/cosyvoice2 --set precompute.k=32

The experiment config is the one jobs/distill.py takes (its `precompute:` section and the shared
model, corpus and shards); fields are overridden with --set (the one override syntax of every entry
point). jobs/distill.py runs this step itself; run it alone to precompute ahead of training.
Rerunning the same command resumes: finished shards are kept, the rest are computed, and
manifest.json is written at the end. Writes: <shards>/shard-*.parquet, manifest.json, _run.json
and, with on_bad_rows: quarantine, errors/bad_rows.parquet. Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.cli import load_config_with_overrides, prepare
from pipeline.config import DistillConfig
from pipeline.data.precompute import run_precompute


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    experiment = load_config_with_overrides(DistillConfig, parser, argv)
    config = experiment.precompute_config()
    prepare([experiment], ("precompute",))
    manifest = run_precompute(config)
    summary = {k: manifest[k] for k in ("rows", "generated_tokens", "k", "value_dtype", "index_dtype")}
    summary.update(shards=len(manifest["shards"]), bad_rows=manifest["bad_rows"]["count"], output=config.shards)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
