"""Precompute the frozen teacher's top-k log-probabilities as sharded Parquet (a Ray Data stage).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/precompute.py --config jobs/configs/precompute-tiny.yaml
    python jobs/precompute.py --config my.yaml --output s3://bucket/topk/cosyvoice2 --k 32

The config is YAML with the fields of pipeline.teacher_topk.PrecomputeConfig; any field can be
overridden on the command line (--field value). Rerunning the same command resumes: finished
shards are kept, the rest are computed, and manifest.json is written at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import config_from_args, init_ray  # noqa: E402
from pipeline.teacher_topk import PrecomputeConfig, run_precompute  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config = config_from_args(PrecomputeConfig, parser, argv)
    init_ray()
    manifest = run_precompute(config)
    summary = {k: manifest[k] for k in ("rows", "generated_tokens", "k", "value_dtype", "index_dtype")}
    summary.update(shards=len(manifest["shards"]), bad_rows=manifest["bad_rows"]["count"], output=config.output)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
