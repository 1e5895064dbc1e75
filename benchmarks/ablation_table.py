"""The results table: WAND against the full-attention control and its ablations on the embedded default's teachers.

    make ablation                                            # the three families side by side, then one table
    python -m benchmarks.ablation_table                      # all three in one process, writes docs/results.md and the README
    python -m benchmarks.ablation_table --models cosyvoice2 --variants teacher control wand --seeds 0 --no-readme   # a quick look
    python -m benchmarks.ablation_table --from-json runs/ablation/cosyvoice2.json runs/ablation/indextts.json runs/ablation/sparktts.json
    python -m benchmarks.ablation_table --teachers runs/teachers-strong --variants teacher control wand wand_hold \
        --long-rows 0 --output benchmarks/results/ablation_table_strong.json --block ablation-strong  # other teachers

For each family: load the teacher from teachers/<model> (jobs/train_teachers.py), fine-tune the
students (pipeline/evals/ablation.py: the full-attention control, WAND, window only, KD without
curriculum, fine-tuned sinks, WAND at W = 8; all from the teacher's weights, same fresh rows, steps,
batches and lr) and score every variant, with the training-free StreamingLLM-style cache and the
bare mask, on held-out synthetic rows (seed 1, never trained on). Columns: teacher-forced agreement
with the teacher and KL by distance from the prefix, accuracy against the corpus tokens, PER (with
substitutions / deletions / insertions), token-weighted speaker accuracy, stops and length ratio of
free-running decodes (pipeline/synthetic/transcribe.py), KV bytes after decoding the longest
held-out utterance and the per-step latency ratio of that decode; then the claims
(pipeline/evals/claims.py: paired bootstrap intervals against fixed thresholds). Writes
benchmarks/results/ablation_table.json (every row's figures), the table between docs/results.md's
ablation-table markers and the headline into the README. On 2 CPU cores with the families side by
side, a 300-step student takes about 2.5 minutes (IndexTTS 1.1) and scoring a variant 0.2-0.5: the
default variants (3 seeds) take about 60 minutes, with `make ablation`'s window sweep about 80.
Finished results are kept in a journal (``<output>.partial/<model>.jsonl``) until the table is written:
killed, the same command continues where it stopped, to the figures an uninterrupted run writes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline.docblocks import has_block, replace_block
from pipeline.evals.ablation import (AblationConfig, finetune_rows, FRESH_SEED, long_form_rows, run_ablation, variant_named,
                                     VARIANTS)
from pipeline.evals.cells import cell, grouped, kib
from pipeline.evals.claims import claim_cells, claims, interval, reading, THRESHOLDS
from pipeline.evals.common import FAMILIES, FAMILY_NAMES
from pipeline.evals.journal import Journal
from pipeline.evals.long_form import long_form_markdown
from pipeline.synthetic.law import synthetic_rows, SyntheticTask, TEXT_LENGTHS
from pipeline.synthetic.teachers import MINI_BACKBONE, read_teacher_record, record_spec
from wand.profiling import cpu_device

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- ablation-table:start -->", "<!-- ablation-table:end -->"


def teachers_text(teachers: dict | None) -> str:
    """The header's word on the teachers when any is not the committed mini one (``teachers``: the
    JSON's ``teachers``, per model its size and any backbone); empty otherwise."""
    other = {m: t["backbone"] for m, t in (teachers or {}).items() if t.get("backbone") not in (None, MINI_BACKBONE)}
    if not other:
        return ""
    return "Teachers of another backbone: " + ", ".join(
        f"{FAMILY_NAMES.get(m, m)} {b['width']} wide x {b['layers']} layers" for m, b in other.items()) + ". "


def seeds_text(results: list[dict]) -> str:
    """The header's word on seeds: the most any trained student has, and each student with fewer."""
    by_run: dict[tuple, set] = {}
    for r in results:
        if r.get("seed") is not None:
            by_run.setdefault((r["model"], r["variant"]), set()).add(r["seed"])
    seeds = sorted(set().union(*by_run.values()))
    fewer = [f"{m} {v}: {len(s)}" for (m, v), s in by_run.items() if len(s) < len(seeds)]
    return (f"each trained student with {len(seeds)} seed(s) ({', '.join(map(str, seeds))})"
            + (f", fewer where named ({', '.join(fewer)})" if fewer else ""))


def markdown(results: list[dict], config: AblationConfig, device: str, notes: dict | None = None,
             teachers: dict | None = None) -> str:
    free = results[0]["free_rows"]
    lines = [
        teachers_text(teachers) + f"Measured on {device}; W = {config.window} (curriculum {config.window_start} -> {config.window}) unless the "
        f"variant says otherwise, {config.steps} steps x {config.batch_size} rows per trained student"
        + (f" on texts of {config.finetune_text[0]}-{config.finetune_text[1]} phonemes"
           if config.finetune_text != TEXT_LENGTHS else "")
        + (f" (each batch in {config.length_groups} parts of neighbouring lengths)" if config.length_groups > 1 else "")
        + f", {config.sinks} sinks; "
        f"{seeds_text(results)}: the figures are their "
        "mean, ± their standard deviation where shown (training-free rows have one run). "
        "Agreement / KL: teacher-forced, against the teacher, by distance from the prefix "
        f"(near < {config.window} <= mid < {4 * config.window} <= far). Accuracy: against the corpus tokens "
        "(teacher-forced / free-running greedy). KV: cache after decoding the longest held-out utterance "
        "(float32). Latency: median step time, last 48 steps / steps 8-56 of that decode. "
        f"PER (sub / del / ins) / speaker / stops / length: {free} free-running greedy decodes until the stop id "
        "(at most twice the reference's length), transcribed exactly by the corpus law "
        "(pipeline/synthetic/transcribe.py): phoneme error rate against the text split into substitutions, "
        "deletions and insertions, fraction of tokens lawful for the utterance's speaker (weighted by tokens), "
        "fraction that emitted the stop id, median generated / reference length.",
        "",
        "| model | variant | W | agree near | agree mid | agree far | KL far | acc TF | acc free "
        "| PER | sub / del / ins | speaker | stops | length | KV | latency late/early |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for runs in grouped(results):
        r = runs[0]
        parts = " / ".join(cell(runs, key) for key in ("substitutions", "deletions", "insertions"))
        lines.append(
            f"| {r['model']} | {r['variant']} | {r.get('window') or 'all'} | {cell(runs, 'agreement_near')} | "
            f"{cell(runs, 'agreement_mid')} | {cell(runs, 'agreement_far', spread=True)} | "
            f"{cell(runs, 'kl_far', 3, spread=True)} | {cell(runs, 'teacher_forced_accuracy')} | "
            f"{cell(runs, 'free_running_accuracy')} | {cell(runs, 'per', spread=True)} | {parts} | "
            f"{cell(runs, 'speaker_accuracy_tokens')} | {cell(runs, 'stopped')} | {cell(runs, 'length_ratio_median')} | "
            f"{kib(r['kv_bytes_longest'])} | {cell(runs, 'latency_late_over_early')} |")
    lines.append("")
    ran = [variant_named(name) for name in dict.fromkeys(r["variant"] for r in results)]
    lines.append("Variants: " + "; ".join(f"`{v.name}`: {v.description}" for v in ran) + ".")
    lines += ["", claims_markdown(results)]
    lines += long_form_markdown(results, notes)
    return "\n".join(lines)


def wand_variants(results: list[dict]) -> list[str]:
    """The WAND students in ``results``, in table order: ``wand`` (the headline), ``wand_hold``, the sweep by W."""
    names = {r["variant"] for r in results if r["variant"] == "wand" or r["variant"].startswith("wand_")}
    return sorted(names, key=variant_order)


def variant_order(name: str) -> tuple[int, bool, int]:
    """Table order: ``VARIANTS``' order, then the window sweep by schedule (``wand_w<N>``, ``wand_hold_w<N>``), W."""
    names, variant = [v.name for v in VARIANTS], variant_named(name)
    return (names.index(name), False, 0) if name in names else (len(names), variant.hold > 0, variant.window)


def claims_markdown(results: list[dict]) -> str:
    """The claims table (pipeline/evals/claims.py) and its plain readings, for WAND and the W = 8 stress row."""
    t = THRESHOLDS
    lines = [f"**Claims** (thresholds fixed in `pipeline/evals/claims.py` before the run: WAND - control PER "
             f"<= {t.control_gap_per} at the upper {round(100 * t.level)}% bound, speaker >= {t.speaker}, stops >= "
             f"{t.stops}, length {t.length_ratio[0]}-{t.length_ratio[1]}). Paired per-row PER differences (the same "
             f"held-out rows; a trained variant's row is the mean over its seeds), mean [{round(100 * t.level)}% "
             f"bootstrap interval over rows]:", "",
             "| model | variant | W | WAND - control PER | WAND - teacher PER | speaker | stops | length | passes |",
             "|---|---|---|---|---|---|---|---|---|"]
    readings = []
    for variant in wand_variants(results):
        for model, c in claims(results, variant=variant).items():
            lines.append(f"| {model} | {variant} | {c['window']} | {claim_cells(c)} |")
            readings.append(f"- {reading(f'{model} ({variant})', c)}")
    return "\n".join(lines + [""] + readings)


HEADLINE_START, HEADLINE_END = "<!-- headline-table:start -->", "<!-- headline-table:end -->"
HEADLINE_RECIPES = {"wand": "paper's schedule", "wand_hold": "schedule + hold"}


def headline(results: list[dict]) -> str:
    """The README's one table: per family, the teacher, the full-attention fine-tune control and the
    WAND students at the headline W (the paper's curriculum, and with the hold where it ran; means over
    seeds) on what WAND claims, then the claims' plain readings."""
    runs = {(r[0]["model"], r[0]["variant"]): r for r in grouped(results)}
    lines = ["| family | WAND recipe | KV cache, longest utterance (teacher -> WAND) | PER teacher / control / WAND | "
             "WAND - control PER [95% CI] | speaker | stops | step time late / early | passes |",
             "|---|---|---|---|---|---|---|---|---|"]
    readings = []
    found = {variant: claims(results, variant=variant) for variant in HEADLINE_RECIPES}
    for model in FAMILIES:
        for variant, recipe in HEADLINE_RECIPES.items():
            if model not in found[variant]:
                continue
            c, gap = found[variant][model], found[variant][model]["minus_control"]
            teacher, control, student = runs[(model, "teacher")], runs[(model, "control")], runs[(model, variant)]
            lines.append(f"| {FAMILY_NAMES.get(model, model)} (W = {c['window']}) | {recipe} | "
                         f"{kib(teacher[0]['kv_bytes_longest'])} -> {kib(student[0]['kv_bytes_longest'])} | "
                         f"{cell(teacher, 'per')} / {cell(control, 'per')} / {cell(student, 'per')} | "
                         f"{interval(gap)} | "
                         f"{c['speaker_accuracy_tokens']:.3f} | {c['stopped']:.2f} | "
                         f"{cell(student, 'latency_late_over_early')} | {'yes' if c['passed'] else 'no'} |")
            readings.append(f"- {reading(FAMILY_NAMES.get(model, model) + ' (' + recipe + ')', c)}")
    if not readings:  # no family ran a headline recipe (a table of the window sweep only, say): no headline
        return ""
    return "\n".join(lines + [""] + readings)


def merged(saved: list[dict]) -> dict:
    """Several --output files as one (one family each, run side by side; or more variants of a family run
    later): results in family order, then table order; minutes summed per family."""
    if len(saved) == 1:
        return saved[0]
    if len({s["device"] for s in saved}) > 1:
        raise SystemExit("the files were measured on different devices: " + ", ".join(s["device"] for s in saved))
    results = [r for s in saved for r in s["results"]]
    configs = [r.get("config", {}) for r in results]  # one header describes them all: other recipes, other tables
    differ = sorted({k for c in configs for k in {*c, *configs[0]} if k != "seed" and c.get(k) != configs[0].get(k)})
    if differ:
        raise SystemExit(f"the files' students were trained with different settings ({', '.join(differ)}): "
                         "render them as separate tables")
    seen = [(r["model"], r["variant"], r["seed"]) for r in results]
    twice = sorted({key for key in seen if seen.count(key) > 1}, key=str)
    if twice:
        raise SystemExit(f"the files hold the same (model, variant, seed) more than once: {twice}")
    minutes: dict = {}
    for s in saved:
        for k, v in s["minutes"].items():
            minutes[k] = round(minutes.get(k, 0) + v, 1)
    results.sort(key=lambda r: (FAMILIES.index(r["model"]), variant_order(r["variant"])))  # stable: seeds stay in order
    resumed = {k: v for s in saved for k, v in s.get("resumed", {}).items()}
    return {"device": saved[0]["device"], "minutes": {k: minutes[k] for k in FAMILIES if k in minutes},
            "teachers": {k: v for s in saved for k, v in s["teachers"].items()},
            "long_form_notes": {k: v for s in saved for k, v in s.get("long_form_notes", {}).items()},
            **({"resumed": resumed} if resumed else {}),
            "results": results}


def journal_folder(output: Path) -> Path:
    """Where a run writing ``output`` keeps its families' journals (pipeline.evals.journal) until it is done."""
    return output.with_name(output.name + ".partial")


def blocks(docs: Path, readme: Path, block: str | None) -> list[tuple[Path, str, str]]:
    """Where the tables go: the full one into the results page, its headline into the README; with ``block``
    (a second table, on other teachers, say) into the blocks ``block`` and ``block-headline`` instead."""
    return [(docs, f"<!-- {block}:start -->", f"<!-- {block}:end -->"), (readme, f"<!-- {block}-headline:start -->",
             f"<!-- {block}-headline:end -->")] if block else [(docs, START, END), (readme, HEADLINE_START, HEADLINE_END)]


def write_tables(docs: Path, readme: Path, table: str, results: list[dict], block: str | None = None) -> None:
    for (path, start, end), text in zip(blocks(docs, readme, block), (table, headline(results))):
        if text:  # the headline of a table with no headline recipe is nothing: its block need not exist
            replace_block(path, start, end, text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--teachers", type=Path, default=ROOT / "teachers", help="folder of teachers/<model>")
    parser.add_argument("--window", type=int, default=AblationConfig.window)
    parser.add_argument("--window-start", type=int, default=AblationConfig.window_start)
    parser.add_argument("--steps", type=int, default=AblationConfig.steps, help="optimizer steps per trained student")
    parser.add_argument("--batch-size", type=int, default=AblationConfig.batch_size)
    parser.add_argument("--lr", type=float, default=AblationConfig.lr)
    parser.add_argument("--length-groups", type=int, default=AblationConfig.length_groups,
                        help="run each batch in this many parts of neighbouring lengths (the same gradient up to "
                             "rounding, less padding: 2 is 1.0-1.25x faster per step on a CPU; default 1, the "
                             "single padded batch the committed table was measured with)")
    parser.add_argument("--finetune-text", type=int, nargs=2, metavar=("MIN", "MAX"),
                        default=AblationConfig.finetune_text,
                        help="the fine-tuning texts' lengths in phonemes (default: the corpus's, %(default)s); "
                             "a long-form table fine-tunes on the lengths its teacher was trained to")
    parser.add_argument("--train-rows", type=int, default=2048,
                        help=f"fine-tuning utterances (seed {FRESH_SEED}: fresh, not the teachers' own)")
    parser.add_argument("--heldout", type=int, default=64, help="held-out utterances (seed 1) scored teacher-forced")
    parser.add_argument("--free-rows", type=int, default=64, help="held-out utterances decoded free-running")
    parser.add_argument("--variants", nargs="+", default=[v.name for v in VARIANTS],
                        help=f"the table's rows (default: all): {', '.join(v.name for v in VARIANTS)}; "
                             "wand_w<N>: WAND at W = N (the window sweep)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds of each trained student (its batches): the table shows mean ± sd")
    parser.add_argument("--long-rows", type=int, default=4,
                        help="long-form held-out utterances (texts 1.5-2x the longest training text); 0: none")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/ablation_table.json")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--no-readme", action="store_true", help="print the table, leave the README and docs alone")
    parser.add_argument("--block", help="the table into --docs' <!-- BLOCK:start/end --> and its headline into "
                                        "--readme's <!-- BLOCK-headline:start/end --> instead")
    parser.add_argument("--from-json", type=Path, nargs="+",
                        help="render earlier --output files again (one per family, say), no training")
    args = parser.parse_args(argv)
    saved = merged([json.loads(path.read_text()) for path in args.from_json]) if args.from_json else None
    # A headline only where a headline recipe runs (or ran: --from-json); a sweep-only table has none.
    with_headline = ({r["variant"] for r in saved["results"]} if saved else set(args.variants)) & set(HEADLINE_RECIPES)
    if not args.no_readme:  # checked before a run of an hour, not after
        for path, start, end in blocks(args.docs, args.readme, args.block)[:2 if with_headline else 1]:
            if not has_block(path, start, end):
                parser.error(f"{path} has no {start} ... {end} block to write the table into (or pass --no-readme)")
    if saved:
        table = markdown(saved["results"], AblationConfig(**saved["results"][0]["config"]), saved["device"],
                         saved.get("long_form_notes"), saved.get("teachers"))
        print(table)
        if len(args.from_json) > 1:  # the families' files as one
            args.output.write_text(json.dumps(saved, indent=2) + "\n")
        if not args.no_readme:
            write_tables(args.docs, args.readme, table, saved["results"], args.block)
        return 0
    if min(args.train_rows, args.heldout, args.free_rows) < 1 or args.long_rows < 0:
        parser.error("--train-rows, --heldout and --free-rows must be >= 1, --long-rows >= 0")
    try:
        config = AblationConfig(window=args.window, window_start=args.window_start, steps=args.steps,
                                batch_size=args.batch_size, lr=args.lr, length_groups=args.length_groups,
                                finetune_text=tuple(args.finetune_text))
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    device = f"{cpu_device(torch.get_num_threads())}, torch {torch.__version__}"
    results, teachers, notes, minutes = [], {}, {}, {}
    try:
        variants = sorted({name: variant_named(name) for name in args.variants}.values(),
                          key=lambda v: variant_order(v.name))
    except ValueError as e:
        parser.error(f"--variants: {e}")
    records = {name: read_teacher_record(args.teachers / name) for name in args.models}
    # Each finished result is kept in a journal beside --output until the table is written: the same
    # command after a kill continues from there. One of another run (teacher, settings) is refused here,
    # before anything trains.
    journals = {}
    for name, record in records.items():
        context = {"model": name, "teacher_files": record["files"], "config": asdict(config),
                   "train_rows": args.train_rows, "heldout": args.heldout, "free_rows": args.free_rows,
                   "long_rows": args.long_rows, "threads": torch.get_num_threads(), "torch": torch.__version__}
        try:
            journals[name] = Journal(journal_folder(args.output) / f"{name}.jsonl", context)
        except ValueError as e:
            parser.error(f"--output {args.output}: {e}")
    resumed = {name: len(journal.results) for name, journal in journals.items() if journal.results}
    earlier = {name: sum(r["train_seconds"] + r["score_seconds"] for r in journal.results.values())
               for name, journal in journals.items()}  # what the results taken from a journal took when measured
    start = time.perf_counter()
    for name in args.models:
        directory = args.teachers / name
        record = records[name]
        spec = record_spec(record)
        task = SyntheticTask(**record["task"])
        teacher = spec.load(str(directory))
        train_rows = finetune_rows(spec, args.train_rows, task, config, seed=FRESH_SEED)
        heldout = synthetic_rows(spec, args.heldout, task, seed=record["heldout"]["seed"], split="heldout",
                                 alignment=True)  # with their text and speaker, for the transcriber
        teachers[name] = {"size": record["size"], **({"backbone": record["backbone"]} if record.get("backbone") else {}),
                          "heldout_accuracy": record["heldout"]["accuracy"]}
        long_form = None
        if args.long_rows:
            long_form, note = long_form_rows(spec, task, args.long_rows, record["heldout"]["seed"])
            if note:
                notes[name] = note
        family_start = time.perf_counter()
        results += run_ablation(spec, teacher, train_rows, heldout, config, variants=variants,
                                free_rows=args.free_rows, task=task, seeds=tuple(args.seeds), long_form=long_form,
                                journal=journals[name])
        minutes[name] = round((time.perf_counter() - family_start + earlier[name]) / 60, 1)
        print(f"{name}: done in {minutes[name]} min ({(time.perf_counter() - start) / 60:.1f} min so far)", flush=True)
    table = markdown(results, config, device, notes, teachers)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    # minutes: this process's, plus the seconds results taken from a journal took; "resumed" says how many were.
    args.output.write_text(json.dumps({"device": device, "minutes": minutes, "teachers": teachers,
                                       "long_form_notes": notes, **({"resumed": resumed} if resumed else {}),
                                       "results": results}, indent=2) + "\n")
    for journal in journals.values():
        journal.remove()
    if journal_folder(args.output).is_dir() and not any(journal_folder(args.output).iterdir()):
        journal_folder(args.output).rmdir()
    print(table)
    if not args.no_readme:
        write_tables(args.docs, args.readme, table, results, args.block)
        print(f"wrote {args.output}, the table in {args.docs} and its headline in {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
