"""Run the evals on an experiment's final student (or any student folder) and log them to MLflow.

    python -m jobs.evaluate --config jobs/configs/tiny.yaml --only cosyvoice2
    python -m jobs.evaluate --config jobs/configs/paper.yaml --only cosyvoice2 --student s3://bucket/runs/cosyvoice2-wand/student

Evals (pipeline/evals/run.py): KV-cache memory vs length, per-step decode latency, attention FLOPs,
teacher-forced agreement/KL by distance from the prefix, the window chooser and, on synthetic
rows, what the models say (PER, speaker accuracy). Writes nothing to storage: with tracking on, the
results (metrics, a JSON table and a PNG figure per eval) replace the ``eval`` child run of the
experiment's parent run, and when that student is a registered model version, its gate tags and
the champion alias follow the new figures; it prints the metrics as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

from wand.models.weights import fingerprint

from pipeline.chain import evaluate_experiment, log_evals
from pipeline.cli import load_config_with_overrides, prepare
from pipeline.config import DistillConfig
from pipeline.registry.register import update_verdict
from pipeline.tracking import Tracker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default=None, help="student folder (default: <storage>/<experiment>/student)")
    config, args = load_config_with_overrides(DistillConfig, parser, argv, return_args=True)
    prepare([config], ("evaluate",))  # the evals run as a Ray task with evaluate.num_gpus / num_cpus
    results = evaluate_experiment(config, args.student)
    tracker = Tracker.from_config(config.tracking)
    if tracker is not None:
        from pipeline.chain import load_student, parent_tags

        parent = tracker.parent_run(config.experiment, parent_tags(config))
        checksum = fingerprint(load_student(config, args.student).state_dict())
        run_id = log_evals(tracker, parent, results, config, checksum)
        # A registered student's gate tags and alias follow the new figures.
        registration = update_verdict(tracker, parent, config, checksum,
                                      {k: v for r in results for k, v in r.metrics.items()})
        tracker.finish(parent)
        print(f"logged to {tracker.run_url(run_id)}")
        if registration is not None:
            print(f"registered as {registration.uri}" + (f" (no alias: missed {registration.missed})"
                                                        if not registration.champion else ""))
    print(json.dumps({r.name: {"metrics": r.metrics, "notes": r.notes} for r in results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
