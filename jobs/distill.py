"""The whole WAND distillation chain for one model: precompute -> curriculum stages -> student -> evals.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/distill.py --config jobs/configs/tiny.yaml
    python jobs/distill.py --config jobs/configs/cosyvoice2.yaml --set train.num_workers=8 --set storage=s3://bucket/runs

Resubmitting the same command resumes: matching shards are reused, finished stages are skipped,
an interrupted stage continues from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.chain import DistillConfig, run_chain  # noqa: E402
from pipeline.cli import init_ray, load_config_with_overrides  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config = load_config_with_overrides(DistillConfig, parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    init_ray()
    summary = run_chain(config)
    last = summary["stages"][-1]["metrics"][-1]
    print(json.dumps({"experiment": config.experiment, "student": summary["student"],
                      "stages": len(summary["stages"]), "final_step": last["step"], "final_loss": last["loss"],
                      "final_window": last["window"], "evals": summary["evals"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
