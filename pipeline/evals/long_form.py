"""The results table's long-form section: every variant on texts 1.5-2x the corpus's longest (past the
fine-tune's lengths unless it was fine-tuned on them: ``AblationConfig.finetune_text``), and where
the teacher itself says the text there, the paired claims of WAND against the full-attention control
with the KV cache after the longest of those utterances (pipeline/evals/claims.py, prefix ``long_``)."""

from __future__ import annotations

from pipeline.evals.cells import cell, grouped, kib
from pipeline.evals.ablation import LONG_TEXT
from pipeline.evals.claims import claim_cells, claims, reading, THRESHOLDS
from pipeline.synthetic.law import TEXT_LENGTHS

__all__ = ["long_form_markdown"]


def long_form_markdown(results: list[dict], notes: dict | None = None) -> list[str]:
    """The section's lines (none without long-form results or notes)."""
    long_runs = [runs for runs in grouped(results) if "long_per" in runs[0]]
    if not long_runs and not notes:
        return []
    shortest, longest = (results[0].get("config") or {}).get("finetune_text", TEXT_LENGTHS) if results else TEXT_LENGTHS
    if LONG_TEXT[0] > longest:
        where = f"{LONG_TEXT[0] / longest:.1f}-{LONG_TEXT[1] / longest:.1f}x the longest fine-tuning text"
    else:
        where = (f"{LONG_TEXT[0] / TEXT_LENGTHS[1]:.1f}-{LONG_TEXT[1] / TEXT_LENGTHS[1]:.1f}x the corpus's longest text, "
                 + ("within" if LONG_TEXT[1] <= longest else "partly past")
                 + f" the lengths the students were fine-tuned on, {shortest}-{longest}")
    lines = [
        "",
        f"**Long form**: held-out texts {LONG_TEXT[0]}-{LONG_TEXT[1]} phonemes ({where}); teacher-forced figures against the "
        f"teacher, free-running ones against the text. A family whose teacher's PER there is above "
        f"{THRESHOLDS.teacher_per} has no long-form claim: the teacher itself does not say the text.",
        "",
        "| model | variant | generated tokens | agree far | KL far | PER | speaker | stops | claim |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    teacher_long = {runs[0]["model"]: runs[0]["long_per"] for runs in long_runs if runs[0]["variant"] == "teacher"}
    for runs in long_runs:
        r = runs[0]
        judged = teacher_long.get(r["model"], 1.0) <= THRESHOLDS.teacher_per
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['long_generated_tokens']} | "
            f"{cell(runs, 'long_agreement_far', spread=True)} | {cell(runs, 'long_kl_far', 3, spread=True)} | "
            f"{cell(runs, 'long_per', spread=True)} | {cell(runs, 'long_speaker_accuracy_tokens')} | "
            f"{cell(runs, 'long_stopped')} | {'judged' if judged else 'none: teacher fails'} |")
    for model, note in (notes or {}).items():
        lines.append(f"| {model} | (all) | n/a: {note} | | | | | | |")
    return lines + _claims_lines(results, {runs[0]["variant"] for runs in long_runs})


def _claims_lines(results: list[dict], variants: set[str]) -> list[str]:
    """The long-form claims of every WAND student scored there, for the families whose teacher is judged."""
    found = [(variant, model, c) for variant in sorted(v for v in variants if v == "wand" or v.startswith("wand_"))
             for model, c in claims(results, variant=variant, prefix="long_").items() if c["judged"]]
    if not found:
        return []
    kv = {(r["model"], r["variant"]): r.get("long_kv_bytes_longest") for r in results}
    lines = ["", "Long-form claims, where the teacher says the text there (the same thresholds and paired "
                 "intervals over the long-form rows; KV after the longest of them, teacher -> WAND):", "",
             "| model | variant | W | WAND - control PER | WAND - teacher PER | speaker | stops | length | passes | KV |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    readings = []
    for variant, model, c in found:
        sizes = [kv.get((model, v)) for v in ("teacher", variant)]
        lines.append(f"| {model} | {variant} | {c['window']} | {claim_cells(c)} | "
                     f"{' -> '.join(kib(n) for n in sizes) if None not in sizes else 'n/a'} |")
        readings.append(f"- Long form: {reading(f'{model} ({variant})', c)}")
    return lines + [""] + readings
