"""What running each batch in parts of neighbouring lengths saves on a CPU (``--length-groups``).

    python -m benchmarks.length_groups                  # the three committed teachers, about 5 minutes on 2 cores
    python -m benchmarks.length_groups --steps 10 --models sparktts --output /tmp/groups.json --no-docs

For each family, the results table's student (``pipeline.evals.ablation.train_student``, the ``wand``
variant: soft-mask curriculum, CE + KD from the committed teacher's top-16) and the teacher trainer
(``pipeline.synthetic.teachers.train_teacher`` on the corpus's lengths, the last phase of its
curriculum) each run ``--steps`` steps with the batch as one padded batch (1) and in two parts of
neighbouring lengths (2), alternately, one thread: seconds per step, their ratio, and how far apart
the two students' weights end (the gradient is the same up to rounding, so they should stay close).
Writes benchmarks/results/length_groups.json and its table into docs/benchmarks.md (``--no-docs``: not).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

import wand
from wand.profiling import cpu_device
from pipeline.docblocks import has_block, write_result
from pipeline.evals.common import FAMILIES
from pipeline.evals.ablation import AblationConfig, teacher_targets, train_student, variant_named
from pipeline.synthetic.law import synthetic_rows, SyntheticTask
from pipeline.synthetic.teachers import CURRICULUM, read_teacher_record, record_spec, train_teacher

ROOT = Path(__file__).resolve().parents[1]
GROUPS = (1, 2)
START, END = "<!-- length-groups:start -->", "<!-- length-groups:end -->"


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def measure(name: str, steps: int, repeats: int) -> dict:
    """Seconds per step of a student and of the teacher loop for each entry of GROUPS (the best of
    ``repeats`` alternating runs, so a busy neighbour slows both alike), and the students' distance."""
    directory = ROOT / "teachers" / name
    record = read_teacher_record(directory)
    spec = record_spec(record)
    task = SyntheticTask(**record["task"])
    teacher = wand.enable_wand(spec.load(str(directory)), AblationConfig.window).eval()  # as run_ablation does
    rows = teacher_targets(spec, teacher, synthetic_rows(spec, 256, task, seed=2, split="finetune"), AblationConfig.k)
    last = CURRICULUM[-1]
    teacher_rows = synthetic_rows(spec, 256, task, seed=0, min_text=last.min_text, max_text=last.max_text)
    student = {g: [] for g in GROUPS}
    loop = {g: [] for g in GROUPS}
    weights = {}
    for _ in range(repeats):
        for groups in GROUPS:
            config = AblationConfig(steps=steps, length_groups=groups)
            start = time.perf_counter()
            weights[groups] = flat(train_student(spec, teacher, rows, variant_named("wand"), config))
            student[groups].append((time.perf_counter() - start) / steps)
            start = time.perf_counter()
            train_teacher(spec, [(teacher_rows, steps, last.batch_size)], log_every=0, length_groups=groups)
            loop[groups].append((time.perf_counter() - start) / steps)
    best = lambda times: round(min(times), 4)  # noqa: E731
    return {"model": name, "steps": steps, "repeats": repeats,
            "student_seconds_per_step": {str(g): best(student[g]) for g in GROUPS},
            "teacher_loop_seconds_per_step": {str(g): best(loop[g]) for g in GROUPS},
            "student_speedup": round(best(student[1]) / best(student[2]), 2),
            "teacher_loop_speedup": round(best(loop[1]) / best(loop[2]), 2),
            "student_weights_max_abs_difference": float((weights[1] - weights[2]).abs().max()),
            "config": {k: v for k, v in dataclasses.asdict(AblationConfig(steps=steps)).items() if k != "length_groups"}}


def table(saved: dict) -> str:
    """The docs' table of a length_groups.json."""
    lines = [f"Measured on {saved['device']}, {saved['results'][0]['steps']} steps per run, the best of "
             f"{saved['results'][0]['repeats']} alternating runs.", "",
             "| family | student s/step: 1 part / 2 parts | speed-up | teacher loop s/step: 1 / 2 | speed-up | "
             "students' weights apart (max abs) |", "|---|---|---|---|---|---|"]
    for r in saved["results"]:
        s, t = r["student_seconds_per_step"], r["teacher_loop_seconds_per_step"]
        lines.append(f"| {r['model']} | {s['1']:.3f} / {s['2']:.3f} | {r['student_speedup']:.2f}x | "
                     f"{t['1']:.3f} / {t['2']:.3f} | {r['teacher_loop_speedup']:.2f}x | "
                     f"{r['student_weights_max_abs_difference']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--steps", type=int, default=30, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per setting (the best is kept)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/length_groups.json")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-docs", action="store_true", help="write the JSON only, leave the docs alone")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be >= 1")
    if not args.no_docs and not has_block(args.docs, START, END):
        parser.error(f"--docs {args.docs}: needs the markers {START} {END} (or --no-docs)")
    torch.set_num_threads(1)
    results = []
    for name in args.models:
        results.append(measure(name, args.steps, args.repeats))
        r = results[-1]
        print(f"{name}: student {r['student_seconds_per_step']} s/step ({r['student_speedup']}x), teacher loop "
              f"{r['teacher_loop_seconds_per_step']} s/step ({r['teacher_loop_speedup']}x), students' weights "
              f"within {r['student_weights_max_abs_difference']:.1e}", flush=True)
    saved = {"device": f"{cpu_device(1)}, torch {torch.__version__}", "results": results}
    write_result(args.output, saved, table(saved), None if args.no_docs else args.docs, START, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
