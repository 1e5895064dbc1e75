"""Choose W before training: what each W costs the teacher (the bare mask's agreement) and saves (KV).

    python -m jobs.choose_window --config jobs/configs/tiny.yaml --only cosyvoice2 --root "$PWD"
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.choose_window --config jobs/configs/paper.yaml --only cosyvoice2 --rows 64 --device cuda

Runs the experiment's teacher (`teacher_source`) on a seeded sample of its corpus and prints, per W:
the bare WAND mask's top-1 agreement and KL against the same teacher with full attention
(teacher-forced, at the positions the window cuts), the KV cache saved at the median row, and the
teacher's attention mass on the prefix and on the last W tokens (the paper's Table 2, a reading aid).
Recommends `curriculum.window_target`: the smallest W whose bare-mask agreement reaches
MIN_AGREEMENT (pipeline/evals/window_choice.py, calibrated on the results table's window sweep), and
`curriculum.window_start` (4x); says so when that W saves little. With tracking on it logs them as a
`choose-window` child of the experiment's parent run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


from pipeline.chain import parent_tags
from pipeline.config import DistillConfig
from pipeline.cli import load_config_with_overrides, setup_logging
from pipeline.data.corpus_io import sample_rows
from pipeline.evals.common import resolve_device
from pipeline.data.precompute import load_teacher
from pipeline.tracking import Tracker
from pipeline.evals.window_choice import choose_window, DEFAULT_WINDOWS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32, help="corpus rows to sample (seeded)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--windows", default=",".join(map(str, DEFAULT_WINDOWS)), help="candidate W, comma-separated")
    parser.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda, cuda:1, ...")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    config, args = load_config_with_overrides(DistillConfig, parser, argv, return_args=True)
    setup_logging()
    try:
        windows = [int(w) for w in args.windows.split(",")]
    except ValueError:
        parser.error(f"--windows: comma-separated integers, got {args.windows!r}")
    if args.rows < 1 or any(w < 1 for w in windows):
        parser.error("--rows and every W must be >= 1")

    device = resolve_device(args.device)
    teacher, spec = load_teacher(config.precompute_config(), device)
    rows = sample_rows(config.corpus, config.s3_endpoint, args.rows, args.seed)
    print(f"# {config.experiment}: teacher {spec.name} ({spec.size}) on {device}, {len(rows)} rows of {config.corpus}")
    choice = choose_window(spec, teacher, rows, windows, device)
    print(choice.table())

    tracker = Tracker.from_config(config.tracking)
    if tracker is not None:
        parent = tracker.parent_run(config.experiment, parent_tags(config))
        child = tracker.child_run(parent, "choose-window")
        tracker.log_params(child, {"rows": len(rows), "seed": args.seed, "windows": ",".join(map(str, windows)),
                                   "corpus": config.corpus})
        tracker.log_metrics(child, choice.metrics())
        tracker.log_text(child, choice.table(), "choose_window.md")
        tracker.finish(child)
        print(f"logged to {tracker.run_url(child)}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "windows": [m.window for m in choice.masses], "kept": [m.kept for m in choice.masses],
            "prefix": [m.prefix for m in choice.masses], "window_share": [m.window_share for m in choice.masses],
            "layers": [list(m.layers) for m in choice.masses], "rows": [r["id"] for r in rows],
            "smallest": {str(c): w for c, w in choice.smallest.items()},
            "mask_agreement": [q.agreement for q in choice.qualities], "mask_kl": [q.kl for q in choice.qualities],
            "kv_saving": [q.kv_saving for q in choice.qualities], "notes": choice.notes,
            "window_target": choice.window_target, "window_start": choice.window_start}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
