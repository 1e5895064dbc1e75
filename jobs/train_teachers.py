"""Train the embedded default's teachers: one full-attention model per family on the synthetic corpus.

    python -m jobs.train_teachers                                  # all three, into teachers/
    python -m jobs.train_teachers --models cosyvoice2 --phases 200:4:12:16 --output /tmp/teachers
    python -m jobs.train_teachers --table docs/results.md --longer benchmarks/results/teacher_longer_*.json \
        --wider benchmarks/results/teacher_wider_*.json --curriculum benchmarks/results/teacher_curriculum_*.json
    python -m jobs.train_teachers --models sparktts --width 128 --layers 4 --output runs/teachers-wide
    python -m jobs.train_teachers --recipe benchmarks/results/teacher_longer_wider_sparktts.json --output runs/teachers-strong
    python -m jobs.train_teachers --models sparktts --init-from runs/teachers-strong --phases 1200:40:240:8 \
        --lr 1e-3 --long-rows 16 --output runs/teachers-long   # continue a trained teacher on longer texts

Each teacher is the family's ``mini`` preset (the tiny token layout on a 3-layer, 96-wide backbone)
trained from seeded random weights with cross-entropy on the generated tokens of synthetic rows
(pipeline/synthetic/law.py, train seed 0) on a length curriculum (short texts first: that is where the
text alignment is learned; pipeline.synthetic.teachers.CURRICULUM), then scored on held-out rows (seed 1). It is written in the
family's release format, so ``teacher_source: teachers/<model>`` loads it like a real checkpoint:
CosyVoice 2 ``llm.pt``, IndexTTS ``gpt.pth``, SparkTTS a transformers folder (safetensors). Next to
it, ``teacher.json`` records the recipe and the measured held-out quality that tests check.
Deterministic for the seeds on one machine (CPU float32). With a GPU present (``--device auto``,
the default) the loop trains there, for example with a longer last phase (``--phases``); the teacher
is then moved to the CPU, saved and scored there, so what is committed loads and passes on a CPU
(teacher.json records the training device). ``--width/--layers/--heads`` train the same vocabularies
on another backbone (a capacity experiment; teacher.json records it as ``backbone`` and ``--rescore``
rebuilds it). ``--init-from FOLDER`` continues the teachers in FOLDER/<model> (their weights and backbone)
on ``--phases`` instead of starting from random weights; teacher.json records the source's files and
recipe under ``train.init_from``, and ``--recipe`` of such a record needs that source again (checked by
sha256). One process trains the families one after
the other; `make teachers` runs the three side by side (30-41 minutes each on 2 cores, measured) and
renders docs/results.md's teacher table from their teacher.json (--table).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch

from pipeline.docblocks import replace_block
from pipeline.evals.ablation import long_form_rows
from pipeline.evals.common import FAMILIES
from pipeline.synthetic.law import synthetic_rows, SyntheticTask
from pipeline.synthetic.teachers import (CURRICULUM, file_sha256, heldout_quality, MINI_BACKBONE, Phase, read_teacher_record,
                                         learned_position_tables, POSITION_INITS, Resume, SIZE, spoken_quality,
                                         teacher_spec, train_teacher)
from pipeline.synthetic.teacher_tables import (committed_block, CURRICULUM_END, CURRICULUM_START, curriculum_block,
                                               long_block, long_markers, LONGER_END, LONGER_START, longer_block,
                                               POSITIONS_END, POSITIONS_START, positions_block, TABLE_END, TABLE_START,
                                               WIDER_END, WIDER_START, wider_block)
from wand.models import CausalLMSpec
from wand.profiling import cpu_device

TRAIN_SEED, HELDOUT_SEED = 0, 1
SPOKEN_ROWS = 64  # held-out rows decoded free-running for the PER (issue 26: at least 64)
CURVE_ROWS = 32  # held-out rows scored teacher-forced for the learning curve
# What upstream trains with, where our mini teachers differ (teacher.json says it next to the recipe).
UPSTREAM_DROPOUT = {"indextts": "upstream IndexTTS trains its GPT-2 with GPT2Config's default dropout 0.1 "
                                "(embeddings, residuals, attention); these teachers and their students use 0, "
                                "as upstream inference does",
                    "cosyvoice2": "Qwen2 backbone: attention dropout 0 upstream and here",
                    "sparktts": "Qwen2 backbone: attention dropout 0 upstream and here"}


def phase(text: str) -> Phase:
    """``STEPS:MIN:MAX:BATCH`` -> Phase (argparse type)."""
    try:
        steps, low, high, batch = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected STEPS:MIN:MAX:BATCH, e.g. 3000:4:12:32") from None
    if min(steps, low, batch) < 1 or high < low:
        raise argparse.ArgumentTypeError(f"{text!r}: need STEPS, MIN, BATCH >= 1 and MAX >= MIN")
    return Phase(steps, low, high, batch)


# What --recipe takes from a teacher.json record: flag -> (argparse dest, value from the record).
RECIPE_FLAGS = {
    "--models": ("models", lambda r: [r["model"]]),
    "--phases": ("phases", lambda r: [Phase(**p) for p in r["train"]["phases"]]),
    "--lr": ("lr", lambda r: r["train"]["lr"]),
    "--rows": ("rows", lambda r: r["train"]["rows_per_phase"]),
    "--seed": ("seed", lambda r: r["train"]["init_seed"]),
    "--length-groups": ("length_groups", lambda r: r["train"].get("length_groups", 1)),
    **{f"--{k}": (k, lambda r, k=k: (r.get("backbone") or MINI_BACKBONE)[k]) for k in ("width", "layers", "heads")},
    "--init-from": ("init_from", lambda r: Path(r["train"]["init_from"]["folder"]) if "init_from" in r["train"] else None),
    "--position-init": ("position_init", lambda r: r["train"].get("position_init", "random")),
}


REPO = Path(__file__).resolve().parents[1]


def repo_relative(path: Path) -> str:
    """A path inside this repository as the repository names it (records are read from any checkout)."""
    absolute = path.resolve()
    return str(absolute.relative_to(REPO)) if absolute.is_relative_to(REPO) else str(path)


def recipe_of(record: dict) -> dict:
    """The training flags (argparse dests) of the run a teacher.json record describes; ValueError where
    the record is of another corpus or preset than this job trains."""
    if record.get("size") != SIZE or record.get("task") != dataclasses.asdict(SyntheticTask()):
        raise ValueError(f"it was trained on another preset or corpus (size {record.get('size')!r}, task "
                         f"{record.get('task')}) than this job's ({SIZE!r}, {dataclasses.asdict(SyntheticTask())})")
    if record.get("model") not in FAMILIES:
        raise ValueError(f"model {record.get('model')!r} is none of {', '.join(FAMILIES)}")
    return {dest: value(record) for dest, value in RECIPE_FLAGS.values()}


def source_record(directory: Path, backbone: dict, reproduce: dict | None, parser) -> dict:
    """The teacher.json of an --init-from source (its files checked): of this job's preset and corpus,
    of the backbone the flags ask for where they ask for another than the mini one, and, with --recipe,
    the very teacher the record started from."""
    try:
        source = read_teacher_record(directory)
        recipe_of(source)
    except (OSError, ValueError, KeyError, TypeError) as err:
        parser.error(f"--init-from: {directory} holds no teacher this job can continue ({type(err).__name__}: {err})")
    if backbone != MINI_BACKBONE and backbone != (source.get("backbone") or MINI_BACKBONE):
        parser.error(f"--init-from: {directory} is a {source.get('backbone') or MINI_BACKBONE} teacher; "
                     f"leave out --width/--layers/--heads (a continuation keeps its source's backbone)")
    started = (reproduce or {}).get("train", {}).get("init_from")
    if started and started.get("files") != source["files"]:
        parser.error(f"--recipe: {directory} holds other weights than the teacher the record started from "
                     f"(sha256 of {', '.join(source['files'])}); put that teacher there")
    return source


def save_teacher(spec, model, directory: Path) -> list[Path]:
    """The model in its family's release format under ``directory``; the files written."""
    if isinstance(spec, CausalLMSpec):  # a transformers folder: config.json + model.safetensors
        spec.save(model, directory)
        return sorted(p for p in directory.iterdir() if p.suffix in (".json", ".safetensors") and p.name != "teacher.json")
    return [spec.save_state_dict(model, directory)]  # CosyVoice 2 llm.pt, IndexTTS gpt.pth


def training_device(name: str) -> torch.device:
    """``--device``: auto -> cuda when torch sees a GPU, else cpu; a named cuda device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name!r}: the teachers train on cpu or cuda")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"{name!r}: torch sees {torch.cuda.device_count()} CUDA device(s) "
                         f"(torch {torch.__version__}); use --device cpu")
    return device


def device_name(device: torch.device) -> str:
    """The training device as teacher.json records it: "CPU (x86_64, AMD EPYC)" or the GPU's name."""
    if device.type == "cuda":
        return f"CUDA ({torch.cuda.get_device_name(device)})"
    return cpu_device()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--phases", nargs="+", type=phase, default=list(CURRICULUM), metavar="STEPS:MIN:MAX:BATCH",
                        help="the length curriculum: STEPS batches of BATCH utterances with MIN..MAX-phoneme texts, "
                             "phase after phase (default: " + " ".join(f"{p.steps}:{p.min_text}:{p.max_text}:{p.batch_size}"
                                                                        for p in CURRICULUM) + ")")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--width", type=int, default=MINI_BACKBONE["width"],
                        help="backbone width (default: the mini preset's 96; another value is a capacity "
                             "experiment, recorded in teacher.json's backbone)")
    parser.add_argument("--layers", type=int, default=MINI_BACKBONE["layers"], help="backbone layers (default 3)")
    parser.add_argument("--heads", type=int, default=MINI_BACKBONE["heads"],
                        help="attention heads (default 4; even for the Qwen2 families)")
    parser.add_argument("--rows", type=int, default=4096, help="training utterances per phase (seed 0)")
    parser.add_argument("--heldout", type=int, default=64, help="held-out utterances (seed 1) for the stated quality")
    parser.add_argument("--long-rows", type=int, default=0,
                        help="long-form held-out utterances (the results table's, texts 1.5-2x the longest "
                             "fine-tuning text) decoded free-running at every learning-curve point and at the end: "
                             "teacher.json's long_form and the curve's long_per (default 0: none)")
    parser.add_argument("--seed", type=int, default=0, help="weight init and batch order")
    parser.add_argument("--curve-every", type=int, default=500, help="steps between learning-curve points")
    parser.add_argument("--checkpoint-every", type=int, default=250,
                        help="steps between checkpoints (OUTPUT/MODEL/resume.pt, removed once teacher.json is "
                             "written): a killed or crashed run continues from its last one when the same "
                             "command runs again, to the same weights")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: run families side by side)")
    parser.add_argument("--length-groups", type=int, default=1,
                        help="run each batch in this many parts of neighbouring lengths (the same gradient up to "
                             "rounding, less padding: 1.0-1.25x faster per step on a CPU, most where lengths vary "
                             "most; default 1, the single padded batch the committed teachers were trained with)")
    parser.add_argument("--device", default="auto", help="where to train: auto (cuda when a GPU is present, else cpu), "
                                                          "cpu, cuda or cuda:N; the teachers are saved and scored on the CPU")
    parser.add_argument("--output", type=Path, default=Path("teachers"))
    parser.add_argument("--rescore", action="store_true", help="score the teachers already in --output again, no training")
    parser.add_argument("--table", type=Path, metavar="DOC",
                        help="only render the teachers' table from --output's teacher.json files into DOC "
                             "(between its teacher-table markers), no training")
    parser.add_argument("--longer", type=Path, nargs="+", metavar="RECORD",
                        help="with --table: also render longer-trained teachers' teacher.json beside the committed "
                             "ones of their families (between DOC's teacher-longer markers)")
    parser.add_argument("--wider", type=Path, nargs="+", metavar="RECORD",
                        help="with --table: also render teachers trained on another backbone (their teacher.json) "
                             "beside the committed ones of their families (between DOC's teacher-wider markers)")
    parser.add_argument("--curriculum", type=Path, nargs="+", metavar="RECORD",
                        help="with --table: also render teachers trained on another length curriculum (their "
                             "teacher.json) beside the committed ones (between DOC's teacher-curriculum markers)")
    parser.add_argument("--positions", type=Path, nargs="+", metavar="RECORD",
                        help="with --table: also render runs of another --position-init and the same recipes' random-init "
                             "runs (teacher.json records, in the order given) between DOC's teacher-positions markers")
    parser.add_argument("--continued", type=Path, nargs="+", metavar="RECORD",
                        help="with --table: also render teachers continued on longer texts and their sources "
                             "(teacher.json records, in order) between DOC's --long-block markers")
    parser.add_argument("--long-block", default="teacher-long", metavar="NAME",
                        help="the markers --continued renders between (default teacher-long; another chain of "
                             "continuations gets a block of its own)")
    parser.add_argument("--init-from", type=Path, metavar="FOLDER",
                        help="continue the teachers in FOLDER/<model> (their weights and backbone) on --phases "
                             "instead of training from random weights, e.g. a last phase of longer texts")
    parser.add_argument("--position-init", choices=POSITION_INITS, default="random",
                        help="IndexTTS's learned text and mel position tables at init: random (the backbone's own, the "
                             "committed teachers') or sinusoidal (scaled sinusoids, still trained); in teacher.json")
    parser.add_argument("--recipe", type=Path, metavar="RECORD",
                        help="train the teacher a teacher.json record describes (its family, backbone, phases, lr, "
                             "rows, seed, length groups, the teacher it continued; not with those flags, but "
                             "--init-from may say where that teacher lies now) and say whether the weights are the "
                             "record's to the bit (sha256)")
    args = parser.parse_args(argv)
    reproduce = None
    if args.recipe:
        try:
            reproduce = json.loads(args.recipe.read_text())
            recipe = recipe_of(reproduce)
        except (OSError, ValueError, KeyError, TypeError) as err:
            parser.error(f"--recipe {args.recipe}: not a teacher.json record this job can train ({type(err).__name__}: {err})")
        # The source of a continuation may lie elsewhere than the record says (--init-from): it is
        # checked by its files' sha256, not by its folder.
        given = [flag for flag, (dest, _) in RECIPE_FLAGS.items()
                 if getattr(args, dest) != parser.get_default(dest) and flag != "--init-from"]
        if given or args.rescore or args.table:
            parser.error(f"--recipe {args.recipe} sets the recipe: leave out {', '.join(given or ['--rescore/--table'])}")
        vars(args).update({**recipe, **({"init_from": args.init_from} if args.init_from else {})})
        if args.init_from and "init_from" not in reproduce["train"]:
            parser.error(f"--init-from: {args.recipe} was trained from random weights, not continued")
    if min(args.rows, args.heldout, args.curve_every, args.length_groups, args.checkpoint_every) < 1:
        parser.error("--rows, --heldout, --curve-every, --length-groups and --checkpoint-every must be >= 1")
    if args.long_rows < 0:
        parser.error("--long-rows must be >= 0")
    backbone = {"width": args.width, "layers": args.layers, "heads": args.heads}
    sources = {}  # --init-from: each family's source teacher record, read and checked before anything trains
    if args.init_from:
        if args.rescore:
            parser.error("--init-from trains; --rescore only scores the teachers already in --output")
        for name in args.models:
            sources[name] = source_record(args.init_from / name, backbone, reproduce, parser)
    backbones = {name: (sources[name].get("backbone") or MINI_BACKBONE) if name in sources else backbone
                 for name in args.models}
    for name in args.models:  # every family's backbone checked before anything trains
        try:
            built = teacher_spec(name, backbones[name])
        except ValueError as err:
            parser.error(f"--width/--layers/--heads for {name}: {err}")
        if args.position_init != "random" and (args.init_from or not learned_position_tables(built.build())):
            parser.error(f"--position-init {args.position_init}: " + ("a continuation (--init-from) keeps its source's "
                         "positions" if args.init_from else f"{name} has no learned position tables (rotary positions)"))
    for flag, value in (("--longer", args.longer), ("--wider", args.wider), ("--curriculum", args.curriculum),
                        ("--positions", args.positions), ("--continued", args.continued)):
        if value and not args.table:
            parser.error(f"{flag} goes with --table (it renders into the same document)")
    if args.long_block != "teacher-long" and not args.continued:
        parser.error("--long-block names the block --continued renders; give --continued RECORD ... too")
    if args.table:
        # Everything read and checked before the document is touched: it is written whole or not at all.
        text = args.table.read_text() if args.table.is_file() else ""
        markers = ([TABLE_START, TABLE_END] + ([LONGER_START, LONGER_END] if args.longer else [])
                   + ([WIDER_START, WIDER_END] if args.wider else [])
                   + ([CURRICULUM_START, CURRICULUM_END] if args.curriculum else [])
                   + ([POSITIONS_START, POSITIONS_END] if args.positions else [])
                   + (list(long_markers(args.long_block)) if args.continued else []))
        if not all(marker in text for marker in markers):
            parser.error(f"--table {args.table}: needs a document holding the markers {' '.join(markers)}")
        blocks = [(TABLE_START, TABLE_END, committed_block([read_teacher_record(args.output / name)
                                                           for name in args.models]))]
        def experiment(flag: str, path: Path) -> tuple[dict, dict]:
            """(the committed teacher of its family, the experiment's record)."""
            try:
                record = json.loads(path.read_text())
                family = record["model"]
                return read_teacher_record(args.output / family), record
            except (OSError, ValueError, KeyError, TypeError) as err:
                parser.error(f"{flag} {path}: not a teacher.json record ({type(err).__name__}: {err})")

        if args.longer:
            blocks.append((LONGER_START, LONGER_END, longer_block([experiment("--longer", p) for p in args.longer])))
        if args.wider:
            blocks.append((WIDER_START, WIDER_END, wider_block([experiment("--wider", p) for p in args.wider])))
        if args.curriculum:
            blocks.append((CURRICULUM_START, CURRICULUM_END,
                           curriculum_block([experiment("--curriculum", p) for p in args.curriculum])))
        if args.positions:
            blocks.append((POSITIONS_START, POSITIONS_END,
                           positions_block([experiment("--positions", p)[1] for p in args.positions])))
        if args.continued:
            blocks.append((*long_markers(args.long_block),
                           long_block([experiment("--continued", p)[1] for p in args.continued])))
        for start, end, block in blocks:
            replace_block(args.table, start, end, block)
            print(block)
        return 0
    try:
        device = training_device(args.device)
    except ValueError as e:
        parser.error(f"--device: {e}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    task = SyntheticTask()
    train = {"rows_per_phase": args.rows, "seed": TRAIN_SEED, "phases": [dataclasses.asdict(p) for p in args.phases],
             "steps": sum(p.steps for p in args.phases), "lr": args.lr, "init_seed": args.seed,
             "length_groups": args.length_groups,
             **({"position_init": args.position_init} if args.position_init != "random" else {})}
    # Everything a run's weights and curve depend on (a continuation's source by its files' sha256);
    # each family's checkpoint (left by a killed run) is checked before anything trains: one of
    # another recipe is refused, never continued.
    resumes = {name: Resume(args.output / name / "resume.pt", every=args.checkpoint_every, recipe={
        "model": name, "size": SIZE, "backbone": backbones[name], "task": dataclasses.asdict(task),
        "train": {**train, **({"init_from": {"folder": str(args.init_from), "files": sources[name]["files"],
                                             "train": sources[name]["train"]}} if name in sources else {})},
        "curve_every": args.curve_every, "curve_rows": min(CURVE_ROWS, args.heldout),
        **({"curve_long_rows": args.long_rows} if args.long_rows else {})}) for name in args.models}
    for resume in ([] if args.rescore else resumes.values()):
        try:
            resume.saved_state()
        except ValueError as err:
            parser.error(f"--output {args.output}: {err}")
    for name in args.models:
        directory = args.output / name
        if args.rescore:  # measure the teacher already there again; its recipe (and backbone) stay as recorded
            record = read_teacher_record(directory)
            spec = teacher_spec(name, record.get("backbone"))
        else:
            spec = teacher_spec(name, backbones[name])
        held = synthetic_rows(spec, args.heldout, task, seed=HELDOUT_SEED, split="heldout", alignment=True)
        long_rows, no_long = long_form_rows(spec, task, args.long_rows, HELDOUT_SEED) if args.long_rows else (None, None)
        if args.rescore:
            model = spec.load(str(directory))
        else:
            phases = [(synthetic_rows(spec, args.rows, task, seed=TRAIN_SEED, min_text=p.min_text, max_text=p.max_text),
                       p.steps, p.batch_size) for p in args.phases]
            curve_rows = held[:CURVE_ROWS]
            resume = resumes[name]
            directory.mkdir(parents=True, exist_ok=True)
            model, curve = train_teacher(
                spec, phases, args.lr, args.seed, curve_every=args.curve_every, device=device,
                length_groups=args.length_groups, resume=resume, position_init=args.position_init,
                start=spec.load(str(args.init_from / name)).state_dict() if name in sources else None,
                curve=lambda m: {**{k: v for k, v in heldout_quality(spec, m, curve_rows).items() if k.startswith("accuracy")},
                                 **({"long_per": spoken_quality(spec, m, long_rows, task)["per"]} if long_rows else {})})
            files = save_teacher(spec, model, directory)
            record = {
                "model": name, "size": SIZE, "backbone": backbones[name],
                "parameters": sum(p.numel() for p in model.parameters()),
                "task": dataclasses.asdict(task),
                "train": {**resume.recipe["train"], "seconds": round(resume.seconds, 1), "threads": args.threads, "torch": torch.__version__,
                          "device": device_name(device),
                          **({"resumed_at": resume.resumed_at} if resume.resumed_at else {})},
                "dropout": UPSTREAM_DROPOUT[name],
                # Teacher-forced accuracy on the first CURVE_ROWS held-out rows along the training (and
                # the free-running PER on the long-form rows with --long-rows): where the curve still
                # moves, more steps of the last phase would help.
                "curve": {"rows": min(CURVE_ROWS, len(held)), **({"long_rows": len(long_rows)} if long_rows else {}),
                          "points": curve},
                "files": {p.name: file_sha256(p) for p in files},
            }
            if reproduce is not None:  # the same weights to the bit, or not (another torch, CPU or device)
                record["reproduces"] = {"record": repo_relative(args.recipe),
                                        "same_weights": record["files"] == reproduce.get("files")}
                print(f"{name}: the weights are {'' if record['reproduces']['same_weights'] else 'NOT '}those of "
                      f"{args.recipe} (sha256 of {', '.join(record['files'])})", flush=True)
        # The stated quality: teacher-forced top-1 accuracy against the corpus tokens on held-out rows,
        # and what the teacher says free-running (PER against the text, pipeline/synthetic/transcribe.py).
        record["heldout"] = {"seed": HELDOUT_SEED, **heldout_quality(spec, model, held),
                             **spoken_quality(spec, model, held[:SPOKEN_ROWS], task)}
        if args.long_rows:  # what it says on the results table's long-form rows (or why it has none)
            record["long_form"] = ({"seed": HELDOUT_SEED, **spoken_quality(spec, model, long_rows, task)} if long_rows
                                   else {"none": no_long})
        (directory / "teacher.json").write_text(json.dumps(record, indent=2) + "\n")
        if not args.rescore:
            resumes[name].path.unlink(missing_ok=True)  # the run is whole: nothing left to continue
        q = record["heldout"]
        print(f"{name}: held-out teacher-forced accuracy {q['accuracy']:.3f} (phoneme starts "
              f"{q['accuracy_phoneme_starts']:.3f}, inside {q['accuracy_inside_phonemes']:.3f}) over "
              f"{q['positions']} tokens; free-running PER {q['per']:.3f} on {q['spoken_rows']} rows; "
              f"{record['parameters']:,} parameters; wrote {directory}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
