"""The window chooser against the results table: does the W it recommends before training match the
smallest W whose fine-tuned WAND student passes the claims' thresholds?

    python -m benchmarks.window_chooser                    # the chooser on the three committed teachers (about 1 min)
    python -m benchmarks.window_chooser --from-json benchmarks/results/window_chooser.json   # render again
    python -m benchmarks.window_chooser --teachers runs/teachers-strong --table benchmarks/results/ablation_table_strong.json \
        --output benchmarks/results/window_chooser_strong.json --block chooser-strong   # other teachers, their own table

For each family: ``pipeline.evals.window_choice.choose_window`` on its committed teacher (teachers/<model>)
and 32 of the teacher's training utterances (seed 0, as ``jobs/choose_window.py`` samples a corpus),
candidate W those of the sweep and 256; then, from benchmarks/results/ablation_table.json, the claims
(``pipeline.evals.claims``) of every WAND student of the window sweep (the paper's schedule, curriculum
4W -> W: ``wand_w8``, ``wand`` at 32, ``wand_w64``, ``wand_w128``; ``--schedule hold``: ``wand_hold_w8``,
``wand_hold``, ``wand_hold_w64``, ``wand_hold_w128``, the schedule that reaches W halfway and holds it). Writes
benchmarks/results/window_chooser.json and the side-by-side table into docs/results.md and the README.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pipeline.docblocks import has_block, replace_block
from pipeline.evals.ablation import AblationConfig, variant_named
from pipeline.evals.claims import claims
from pipeline.evals.common import FAMILIES, FAMILY_NAMES
from pipeline.evals.window_choice import DEFAULT_WINDOWS, MIN_AGREEMENT, choose_window
from pipeline.synthetic.law import synthetic_rows, SyntheticTask
from pipeline.synthetic.teachers import read_teacher_record, record_spec

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ("wand_w8", "wand", "wand_w64", "wand_w128")  # one recipe (curriculum 4W -> W), four W
# The same W with wand_hold's schedule: wand_hold at the headline's 32, wand_hold_w<N> elsewhere.
SWEEPS = {"paper": SWEEP, "hold": tuple("wand_hold" if v == "wand" else v.replace("wand_w", "wand_hold_w") for v in SWEEP)}
START, END = "<!-- chooser-table:start -->", "<!-- chooser-table:end -->"
SWEEP_WINDOWS = tuple(sorted(variant_named(v).target(AblationConfig())[0] for v in SWEEP))  # 8, 32, 64, 128


def table_verdicts(results: list[dict], sweep: tuple[str, ...] = SWEEP) -> dict[str, dict[int, dict]]:
    """Per model, per W of the sweep the table ran: passed, the checks it missed, and whether it
    passes all but those its teacher misses too (a student is not asked to beat its teacher)."""
    out: dict[str, dict[int, dict]] = {}
    for variant in sweep:
        for model, claim in claims(results, variant=variant).items():
            missed = [name for name, ok in claim["checks"].items() if not ok]
            out.setdefault(model, {})[claim["window"]] = {
                "passed": claim["passed"], "missed": missed,
                "passed_but_teacher": all(name in claim["teacher_misses"] for name in missed)}
    return {model: dict(sorted(by_w.items())) for model, by_w in out.items()}


def smallest_passing(by_window: dict[int, dict]) -> int | None:
    """The smallest W that passes (all but the checks its teacher misses too)."""
    return next((w for w, v in sorted(by_window.items()) if v["passed_but_teacher"]), None)


def verdict_cell(verdict: dict | None) -> str:
    if verdict is None:
        return "n/a"
    if verdict["passed"]:
        return "pass"
    if verdict["passed_but_teacher"]:
        return "pass* (" + ", ".join(verdict["missed"]) + ": teacher too)"
    return "fail (" + ", ".join(verdict["missed"]) + ")"


def side_by_side(chooser: dict, verdicts: dict, schedule: str = "paper") -> str:
    at = " / ".join(map(str, SWEEP_WINDOWS))
    student = "WAND student" if schedule == "paper" else f"WAND student ({schedule} schedule)"
    lines = [f"| family | chooser: W (bare-mask agreement >= {MIN_AGREEMENT}), KV saved | bare-mask agreement at "
             f"{at} | table: {student} at W = {at} | table: smallest W that passes | agree |",
             "|---|---|---|---|---|---|"]
    for model in [m for m in FAMILIES if m in chooser and m in verdicts]:
        c, by_w = chooser[model], verdicts[model]
        agreement = dict(zip(c["windows"], c["mask_agreement"]))
        table_w = smallest_passing(by_w)
        cells = " / ".join(verdict_cell(by_w.get(w)) for w in SWEEP_WINDOWS)
        agree = " / ".join(f"{agreement[w]:.3f}" if w in agreement else "n/a" for w in SWEEP_WINDOWS)
        tried = max(by_w)
        if table_w is not None:
            same = "yes" if c["window_target"] == table_w else f"no (chooser {c['window_target']}, table {table_w})"
        elif c["window_target"] > tried:
            same = f"yes: none up to {tried} passes, the chooser asks for more"
        else:
            same = f"no: the chooser's W = {c['window_target']} fails in the table"
        lines.append(f"| {FAMILY_NAMES.get(model, model)} | {c['window_target']}, {100 * c['kv_saving_at_target']:.0f}% | "
                     f"{agree} | {cells} | {table_w or f'none up to {tried}'} | {same} |")
    return "\n".join(lines)


def run_chooser(teachers: Path, rows: int, windows: list[int]) -> dict:
    out = {}
    for name in FAMILIES:
        record = read_teacher_record(teachers / name)
        spec = record_spec(record)
        teacher = spec.load(str(teachers / name))
        sample = synthetic_rows(spec, rows, SyntheticTask(**record["task"]), seed=0, split="train")
        choice = choose_window(spec, teacher, sample, windows, torch.device("cpu"))
        print(f"# {name}\n{choice.table()}\n", flush=True)
        saving = {q.window: q.kv_saving for q in choice.qualities}
        out[name] = {"windows": [q.window for q in choice.qualities],
                     "mask_agreement": [q.agreement for q in choice.qualities],
                     "mask_kl": [q.kl for q in choice.qualities], "kv_saving": [q.kv_saving for q in choice.qualities],
                     "attention_kept": [m.kept for m in choice.masses], "window_target": choice.window_target,
                     "kv_saving_at_target": saving[choice.window_target], "notes": choice.notes, "rows": rows}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teachers", type=Path, default=ROOT / "teachers")
    parser.add_argument("--rows", type=int, default=32, help="training utterances the chooser reads per family")
    parser.add_argument("--windows", type=int, nargs="+", default=[*SWEEP_WINDOWS, 256],
                        help="candidate W: the table's sweep and 256 (like for like; jobs.choose_window's default "
                             f"grid is finer: {', '.join(map(str, DEFAULT_WINDOWS))})")
    parser.add_argument("--table", type=Path, default=ROOT / "benchmarks/results/ablation_table.json",
                        help="the results table's file (benchmarks/ablation_table.py)")
    parser.add_argument("--schedule", choices=sorted(SWEEPS), default="paper",
                        help="the table's sweep to judge by: the paper's schedule or the one that holds W")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/window_chooser.json")
    parser.add_argument("--from-json", type=Path, help="render an earlier --output again, no chooser run")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs/results.md")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--no-readme", action="store_true", help="print the table, leave the README and docs alone")
    parser.add_argument("--block", help="the table into --docs' <!-- BLOCK:start/end --> instead, README left alone")
    args = parser.parse_args(argv)
    if args.rows < 1:
        parser.error("--rows must be >= 1")
    places = [(args.docs, f"<!-- {args.block}:start -->", f"<!-- {args.block}:end -->")] if args.block else \
        [(args.docs, START, END), (args.readme, START, END)]
    for path, start, end in [] if args.no_readme else places:  # checked before the chooser runs
        if not has_block(path, start, end):
            parser.error(f"{path} has no {start} ... {end} block to write the table into (or pass --no-readme)")
    if args.from_json:
        chooser = json.loads(args.from_json.read_text())
    else:
        torch.set_num_threads(2)
        chooser = run_chooser(args.teachers, args.rows, args.windows)
        args.output.write_text(json.dumps(chooser, indent=2) + "\n")
    verdicts = table_verdicts(json.loads(args.table.read_text())["results"], SWEEPS[args.schedule])
    table = side_by_side(chooser, verdicts, args.schedule)
    print(table)
    for path, start, end in [] if args.no_readme else places:
        replace_block(path, start, end, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
