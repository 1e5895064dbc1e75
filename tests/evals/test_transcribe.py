"""The synthetic transcriber and its metrics (PER, speaker accuracy, law consistency) on planted errors."""

import numpy as np
import pytest

from pipeline.synthetic.law import speech_codes, synthetic_rows, SyntheticTask
from pipeline.synthetic.transcribe import edit_distance, edit_operations, homophones, score, speech_codes_of, transcribe
from wand.models import get_spec

TASK = SyntheticTask()
CODES = 61


def utterance(seed, n=30):
    rng = np.random.default_rng(seed)
    speaker = int(rng.integers(0, TASK.speakers))
    text = rng.integers(0, TASK.phonemes, n).tolist()
    return text, speaker


def other_sound(p, speaker):
    """A phoneme that does not sound like ``p`` for the speaker."""
    sym = homophones(TASK, CODES, speaker)
    return next(q for q in range(TASK.phonemes) if sym[q] != sym[p])


def test_edit_distance_against_hand_counts():
    assert edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert edit_distance([1, 9, 3], [1, 2, 3]) == 1
    assert edit_distance([1, 3], [1, 2, 3]) == 1
    assert edit_distance([1, 2, 2, 3], [1, 2, 3]) == 1
    assert edit_distance([], [1, 2]) == 2 and edit_distance([4, 5], []) == 2


def test_edit_operations_split_the_distance():
    # (said, reference) -> (substitutions, deletions, insertions), counted by hand.
    cases = {((1, 9, 3), (1, 2, 3)): (1, 0, 0), ((1, 3), (1, 2, 3)): (0, 1, 0), ((1, 2, 2, 3), (1, 2, 3)): (0, 0, 1),
             ((), (1, 2)): (0, 2, 0), ((4, 5), ()): (0, 0, 2), ((7, 1, 2), (1, 2, 3)): (0, 1, 1)}
    for (said, reference), expected in cases.items():
        assert edit_operations(list(said), list(reference)) == expected, (said, reference)
    rng = np.random.default_rng(0)  # the three always sum to the independent Levenshtein distance
    for _ in range(200):
        a, b = rng.integers(0, 4, rng.integers(0, 9)).tolist(), rng.integers(0, 4, rng.integers(0, 9)).tolist()
        assert sum(edit_operations(a, b)) == edit_distance(a, b)


@pytest.mark.parametrize("name", ["cosyvoice2", "indextts", "sparktts"])
def test_the_corpus_rows_transcribe_to_their_text(name):
    spec = get_spec(name, "tiny")
    codes = len(speech_codes(spec))
    for row in synthetic_rows(spec, 4, seed=5, min_text=20, max_text=40, alignment=True):
        generated = row["input_ids"][row["prefix_length"]:]
        tokens = speech_codes_of(spec, generated)
        assert len(tokens) == len(generated) - 1  # cut at the stop id
        align = row["phoneme_index"][:-1]
        text_len = align[-1] + 1
        # The text and speaker, recovered independently: the generator's own tables.
        rng = np.random.default_rng([5, TASK.seed, 7])
        got = None
        for _ in range(4):
            speaker = int(rng.integers(0, TASK.speakers))
            text = rng.integers(0, TASK.phonemes, int(rng.integers(20, 41))).tolist()
            if TASK.speech(codes, text, speaker)[0] == tokens:
                got = (text, speaker)
        text, speaker = got
        assert len(text) == text_len
        result = score(TASK, codes, tokens, text, speaker)
        assert result["per"] == 0.0 and result["speaker_accuracy"] == 1.0 and result["law_consistency"] == 1.0


def test_planted_substitution_deletion_and_insertion():
    text, speaker = utterance(1)
    n = len(text)
    i = 11
    substituted = text[:i] + [other_sound(text[i], speaker)] + text[i + 1:]
    deleted = text[:i] + text[i + 1:]
    inserted = text[:i] + [other_sound(text[i], speaker)] + text[i:]
    for spoken, errors in ((substituted, 1), (deleted, 1), (inserted, 1), (text, 0)):
        tokens = TASK.speech(CODES, spoken, speaker)[0]
        result = score(TASK, CODES, tokens, text, speaker)
        expected = edit_distance([homophones(TASK, CODES, speaker)[p] for p in spoken],
                                 [homophones(TASK, CODES, speaker)[p] for p in text])
        assert expected == errors  # the plant is what it says
        assert result["per"] == pytest.approx(errors / n)
        assert result["law_consistency"] == 1.0 and result["speaker_accuracy"] == 1.0  # lawful speech
    two = text[:3] + text[4:20] + [other_sound(text[20], speaker)] + text[21:]
    assert score(TASK, CODES, TASK.speech(CODES, two, speaker)[0], text, speaker)["per"] == pytest.approx(2 / n)


def test_a_wrong_speaker_is_lawful_but_not_the_utterances_voice():
    text, speaker = utterance(2)
    wrong = (speaker + 3) % TASK.speakers
    tokens = TASK.speech(CODES, text, wrong)[0]
    result = score(TASK, CODES, tokens, text, speaker)
    assert result["law_consistency"] == 1.0  # lawful speech, in another voice
    assert result["speaker_accuracy"] < 0.5
    assert score(TASK, CODES, tokens, text, wrong)["per"] == 0.0  # it does say the text


def test_error_tokens_and_a_glitch_inside_a_phoneme():
    text, speaker = utterance(3)
    tokens, align = TASK.speech(CODES, text, speaker)
    n = len(tokens)
    # One frame in the middle of a long phoneme replaced: the law breaks there, at the next token
    # (its code depends on this one) and where the reading resumes; the phoneme is still said.
    middle = next(t for t in range(1, n - 1) if align[t - 1] == align[t] == align[t + 1])
    corrupted = list(tokens)
    corrupted[middle] = (corrupted[middle] + 1) % CODES
    said = transcribe(TASK, CODES, corrupted, speaker)
    assert 1 <= int((~said.lawful).sum()) <= 3 and not said.lawful[middle]
    result = score(TASK, CODES, corrupted, text, speaker)
    assert result["per"] <= 1 / len(text)
    # Tokens outside the codebook (-1: not speech ids) are error tokens: a run of them in place of
    # a whole phoneme is one unknown phoneme (a substitution).
    i = 7
    start, stop = align.index(i), len(align) - align[::-1].index(i)
    garbled = tokens[:start] + [-1] * (stop - start) + TASK.speech(CODES, text[i + 1:], speaker)[0]
    said = transcribe(TASK, CODES, garbled, speaker)
    assert -1 in said.phonemes and not said.lawful[start:stop].any()
