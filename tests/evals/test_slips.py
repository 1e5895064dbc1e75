"""The kinds of a teacher's mistakes at phoneme starts: each kind recognised where it was planted, and
the right ones counted as the teacher's own accuracy counts them."""

from pathlib import Path

import numpy as np

import wand
from pipeline.synthetic.law import phoneme_starts, speech_codes, synthetic_rows, SyntheticTask
from pipeline.synthetic.slips import phoneme_start_slips, slip_kind
from pipeline.synthetic.teachers import read_teacher_record, record_spec, teacher_forced_accuracy
from wand.models import get_spec

ROOT = Path(__file__).resolve().parents[2]


def test_each_kind_is_recognised_where_it_was_planted():
    task = SyntheticTask()
    spec = get_spec("cosyvoice2", "tiny")
    codes = len(speech_codes(spec))
    row = synthetic_rows(spec, 1, task, seed=3, min_text=12, max_text=12, alignment=True)[0]
    text, speaker = row["text"], row["speaker"]
    generated, _ = task.speech(codes, text, speaker)
    starts = np.flatnonzero(phoneme_starts(row)[:-1])
    kinds = []
    for i, t in enumerate(starts):
        previous = generated[t - 1] if t > 0 else task.rest_code(codes, speaker)
        kinds.append(slip_kind(task, codes, text, speaker, i, previous, generated[t]))
    assert kinds == ["right"] * len(text)  # the corpus's own codes
    i, t = 5, starts[5]
    previous = generated[t - 1]
    frame0 = {p: task.next_code(codes, p, speaker, 0, previous) for p in range(task.phonemes)}
    held = task.next_code(codes, text[i - 1], speaker, task.duration(text[i - 1], speaker), previous)
    planted = {held: "timing", frame0[text[i + 1]]: "slip 1", frame0[text[i - 1]]: "slip 1",
               frame0[text[i + 3]]: "slip 2-3", None: "stop", -1: "other"}
    far = [p for p in range(task.phonemes) if p not in text[i - 3 : i + 4]]
    planted.setdefault(frame0[far[0]], "far")
    outside = next(c for c in range(codes) if c not in frame0.values() and c != held)
    planted[outside] = "other"
    for predicted, kind in planted.items():
        if predicted is not None and predicted >= 0 and predicted == frame0[text[i]]:
            continue  # a planted code that happens to be the right one
        assert slip_kind(task, codes, text, speaker, i, previous, predicted) == kind, (predicted, kind)


def test_the_right_ones_are_the_teachers_accuracy_at_phoneme_starts():
    """On the committed IndexTTS teacher (right about 85% of the time at phoneme starts, so both the
    right and the wrong are many): the kinds add up to the phoneme starts, by position too."""
    record = read_teacher_record(ROOT / "teachers" / "indextts")
    spec, task = record_spec(record), SyntheticTask(**record["task"])
    model = wand.enable_wand(spec.load(str(ROOT / "teachers" / "indextts")), None)
    rows = synthetic_rows(spec, 6, task, seed=1, split="heldout", alignment=True)
    slips = phoneme_start_slips(spec, model, rows, task, edges=(0, 64, 128))
    scored = teacher_forced_accuracy(spec, model, rows)  # its own forward and batching
    starts = np.concatenate([phoneme_starts(r)[:-1] for r in rows])
    last = np.concatenate([np.arange(len(r["input_ids"]) - r["prefix_length"]) < len(r["input_ids"]) - r["prefix_length"] - 1
                           for r in rows])
    correct = scored["correct"][last]
    assert sum(slips["all"].values()) == int(starts.sum()) == sum(sum(c.values()) for c in slips["by_position"].values())
    assert slips["all"].get("right", 0) == int(correct[starts].sum())
    assert list(slips["by_position"]) == ["0-63", "64-127", "128+"]
    assert slips["all"]["right"] > 0.5 * int(starts.sum()) and len(slips["all"]) > 2  # right and several kinds of wrong
