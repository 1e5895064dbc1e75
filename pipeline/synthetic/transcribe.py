"""Transcribe synthetic speech exactly, without an ASR model: the WER analog of the paper's Table 4.

The synthetic law (``pipeline.synthetic``) is invertible: speaker s says phoneme p for d(p, s)
frames, frame f of it being ``(base[p] + voice[s] + 7 f + previous mod 3) mod C``. Given the codes
and the speaker, a Viterbi pass over the states (phoneme p, frame f) finds the reading that breaks
the law least often: a state continues to (p, f + 1) while f + 1 < d(p, s), moves to any (q, 0)
once p is complete, and a token no state explains is an error token. Runs of error tokens are
transcribed as one unknown phoneme (-1).

Metrics of one utterance (``score``):

- ``per``: phoneme error rate, edit distance between the spoken phonemes and the text over the
  text's length (the WER analog). Phonemes that sound the same for the speaker (the same base code
  and duration: the codebook is small) are one symbol on both sides.
- ``speaker_accuracy``: fraction of tokens that are lawful for the utterance's speaker (the
  speaker-similarity analog): a token is lawful when it continues the previous one as the law says.
- ``law_consistency``: the same fraction for the speaker that explains the tokens best: how much
  of the speech is lawful at all, in whatever voice.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from pipeline.synthetic.law import SyntheticTask

__all__ = ["Transcript", "transcribe", "score", "edit_distance", "edit_operations", "speech_codes_of"]

_INF = 1 << 30


@dataclass
class Transcript:
    phonemes: list[int]  # spoken phonemes in order (homophones mapped to one symbol); -1: unexplained run
    lawful: np.ndarray  # [T] bool: the token continues the previous one as the law says


@functools.lru_cache(maxsize=64)
def _states(task: SyntheticTask, codes: int, speaker: int):
    """Per state (p, f): phoneme, frame, whether it is the phoneme's last frame, and its sound
    ((base[p] + voice[s] + 7 f) mod C, the code before the previous-token term)."""
    base, voice = task._tables(codes)
    phon, frame = [], []
    for p in range(task.phonemes):
        for f in range(task.duration(p, speaker)):
            phon.append(p)
            frame.append(f)
    phon, frame = np.array(phon), np.array(frame)
    last = frame == np.array([task.duration(int(p), speaker) - 1 for p in phon])
    sound = (base[phon] + voice[speaker] + 7 * frame) % codes
    return phon, frame, last, sound


@functools.lru_cache(maxsize=64)
def homophones(task: SyntheticTask, codes: int, speaker: int) -> tuple[int, ...]:
    """Per phoneme, the symbol it is transcribed as: the first phoneme that sounds the same for this
    speaker (the same base code and duration)."""
    base, _ = task._tables(codes)
    out = []
    for p in range(task.phonemes):
        out.append(next(q for q in range(p + 1) if base[q] == base[p]
                        and task.duration(q, speaker) == task.duration(p, speaker)))
    return tuple(out)


def transcribe(task: SyntheticTask, codes: int, tokens, speaker: int) -> Transcript:
    """The phonemes ``tokens`` (codec indices in [0, codes); anything else is an error token) say
    for ``speaker``, and which tokens are lawful."""
    tokens = [int(t) for t in tokens]
    phon, frame, last, sound = _states(task, codes, speaker)
    n, err = len(phon), len(phon)  # states 0..n-1, then the error state
    first = frame == 0
    prev_state = np.arange(n) - 1  # (p, f - 1), valid where f > 0
    cost = np.full(n + 1, _INF, dtype=np.int64)
    back = np.zeros((len(tokens), n + 1), dtype=np.int64)  # the previous state of each state
    kind = np.zeros((len(tokens), n + 1), dtype=np.int8)  # 0 lawful, 1 law broken, 2 error token
    previous = int(task._tables(codes)[1][speaker])  # the speaker's rest code, as speech() starts
    for t, code in enumerate(tokens):
        emits = (sound + previous % 3) % codes == code if 0 <= code < codes else np.zeros(n, bool)
        new = np.full(n + 1, _INF, dtype=np.int64)
        if t == 0:
            new[:n] = np.where(first, 0, 1)
            back[t, :n], kind[t, :n] = -1, np.where(first, 0, 1)
        else:
            done = np.where(last, cost[:n], _INF)
            best_done = int(done.argmin())
            best_any = int(cost.argmin())
            # A phoneme's next frame, lawful; a new phoneme after a complete one, lawful; after an
            # incomplete one or an error token, the law is broken once.
            cont = np.where(~first, cost[np.maximum(prev_state, 0)], _INF)
            new[:n] = np.where(first, np.minimum(done[best_done], cost[best_any] + 1), cont)
            lawful_start = first & (done[best_done] <= cost[best_any] + 1)
            back[t, :n] = np.where(first, np.where(lawful_start, best_done, best_any), prev_state)
            kind[t, :n] = np.where(first, np.where(lawful_start, 0, 1), 0)
            resync = cost[err] + 1  # after an error token, any frame of any phoneme, once unlawful
            use = ~first & (resync < new[:n])
            new[:n] = np.where(use, resync, new[:n])
            back[t, :n] = np.where(use, err, back[t, :n])
            kind[t, :n] = np.where(use, 1, kind[t, :n])
        new[:n] = np.where(emits, new[:n], _INF)
        best = int(cost.argmin()) if t else -1
        new[err] = (int(cost.min()) if t else 0) + 1
        back[t, err], kind[t, err] = best, 2
        cost = new
        previous = code
    # Backtrack the cheapest reading.
    path = []
    state = int(cost.argmin()) if tokens else -1
    for t in range(len(tokens) - 1, -1, -1):
        path.append((state, int(kind[t, state])))
        state = int(back[t, state])
    path.reverse()
    sym = homophones(task, codes, speaker)
    phonemes, lawful = [], np.zeros(len(tokens), dtype=bool)
    last_real = None  # (t, state) of the last token a phoneme explained
    for t, (state, how) in enumerate(path):
        lawful[t] = how == 0
        if state == err:
            if t == 0 or path[t - 1][0] != err:
                phonemes.append(-1)
            continue
        if how != 0 and frame[state] > 0 and last_real is not None and path[t - 1][0] == err:
            t0, s0 = last_real  # a glitch inside one phoneme: the same phoneme resumes on time
            if phon[s0] == phon[state] and frame[s0] + (t - t0) == frame[state]:
                phonemes.pop()  # the -1 of the glitch: the phoneme was still said
                last_real = (t, state)
                continue
        if frame[state] == 0 or how != 0:  # a new phoneme starts (or resumes after an error)
            phonemes.append(sym[int(phon[state])])
        last_real = (t, state)
    return Transcript(phonemes, lawful)


def edit_distance(a: list[int], b: list[int]) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        diagonal, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (x != y))
    return row[-1]


def edit_operations(said: list[int], reference: list[int]) -> tuple[int, int, int]:
    """(substitutions, deletions, insertions) of one cheapest alignment of ``said`` to ``reference``
    (their sum is ``edit_distance``): deletions are reference phonemes not said, insertions phonemes
    said that the reference has not. Ties prefer a substitution, then a deletion."""
    n, m = len(said), len(reference)
    table = [[i + j if i == 0 or j == 0 else 0 for j in range(m + 1)] for i in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            table[i][j] = min(table[i - 1][j] + 1, table[i][j - 1] + 1,
                              table[i - 1][j - 1] + (said[i - 1] != reference[j - 1]))
    sub = dele = ins = 0
    i, j = n, m
    while i or j:
        if i and j and table[i][j] == table[i - 1][j - 1] + (said[i - 1] != reference[j - 1]):
            sub += said[i - 1] != reference[j - 1]
            i, j = i - 1, j - 1
        elif j and table[i][j] == table[i][j - 1] + 1:
            dele, j = dele + 1, j - 1
        else:
            ins, i = ins + 1, i - 1
    return sub, dele, ins


def score(task: SyntheticTask, codes: int, tokens, text: list[int], speaker: int) -> dict:
    """PER against ``text`` (with its substitutions, deletions and insertions, each over the text's
    length), speaker accuracy and law consistency of one utterance's ``tokens``."""
    said = transcribe(task, codes, tokens, speaker)
    sym = homophones(task, codes, speaker)
    reference = [sym[p] for p in text]
    fractions = [transcribe(task, codes, tokens, s).lawful.mean() if len(tokens) else 0.0
                 for s in range(task.speakers)]
    sub, dele, ins = edit_operations(said.phonemes, reference)
    length = max(1, len(reference))
    return {"per": (sub + dele + ins) / length, "substitutions": sub / length, "deletions": dele / length,
            "insertions": ins / length,
            "speaker_accuracy": float(fractions[speaker]), "law_consistency": float(max(fractions)),
            "phonemes": said.phonemes, "tokens": len(tokens)}


def speech_codes_of(spec, ids) -> list[int]:
    """Generated ids -> codec indices of the synthetic law (``pipeline.synthetic``'s speech codes),
    cut at the first stop id; an id that is no speech code becomes -1 (an error token)."""
    from pipeline.synthetic.law import speech_codes

    table = {int(i): k for k, i in enumerate(speech_codes(spec))}
    out = []
    for token in (int(t) for t in ids):
        if token in spec.stop_token_ids:
            break
        out.append(table.get(token, -1))
    return out
