"""Run (or rerun, or resume) one curriculum stage on its own, starting from stage K-1's checkpoint.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m jobs.train_stage --config jobs/configs/tiny.yaml --stage 2

The shards must exist (jobs/precompute.py or jobs/distill.py made them). A finished stage is
skipped; delete <storage>/<experiment>/stage-K.json to run it again. With tracking on, the stage
logs into the child run ``stage-K`` of the experiment's parent run (made if missing), so stages
submitted one by one nest like a whole chain.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.chain import parent_tags, track_stage
from pipeline.cli import load_config_with_overrides, prepare
from pipeline.config import DistillConfig
from pipeline.tracking import Tracker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=int, required=True, help="1-based curriculum stage to run")
    config, args = load_config_with_overrides(DistillConfig, parser, argv, return_args=True)
    train = config.train_config()
    if not 1 <= args.stage <= train.stages:
        parser.error(f"--stage must be in [1, {train.stages}] (curriculum.stages)")
    prepare([config], ("train",))
    tracker = Tracker.from_config(config.tracking)
    parent = None
    if tracker is not None:
        before = tracker.find_run(**{"wand.experiment": config.experiment, "wand.role": "parent"})
        parent = tracker.parent_run(config.experiment, parent_tags(config))
    try:
        record = track_stage(tracker, parent, train, args.stage)
    finally:
        if tracker is not None:  # the parent keeps the status it had (FINISHED only after the whole chain)
            status = before.info.status if before is not None else ("FINISHED" if args.stage == train.stages else "RUNNING")
            tracker.client.update_run(parent, status=status)
    print(json.dumps({k: record[k] for k in ("stage", "start", "end", "checkpoint", "param_checksum")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
