"""The synthetic AR-TTS corpus: deterministic, in each spec's layout, and the prefix matters."""

from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.data.corpus import RowChecker
from pipeline.synthetic.law import synthetic_rows, SyntheticTask
from wand.models import get_spec

FAMILIES = ["cosyvoice2", "indextts", "sparktts"]


@pytest.mark.parametrize("name", FAMILIES)
def test_rows_are_deterministic_and_in_the_specs_layout(name):
    spec = get_spec(name, "tiny")
    rows = synthetic_rows(spec, 6, seed=3)
    assert rows == synthetic_rows(spec, 6, seed=3)
    assert rows != synthetic_rows(spec, 6, seed=4)
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        spec.check_token_ids(ids)
        # The spec finds the same prefix from the ids and the prompt count (independent of the generator).
        assert int(spec.prefix_lengths(ids, [row["prompt_length"]])[0]) == row["prefix_length"]
        generated = ids[0, row["prefix_length"]:]
        # Speech, then the stop id once, last (upstream training's target layout).
        assert int(generated[-1]) == spec.stop_token_ids[0]
        speech = generated[:-1]
        assert bool(spec.is_speech(speech).all()) and not any(int(t) in spec.stop_token_ids for t in speech)
    checked = RowChecker(spec)(pa.Table.from_pylist(rows))  # the precompute's own row checks
    assert checked.column("reason").to_pylist() == [None] * len(rows)
    lengths = [len(r["input_ids"]) - r["prefix_length"] for r in rows]
    assert min(lengths) >= 100  # generated length >> the tiny W (4 .. 16)
    if name == "indextts":
        assert max(lengths) <= spec.max_generated_tokens


def utterances(task, codes, n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        speaker = int(rng.integers(0, task.speakers))
        text = rng.integers(0, task.phonemes, 30).tolist()
        speech, align = task.speech(codes, text, speaker)
        out.append((text, speaker, speech, align))
    return out


def test_the_law_reproduces_every_token_from_the_prefix():
    task, codes = SyntheticTask(), 61
    for text, speaker, speech, align in utterances(task, codes, 5, 0):
        previous = task._tables(codes)[1][speaker]
        frame = 0
        for t, code in enumerate(speech):
            frame = frame + 1 if t and align[t] == align[t - 1] else 0
            assert task.next_code(codes, text[align[t]], speaker, frame, int(previous)) == code
            previous = code
        assert [task.duration(p, speaker) for p in text] == [align.count(i) for i in range(len(text))]
    assert len({task.duration(p, s) for p in range(task.phonemes) for s in range(task.speakers)}) == 4  # varying


def test_a_window_without_the_prefix_cannot_predict_phoneme_starts():
    """The best local predictor (an n-gram table over the last w tokens, fit on 400 utterances)
    follows a phoneme it is in, but is near chance where the next phoneme starts: only the prefix
    (text + speaker) says which it is. With the prefix, the law predicts every token."""
    task, codes, w = SyntheticTask(), 61, 2
    table = defaultdict(Counter)
    for _, _, speech, _ in utterances(task, codes, 400, 1):
        for i in range(w, len(speech)):
            table[tuple(speech[i - w : i])][speech[i]] += 1
    hits = {"start": [], "inside": []}
    for _, _, speech, align in utterances(task, codes, 100, 2):
        for i in range(w, len(speech)):
            counts = table.get(tuple(speech[i - w : i]))
            guess = counts.most_common(1)[0][0] if counts else -1
            hits["start" if align[i] != align[i - 1] else "inside"].append(guess == speech[i])
    inside, start = np.mean(hits["inside"]), np.mean(hits["start"])
    assert inside > 0.9, inside  # the local structure is there to learn
    assert start < 0.2, start  # the next phoneme is not in the window


def test_far_positions_depend_on_prefix_content():
    task, codes = SyntheticTask(), 61
    text = list(range(20)) + list(range(20))
    changed = list(text)
    changed[35] = (text[35] + 1) % task.phonemes  # a phoneme late in the text
    speech, align = task.speech(codes, text, speaker=2)
    other, _ = task.speech(codes, changed, speaker=2)
    first = align.index(35)
    assert first > 4 * 16  # far from the prefix for every tiny W
    assert speech[:first] == other[:first] and speech[first] != other[first]
    assert task.speech(codes, text, speaker=3)[0][0] != speech[0]  # the speaker matters from the first frame
