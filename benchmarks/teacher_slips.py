"""Where the teachers go wrong at phoneme starts, by kind (pipeline/synthetic/slips.py).

    python -m benchmarks.teacher_slips                      # the committed teachers; under a minute
    python -m benchmarks.teacher_slips teachers/indextts runs/teachers-wide-longer/indextts --no-docs
    python -m benchmarks.teacher_slips benchmarks/teachers/sinusoidal/indextts --block teacher-slips-sinusoidal \
        --output benchmarks/results/teacher_slips_sinusoidal.json   # an experiment's teachers, a block of their own

For each teacher folder (a teacher.json beside its weights, as jobs/train_teachers.py writes it): the
teacher-forced predictions at the phoneme starts of ``--rows`` held-out utterances (the seed its
teacher.json names) by kind: right, the phoneme held a frame too long (timing), a slip of 1 or of 2-3
places in the text, another phoneme, a stop, anything else; overall and by generated position. Writes
benchmarks/results/teacher_slips.json and its table into docs/results.md (``--no-docs``: not).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

import wand
from wand.profiling import cpu_device
from pipeline.docblocks import has_block, write_result
from pipeline.evals.common import FAMILIES, FAMILY_NAMES
from pipeline.synthetic.law import synthetic_rows, SyntheticTask, text_limit
from pipeline.synthetic.slips import KINDS, phoneme_start_slips
from pipeline.synthetic.teacher_tables import position_init
from pipeline.synthetic.teachers import MINI_BACKBONE, POSITION_EDGES, read_teacher_record, record_spec

ROOT = Path(__file__).resolve().parents[1]


def markers(block: str = "teacher-slips") -> tuple[str, str]:
    """The docs' markers of a slips table (the main one by default)."""
    return f"<!-- {block}:start -->", f"<!-- {block}:end -->"


START, END = markers()


def label(record: dict) -> str:
    """A teacher by family, backbone and length curriculum (steps x text lengths per phase, as the
    family's positions cap them: what tells the runs apart)."""
    backbone = record.get("backbone") or MINI_BACKBONE
    longest = text_limit(record_spec(record), SyntheticTask(**record["task"])) or math.inf  # IndexTTS: 58
    phases = ", ".join(f"{p['steps']:,} x {min(p['min_text'], longest)}-{min(p['max_text'], longest)}"
                       for p in record["train"]["phases"])
    init = position_init(record)  # jobs.train_teachers --position-init
    return (f"{FAMILY_NAMES[record['model']]}, {backbone['width']} wide x {backbone['layers']}, {phases}"
            + (f", {init} positions" if init != "random" else ""))


def measure(directory: Path, rows: int) -> dict:
    record = read_teacher_record(directory)  # the weights' sha256 checked against it
    spec, task = record_spec(record), SyntheticTask(**record["task"])
    model = wand.enable_wand(spec.load(str(directory)), None)
    held = synthetic_rows(spec, rows, task, seed=record["heldout"]["seed"], split="heldout", alignment=True)
    where = directory.resolve()
    return {"teacher": str(where.relative_to(ROOT)) if where.is_relative_to(ROOT) else str(where),
            "label": label(record), "model": record["model"], "files": record["files"], "rows": rows,
            **phoneme_start_slips(spec, model, held, task, POSITION_EDGES)}


def share(counts: dict, kind: str) -> str:
    return f"{counts.get(kind, 0) / sum(counts.values()):.1%}"


def table(saved: dict) -> str:
    """The docs' table of a teacher_slips.json: each kind's share of the phoneme starts, then the
    share of slips (1 and 2-3 places) by generated position."""
    lines = [f"Measured on {saved['device']}; teacher-forced, {saved['results'][0]['rows']} held-out rows each; "
             "shares of the phoneme starts (the stop excluded).", "",
             f"| teacher | phoneme starts | {' | '.join(KINDS)} |", "|---|---|" + "---|" * len(KINDS)]
    for r in saved["results"]:
        lines.append(f"| {r['label']} | {sum(r['all'].values()):,} | " + " | ".join(share(r["all"], k) for k in KINDS) + " |")
    lines.append("")
    for r in saved["results"]:
        spans = ", ".join(f"{span}: {share(c, 'right')} right, {(c.get('slip 1', 0) + c.get('slip 2-3', 0)) / sum(c.values()):.1%} "
                          f"slips, {share(c, 'timing')} timing" for span, c in r["by_position"].items())
        lines.append(f"- {r['label']}: by generated position: {spans}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teachers", nargs="*", type=Path, default=[ROOT / "teachers" / name for name in FAMILIES],
                        help="teacher folders (default: the committed teachers/<model>)")
    parser.add_argument("--rows", type=int, default=64, help="held-out utterances per teacher")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/teacher_slips.json")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--no-docs", action="store_true", help="write the JSON only, leave the docs alone")
    parser.add_argument("--block", default="teacher-slips",
                        help="the --docs markers the table goes between (default teacher-slips, the main table)")
    args = parser.parse_args(argv)
    start, end = markers(args.block)
    if args.rows < 1:
        parser.error("--rows must be >= 1")
    if not args.no_docs and not has_block(args.docs, start, end):
        parser.error(f"--docs {args.docs}: needs the markers {start} {end} (or --no-docs)")
    for directory in args.teachers:  # every folder checked before anything is measured
        try:
            read_teacher_record(directory)
        except (FileNotFoundError, ValueError) as err:
            parser.error(f"teacher folder {directory}: {err}")
    torch.set_num_threads(1)
    results = []
    for directory in args.teachers:
        results.append(measure(directory, args.rows))
        print(f"{results[-1]['label']}: {results[-1]['all']}", flush=True)
    saved = {"device": f"{cpu_device(1)}, torch {torch.__version__}", "results": results}
    write_result(args.output, saved, table(saved), None if args.no_docs else args.docs, start, end)
    return 0


if __name__ == "__main__":
    sys.exit(main())
