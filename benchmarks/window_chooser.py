"""The window chooser against the results table: does the W it recommends before training match the
smallest W whose fine-tuned WAND student passes the claims' thresholds?

    python -m benchmarks.window_chooser                    # the chooser on the three committed teachers (about 1 min)
    python -m benchmarks.window_chooser --from-json benchmarks/results/window_chooser.json   # render again
    python -m benchmarks.window_chooser --teachers runs/teachers-strong --table benchmarks/results/ablation_table_strong.json \
        --output benchmarks/results/window_chooser_strong.json --block chooser-strong   # other teachers, their own table
    python -m benchmarks.window_chooser --teachers benchmarks/teachers/sinusoidal-continued3 --models indextts \
        --table benchmarks/results/ablation_table_sinusoidal.json --output benchmarks/results/window_chooser_sinusoidal.json \
        --block chooser-sinusoidal   # a folder with one family's teacher
    python -m benchmarks.window_chooser --probe --teachers benchmarks/teachers/strong --schedule hold \
        --table benchmarks/results/ablation_table_strong_1200.json --output benchmarks/results/window_chooser_probe.json \
        --block chooser-probe   # the fine-tune probe's W against the 1,200-step sweep (about 25 min on 2 cores)

For each family: ``pipeline.evals.window_choice.choose_window`` on its committed teacher (teachers/<model>)
and 32 of the teacher's training utterances (seed 0, as ``jobs/choose_window.py`` samples a corpus),
candidate W those of the sweep and 256; then, from benchmarks/results/ablation_table.json, the claims
(``pipeline.evals.claims``) of every WAND student of the window sweep (the paper's schedule, curriculum
4W -> W: ``wand_w8``, ``wand`` at 32, ``wand_w64``, ``wand_w128``; ``--schedule hold``: ``wand_hold_w8``,
``wand_hold``, ``wand_hold_w64``, ``wand_hold_w128``, the schedule that reaches W halfway and holds it). Writes
benchmarks/results/window_chooser.json and the side-by-side table into docs/results.md and the README.

``--probe``: also the fine-tune probe (``pipeline.evals.window_probe``: a 300-step full-attention control
and a 300-step WAND student per W of the sweep, the hold schedule, on the table's fine-tuning and held-out
rows); its table sets the probe's W and its far-KL gaps beside the table's verdicts and the same gap
measured on the table's own students (``kl_gaps``), into ``--block`` only.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

import wand
from pipeline.docblocks import has_block, replace_block
from pipeline.evals.ablation import AblationConfig, finetune_rows, FRESH_SEED, variant_named
from pipeline.evals.claims import claims
from pipeline.evals.common import FAMILIES, FAMILY_NAMES
from pipeline.evals.window_choice import DEFAULT_WINDOWS, MIN_AGREEMENT, choose_window
from pipeline.evals.window_probe import kl_gaps, MAX_KL_GAP, PROBE_STEPS, probe_windows
from pipeline.synthetic.law import synthetic_rows, SyntheticTask
from pipeline.synthetic.teachers import read_teacher_record, record_spec

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ("wand_w8", "wand", "wand_w64", "wand_w128")  # one recipe (curriculum 4W -> W), four W
# The same W with wand_hold's schedule: wand_hold at the headline's 32, wand_hold_w<N> elsewhere.
SWEEPS = {"paper": SWEEP, "hold": tuple("wand_hold" if v == "wand" else v.replace("wand_w", "wand_hold_w") for v in SWEEP)}
START, END = "<!-- chooser-table:start -->", "<!-- chooser-table:end -->"
PROBE_CONFIG = AblationConfig(length_groups=2)  # the stronger teachers' tables' recipe (300 / 1,200 steps)
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


def same_as_table(chosen: int | None, table_w: int | None, tried: int) -> str:
    """Whether a chooser's W (None: it found none) is the table's smallest passing W."""
    if table_w is not None:
        return "yes" if chosen == table_w else f"no (chooser {chosen or 'none'}, table {table_w})"
    if chosen is None or chosen > tried:
        return f"yes: none up to {tried} passes, the chooser asks for more"
    return f"no: the chooser's W = {chosen} fails in the table"


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
        same = same_as_table(c["window_target"], table_w, tried)
        lines.append(f"| {FAMILY_NAMES.get(model, model)} | {c['window_target']}, {100 * c['kv_saving_at_target']:.0f}% | "
                     f"{agree} | {cells} | {table_w or f'none up to {tried}'} | {same} |")
    return "\n".join(lines)


def probe_side_by_side(chooser: dict, verdicts: dict, gaps: dict, schedule: str = "hold") -> str:
    """The fine-tune probe's W (``pipeline.evals.window_probe``) beside the table's verdicts, with the
    window's far-KL cost against the control both as the probe measured it and on the table's students."""
    at = " / ".join(map(str, SWEEP_WINDOWS))
    steps = next(c["probe"]["steps"] for c in chooser.values() if "probe" in c)
    lines = [f"| family | probe: W (far-KL gap <= {MAX_KL_GAP}), KV saved | probe gap ({steps} steps) at {at} | "
             f"table students' gap at {at} | table: WAND student ({schedule} schedule) at W = {at} | "
             "table: smallest W that passes | agree |", "|---|---|---|---|---|---|---|"]
    for model in [m for m in FAMILIES if "probe" in chooser.get(m, {}) and m in verdicts]:
        c, by_w = chooser[model], verdicts[model]
        probe = c["probe"]
        probe_gap = dict(zip(probe["windows"], probe["gap"]))
        saving = dict(zip(probe["windows"], probe["kv_saving"])).get(probe["window_target"])
        chosen = "none" if probe["window_target"] is None else \
            f"{probe['window_target']}, " + ("n/a" if saving is None else f"{100 * saving:.0f}%")
        cell = lambda values, w: f"{values[w]:+.3f}" if w in values else "n/a"  # noqa: E731
        table_w = smallest_passing(by_w)
        lines.append(f"| {FAMILY_NAMES.get(model, model)} | {chosen} | "
                     f"{' / '.join(cell(probe_gap, w) for w in SWEEP_WINDOWS)} | "
                     f"{' / '.join(cell(gaps.get(model, {}), w) for w in SWEEP_WINDOWS)} | "
                     f"{' / '.join(verdict_cell(by_w.get(w)) for w in SWEEP_WINDOWS)} | "
                     f"{table_w or f'none up to {max(by_w)}'} | {same_as_table(probe['window_target'], table_w, max(by_w))} |")
    return "\n".join(lines)


def run_probe(teachers: Path, windows: list[int], steps: int, train_rows: int, heldout: int,
              models=FAMILIES) -> dict:
    """The fine-tune probe per family on the results table's rows (its fresh fine-tuning rows, its
    held-out rows) and recipe (``AblationConfig`` with 2 length groups, as the stronger teachers' table)."""
    out = {}
    for name in models:
        record = read_teacher_record(teachers / name)
        spec = record_spec(record)
        task = SyntheticTask(**record["task"])
        teacher = wand.enable_wand(spec.load(str(teachers / name)), PROBE_CONFIG.window)
        rows = finetune_rows(spec, train_rows, task, PROBE_CONFIG, seed=FRESH_SEED)
        held = synthetic_rows(spec, heldout, task, seed=record["heldout"]["seed"], split="heldout", alignment=True)
        choice = probe_windows(spec, teacher.eval(), rows, held, windows, PROBE_CONFIG, steps)
        out[name] = {**choice.to_json(), "train_rows": train_rows, "heldout": heldout}
        print(f"# {name}: probe W {choice.window_target}; gaps "
              f"{dict(zip(out[name]['windows'], (round(g, 4) for g in out[name]['gap'])))}", flush=True)
    return out


def run_chooser(teachers: Path, rows: int, windows: list[int], models=FAMILIES) -> dict:
    out = {}
    for name in models:
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
    parser.add_argument("--models", nargs="+", choices=FAMILIES, default=list(FAMILIES),
                        help="the families to choose for (a teachers folder may hold only some)")
    parser.add_argument("--rows", type=int, default=32, help="training utterances the chooser reads per family")
    parser.add_argument("--windows", type=int, nargs="+", default=[*SWEEP_WINDOWS, 256],
                        help="candidate W: the table's sweep and 256 (like for like; jobs.choose_window's default "
                             f"grid is finer: {', '.join(map(str, DEFAULT_WINDOWS))})")
    parser.add_argument("--table", type=Path, default=ROOT / "benchmarks/results/ablation_table.json",
                        help="the results table's file (benchmarks/ablation_table.py)")
    parser.add_argument("--schedule", choices=sorted(SWEEPS), default="paper",
                        help="the table's sweep to judge by: the paper's schedule or the one that holds W")
    parser.add_argument("--probe", action="store_true",
                        help="also run the fine-tune probe (pipeline/evals/window_probe.py) per family and render "
                             "its W beside the table instead of the bare mask's (into --block; about 25 min on 2 cores)")
    parser.add_argument("--probe-steps", type=int, default=PROBE_STEPS, help="optimizer steps per probe student")
    parser.add_argument("--train-rows", type=int, default=2048, help="the probe's fine-tuning rows (the table's)")
    parser.add_argument("--heldout", type=int, default=64, help="the probe's held-out rows (the table's)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/window_chooser.json")
    parser.add_argument("--from-json", type=Path, help="render an earlier --output again, no chooser run")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs/results.md")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--no-readme", action="store_true", help="print the table, leave the README and docs alone")
    parser.add_argument("--block", help="the table into --docs' <!-- BLOCK:start/end --> instead, README left alone")
    args = parser.parse_args(argv)
    if min(args.rows, args.probe_steps, args.train_rows, args.heldout) < 1:
        parser.error("--rows, --probe-steps, --train-rows and --heldout must be >= 1")
    if args.probe and not (args.block or args.no_readme):
        parser.error("--probe writes its table into --docs' --block BLOCK (the bare-mask blocks are left alone); "
                     "give --block or --no-readme")
    places = [(args.docs, f"<!-- {args.block}:start -->", f"<!-- {args.block}:end -->")] if args.block else \
        [(args.docs, START, END), (args.readme, START, END)]
    for path, start, end in [] if args.no_readme else places:  # checked before the chooser runs
        if not has_block(path, start, end):
            parser.error(f"{path} has no {start} ... {end} block to write the table into (or pass --no-readme)")
    missing = [] if args.from_json else [m for m in args.models if not (args.teachers / m / "teacher.json").exists()]
    if missing:  # before any family is read, with the way out
        parser.error(f"--teachers {args.teachers} has no teacher.json for {', '.join(missing)}: train it with "
                     "`python -m jobs.train_teachers`, or pass --models with the families the folder holds")
    if args.from_json:
        chooser = json.loads(args.from_json.read_text())
        if any("probe" in c for c in chooser.values()) and not (args.block or args.no_readme):
            parser.error(f"--from-json {args.from_json} holds a probe run: its table goes into --block BLOCK "
                         "(the bare-mask blocks are left alone); give --block or --no-readme")
    else:
        torch.set_num_threads(2)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # the probes' progress
        chooser = run_chooser(args.teachers, args.rows, args.windows, args.models)
        if args.probe:
            for name, probe in run_probe(args.teachers, list(SWEEP_WINDOWS), args.probe_steps, args.train_rows,
                                         args.heldout, args.models).items():
                chooser[name]["probe"] = probe
        args.output.write_text(json.dumps(chooser, indent=2) + "\n")
    results = json.loads(args.table.read_text())["results"]
    verdicts = table_verdicts(results, SWEEPS[args.schedule])
    if any("probe" in c for c in chooser.values()):  # the probe's table, set against the sweep it predicts
        table = probe_side_by_side(chooser, verdicts, kl_gaps(results, SWEEPS[args.schedule]), args.schedule)
    else:
        table = side_by_side(chooser, verdicts, args.schedule)
    print(table)
    for path, start, end in [] if args.no_readme else places:
        replace_block(path, start, end, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
