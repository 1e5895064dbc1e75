"""The whole WAND distillation chain per model: precompute -> curriculum stages -> student -> evals.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m jobs.distill --config jobs/configs/tiny.yaml --root "$PWD"
    python -m jobs.distill --config jobs/configs/paper.yaml --only cosyvoice2 --set train.num_workers=8 --set storage=s3://bucket/runs

A config holds one experiment, or ``defaults:`` + ``experiments:`` (the embedded default runs the
three tiny families one after the other; ``--only sparktts`` picks one). With an MLflow tracking
URI (``tracking.uri`` or $MLFLOW_TRACKING_URI) every experiment is a parent run with a child run
per stage. Resubmitting the same command resumes: matching shards are reused, finished stages are
skipped, an interrupted stage continues from its last checkpoint, logged evals are not redone.
Writes: the teacher's top-k shards under ``shards``, checkpoints and ``stage-k.json`` under
``<storage>/<experiment>``, the student in its release format under ``<storage>/<experiment>/student``,
MLflow runs; prints a progress line per stage every ``train.progress_every_s``, then the results
table and the MLflow links (the experiment and the Compare view of its parent runs).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


from pipeline.chain import check_cluster_storage, run_chain
from pipeline.config import DistillConfig
from pipeline.cli import load_experiments, prepare
from pipeline.evals.report import registry_lines, results_table, ui_lines
from pipeline.registry.register import registered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--summary-json", type=Path, default=None, help="also write the per-model summary here")
    configs, args = load_experiments(DistillConfig, parser, argv)
    prepare(configs)
    for config in configs:  # before anything runs: a multi-node cluster needs shared storage
        check_cluster_storage(config)
    summaries = []
    for number, config in enumerate(configs, 1):
        logging.getLogger("wand.distill").info("experiment %d/%d: %s (%s, %s)", number, len(configs),
                                               config.experiment, config.model, config.model_size)
        summary = run_chain(config)
        last = summary["stages"][-1]["metrics"][-1]
        summaries.append({"experiment": config.experiment, "model": config.model, "student": summary["student"],
                          "stages": len(summary["stages"]), "final_step": last["step"], "final_loss": last["loss"],
                          "final_window": last["window"], "parent_run_id": summary["parent_run_id"],
                          "tracking_uri": summary["tracking_uri"], "experiment_id": summary["experiment_id"],
                          "evals": summary["evals"], **registered(summary["registration"])})
    if args.summary_json:
        args.summary_json.write_text(json.dumps(summaries, indent=2))
    print(results_table(summaries))
    print(ui_lines(summaries))
    print(registry_lines(summaries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
