"""Where a teacher goes wrong at phoneme starts, by kind: a diagnostic of what limits its PER.

At a phoneme start the next code is frame 0 of the next phoneme of the text (for the speaker, after the
previous code: ``pipeline.synthetic.law``). A teacher-forced prediction there is one of, checked in
this order (a code that two kinds would give counts as the first):

- ``right``: that code;
- ``timing``: frame d of the phoneme just spoken, d its duration: the phoneme held one frame too long;
- ``slip 1`` / ``slip 2-3``: frame 0 of the phoneme 1 / 2-3 places before or after in the text: the
  model lost its place in the text by that much (nearest first);
- ``far``: frame 0 of some other phoneme;
- ``stop``: a stop id;
- ``other``: anything else.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from pipeline.synthetic.law import phoneme_starts, speech_codes, SyntheticTask
from pipeline.synthetic.teachers import _generated_logits  # the teachers' own scoring forward
from wand.batch import collate

__all__ = ["KINDS", "slip_kind", "phoneme_start_slips"]

KINDS = ("right", "timing", "slip 1", "slip 2-3", "far", "stop", "other")
SLIPS = ((-1, "slip 1"), (1, "slip 1"), (-2, "slip 2-3"), (2, "slip 2-3"), (-3, "slip 2-3"), (3, "slip 2-3"))


def slip_kind(task: SyntheticTask, codes: int, text: list[int], speaker: int, index: int, previous: int,
              predicted: int | None) -> str:
    """The kind of a prediction at the start of ``text[index]`` (code ``predicted``; None: a stop id,
    -1: no speech code), after the code ``previous``."""
    if predicted is None:
        return "stop"
    if predicted < 0:
        return "other"
    start = lambda phoneme: task.next_code(codes, phoneme, speaker, 0, previous)  # noqa: E731
    if predicted == start(text[index]):
        return "right"
    if index > 0 and predicted == task.next_code(codes, text[index - 1], speaker,
                                                 task.duration(text[index - 1], speaker), previous):
        return "timing"
    for offset, kind in SLIPS:
        if 0 <= index + offset < len(text) and predicted == start(text[index + offset]):
            return kind
    if any(predicted == start(phoneme) for phoneme in range(task.phonemes)):
        return "far"
    return "other"


def bucket(position: int, edges: tuple[int, ...]) -> str:
    low = max(e for e in edges if e <= position)
    later = [e for e in edges if e > position]
    return f"{low}-{later[0] - 1}" if later else f"{low}+"


@torch.no_grad()
def phoneme_start_slips(spec, model, rows: list[dict], task: SyntheticTask, edges: tuple[int, ...],
                        batch_size: int = 16) -> dict:
    """Teacher-forced predictions at the phoneme starts of ``rows`` (made with ``alignment=True``; the
    stop position excluded) by kind: ``{"all": {kind: count}, "by_position": {span: {kind: count}}}``,
    spans of generated position from ``edges`` (as ``heldout_quality`` reports accuracy)."""
    codes = speech_codes(spec)
    code_of = {int(c): k for k, c in enumerate(codes)}
    stops = set(spec.stop_token_ids)
    targets = spec.target_ids()
    device = next(model.parameters()).device
    model.eval()
    every, by_position = Counter(), {}
    for first in range(0, len(rows), batch_size):
        part = rows[first : first + batch_size]
        logits, _ = _generated_logits(spec, model, collate(spec, part, device), None)
        guesses = targets[logits.argmax(-1).cpu()].tolist()
        at = 0
        for row in part:
            generated = row["input_ids"][row["prefix_length"] :]
            row_guesses, at = guesses[at : at + len(generated)], at + len(generated)
            starts = phoneme_starts(row)
            for t in np.flatnonzero(starts[:-1]):  # the last position is the stop id, not a phoneme
                guess = row_guesses[t]
                predicted = None if guess in stops else code_of.get(guess, -1)
                previous = code_of[generated[t - 1]] if t > 0 else task.rest_code(len(codes), row["speaker"])
                kind = slip_kind(task, len(codes), row["text"], row["speaker"], row["phoneme_index"][t], previous,
                                 predicted)
                every[kind] += 1
                by_position.setdefault(bucket(int(t), edges), Counter())[kind] += 1
    order = lambda counts: {k: counts[k] for k in KINDS if counts[k]}  # noqa: E731
    return {"all": order(every), "by_position": {span: order(c) for span, c in
                                                 sorted(by_position.items(), key=lambda kv: int(kv[0].split("-")[0].rstrip("+")))}}
