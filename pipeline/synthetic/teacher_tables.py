"""The docs' blocks of teachers (docs/results.md): the committed teachers' table, and experiments
(longer, wider, another length curriculum, another position init) beside them, and teachers continued on longer texts, each rendered from teacher.json records
(``python -m jobs.train_teachers --table ...``)."""

from __future__ import annotations

from pipeline.evals.common import FAMILY_NAMES
from pipeline.synthetic.teacher_projection import projection_lines
from pipeline.synthetic.teachers import MINI_BACKBONE
from wand.models import get_spec

__all__ = ["TABLE_START", "TABLE_END", "LONGER_START", "LONGER_END", "WIDER_START", "WIDER_END", "CURRICULUM_START",
           "CURRICULUM_END", "dimensions", "backbone_label", "teacher_table", "committed_block", "phases_text",
           "longer_block", "curriculum_block", "wider_block", "LONG_START", "LONG_END", "long_block", "long_markers",
           "POSITIONS_START", "POSITIONS_END", "position_init", "positions_block"]


def dimensions(record: dict) -> str:
    """A teacher.json record's backbone in words ("128 wide, 4 layers"; the mini preset's when unrecorded)."""
    backbone = record.get("backbone") or MINI_BACKBONE
    return f"{backbone['width']} wide, {backbone['layers']} layers"


def backbone_label(record: dict) -> str:
    """The teacher table's backbone column: the transformers model type, and the dimensions when
    they are not the mini preset's."""
    label = get_spec(record["model"], record["size"]).backbone_config().model_type  # from the spec, not a list
    if (record.get("backbone") or MINI_BACKBONE) != MINI_BACKBONE:
        label += f", {dimensions(record)}"
    return label


TABLE_START, TABLE_END = "<!-- teacher-table:start -->", "<!-- teacher-table:end -->"


def teacher_table(records: list[dict]) -> str:
    """The docs' table of the committed teachers, from their teacher.json records."""
    lines = ["| teacher (mini) | parameters | steps | held-out accuracy | inside phonemes | at phoneme starts | "
             "PER (free-running) | sub / del / ins | speaker | stops | length | training |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        q, t = r["heldout"], r["train"]
        parts = " / ".join(f"{q[k]:.3f}" if k in q else "n/a" for k in ("substitutions", "deletions", "insertions"))
        lines.append(f"| {FAMILY_NAMES[r['model']]} ({backbone_label(r)}) | {r['parameters']:,} | {t['steps']:,} | {q['accuracy']:.1%} | "
                     f"{q['accuracy_inside_phonemes']:.1%} | **{q['accuracy_phoneme_starts']:.1%}** | "
                     f"{q['per']:.3f} ({q['spoken_rows']} rows) | {parts} | {q['speaker_accuracy']:.3f} | "
                     f"{q['stopped']:.2f} | {q.get('length_ratio_median', float('nan')):.2f} | "
                     f"{t['seconds'] / 60:.0f} min, {t['threads']} thread(s), {t['device']} |")
    return "\n".join(lines)


def position_line(label: str, record: dict) -> str:
    """One teacher's held-out accuracy at phoneme starts by generated position (where along an
    utterance it loses its place in the text), from its record."""
    spans = record["heldout"].get("phoneme_starts_by_position")
    if not spans:
        return f"- {label}: phoneme starts by generated position: not in this record (scored before it was measured)"
    parts = ", ".join(f"{span}: {v['accuracy']:.1%} ({v['phoneme_starts']:,})" for span, v in spans.items())
    return f"- {label}: at phoneme starts by generated position (how many): {parts}"


def committed_block(records: list[dict]) -> str:
    """The docs' block of the committed teachers: their table, then each one's accuracy at phoneme
    starts by generated position."""
    return "\n".join([teacher_table(records), "",
                      *(position_line(FAMILY_NAMES[r["model"]], r) for r in records)])


LONGER_START, LONGER_END = "<!-- teacher-longer:start -->", "<!-- teacher-longer:end -->"


def curve_line(label: str, record: dict) -> str:
    """One teacher's last phase and that phase's learning curve at phoneme starts (the curve rows)."""
    train = record["train"]
    last = len(train["phases"]) - 1
    curve = ", ".join(f"{p['step']:,}: {p['accuracy_phoneme_starts']:.1%}"
                      for p in record["curve"]["points"] if p["phase"] == last)
    return (f"- {label}: last phase {train['phases'][last]['steps']:,} steps, {train['rows_per_phase']:,} "
            f"rows per phase; phoneme starts on the {record['curve']['rows']} curve rows: {curve}")


def phases_text(record: dict) -> str:
    """A teacher.json record's length curriculum as ``--phases`` takes it."""
    return " ".join(f"{p['steps']}:{p['min_text']}:{p['max_text']}:{p['batch_size']}" for p in record["train"]["phases"])


def beside_block(pairs: list[tuple[dict, dict]], label) -> str:
    """Committed teachers beside experiments (``(committed, experiment)`` teacher.json records), family
    by family in the order given: their table rows, each recipe's last phase and that phase's learning
    curve at phoneme starts (the curve rows), then each one's phoneme starts by generated position.
    ``label(record)`` names an experiment after the family's name."""
    families: dict[str, tuple[dict, list[dict]]] = {}
    for committed, record in pairs:
        families.setdefault(committed["model"], (committed, []))[1].append(record)
    labelled = []
    for committed, runs in families.values():
        family = FAMILY_NAMES[committed["model"]]
        labelled.append((f"{family}, committed", committed))
        labelled += [(f"{family}, {label(r)}", r) for r in runs]
    return "\n".join([teacher_table([record for _, record in labelled]), "",
                      *(curve_line(name, record) for name, record in labelled),
                      *(position_line(name, record) for name, record in labelled)])


def longer_block(pairs: list[tuple[dict, dict]]) -> str:
    """Committed teachers beside runs trained longer (on the family's backbone or another): what more
    training bought and whether the curve still rises."""
    return beside_block(pairs, lambda r: f"longer, {r['train']['steps']:,} steps, {dimensions(r)}, phases {phases_text(r)}")


CURRICULUM_START, CURRICULUM_END = "<!-- teacher-curriculum:start -->", "<!-- teacher-curriculum:end -->"


def curriculum_block(pairs: list[tuple[dict, dict]]) -> str:
    """Committed teachers beside runs of another length curriculum (the phases named)."""
    return beside_block(pairs, lambda r: f"phases {phases_text(r)}, {dimensions(r)}")


WIDER_START, WIDER_END = "<!-- teacher-wider:start -->", "<!-- teacher-wider:end -->"


def wider_block(pairs: list[tuple[dict, dict]]) -> str:
    """Committed teachers each beside the same family trained on another backbone (``(committed,
    experiment)`` teacher.json records): the table rows, then each one's last-phase curve at phoneme
    starts, labelled by family and backbone, so the docs say what capacity bought."""
    lines = [teacher_table([r for pair in pairs for r in pair]), ""]
    for pair in pairs:
        for record in pair:
            lines.append(curve_line(f"{FAMILY_NAMES[record['model']]}, {dimensions(record)}, "
                                    f"{record['parameters']:,} parameters", record))
    lines += [position_line(f"{FAMILY_NAMES[record['model']]}, {dimensions(record)}", record)
              for pair in pairs for record in pair]
    return "\n".join(lines)


POSITIONS_START, POSITIONS_END = "<!-- teacher-positions:start -->", "<!-- teacher-positions:end -->"


def position_init(record: dict) -> str:
    """How a teacher.json record's learned position tables started (``train.position_init``; random
    where the record says nothing, as every run before the option did)."""
    return record["train"].get("position_init", "random")


def positions_block(records: list[dict]) -> str:
    """Teachers in the order given, each labelled by its position init, phases and backbone (a random-init
    run beside the same recipe with sinusoids): table rows, last-phase curves, phoneme starts by position."""
    labelled = [(f"{FAMILY_NAMES[r['model']]}, {position_init(r)} positions, phases {phases_text(r)}, {dimensions(r)}", r)
                for r in records]
    return "\n".join([teacher_table(records), "", *(curve_line(name, r) for name, r in labelled),
                      *(position_line(name, r) for name, r in labelled)])


def long_markers(name: str = "teacher-long") -> tuple[str, str]:
    """The markers of a block of continued teachers: one per chain (the records' chain, and a chain rebuilt
    from another start, side by side)."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


LONG_START, LONG_END = long_markers()


def long_block(records: list[dict]) -> str:
    """Teachers continued on longer texts (``jobs.train_teachers --init-from``), in the order given: what
    each run trained, what it says at the held-out lengths and on the results table's long-form rows
    (its ``long_form``, from ``--long-rows``), which run it continued (matched by the source's sha256
    among the records), its rows and batch order (``--rows``, ``--seed``), and the long-form PER along
    each continuation's curve; under a chain of two or more continuations of one recipe, where more of
    it leads (``teacher_projection``)."""
    lines = ["| run | continues | phases | rows per phase / batch-order seed | lr | PER held-out (rows) | at phoneme starts | "
             "PER long form (rows) | long form: stops / length | training |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n, r in enumerate(records, 1):
        q, t, long = r["heldout"], r["train"], r.get("long_form", {})
        source = t.get("init_from")
        continues = "random weights" if source is None else next(
            (f"run {k}" for k, other in enumerate(records, 1) if other["files"] == source["files"]),
            f"a teacher not listed ({source['folder']})")
        said = (f"{long['per']:.3f} ({long['spoken_rows']})" if "per" in long else "n/a")
        ends = (f"{long['stopped']:.2f} / {long['length_ratio_median']:.2f}" if "per" in long else "n/a")
        lines.append(f"| {n}: {FAMILY_NAMES[r['model']]}, {dimensions(r)} | {continues} | {phases_text(r)} | "
                     f"{t['rows_per_phase']:,} / {t['init_seed']} | {t['lr']:g} | "
                     f"{q['per']:.3f} ({q['spoken_rows']}) | {q['accuracy_phoneme_starts']:.1%} | {said} | {ends} | "
                     f"{t['seconds'] / 60:.0f} min, {t['threads']} thread(s), {t['device']} |")
    lines.append("")
    for n, r in enumerate(records, 1):
        points = [p for p in r["curve"]["points"] if "long_per" in p]
        if points:
            rows = f"{r['curve']['long_rows']} " if r["curve"].get("long_rows") else "the curve's "
            lines.append(f"- run {n}: along its training, PER on {rows}long-form rows / "
                         f"phoneme starts on the {r['curve']['rows']} curve rows: "
                         + ", ".join(f"{p['step']:,}: {p['long_per']:.3f} / {p['accuracy_phoneme_starts']:.1%}" for p in points))
    lines += projection_lines(records)  # where more of the last run's recipe leads (two or more of it in a row)
    return "\n".join(lines).rstrip()
