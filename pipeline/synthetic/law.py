"""A synthetic AR-TTS corpus with the structure that makes the real task need the prefix.

Every utterance has a speaker s and a "text" of phoneme ids p_1 .. p_n. The speech is the
phonemes spoken in order; phoneme p said by speaker s lasts d(p, s) frames (2 .. 5: durations
vary with phoneme and speaker), and frame j of it is the code

    code = (base[p] + voice[s] + 7 j + (previous code mod 3)) mod C

so each token depends on the phoneme being spoken (found in the prefix by alignment, as a TTS
model aligns to its text), on the speaker (given in the prefix: prompt speech tokens, Spark's
global tokens, IndexTTS's conditioning latents) and on the previous token (local continuity).
A model that sees only the last W tokens can follow a phoneme it is already in, but cannot know
which phoneme comes next or, without the prompt, the speaker: the prefix matters at every
phoneme boundary, however far from the prefix. The law is deterministic: the generator is also
the oracle (``next_code``) that tests and the results table check models against.

Rows are in the corpus schema (``id``, ``input_ids``, ``prefix_length``, ``prompt_length``,
IndexTTS ``conditioning_latents``), laid out per model spec (``spec.layout``) and ending with the
model's stop id, as upstream training data do, so the pipeline reads them like real data and a
model trained on them learns where to stop.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch


__all__ = ["SyntheticTask", "text_limit", "synthetic_rows", "phoneme_starts", "speech_codes", "TEXT_LENGTHS"]

TEXT_LENGTHS = (40, 120)  # phonemes per training utterance (min, max): about 140-420 generated tokens


@dataclass(frozen=True)
class SyntheticTask:
    """The law of one synthetic corpus (deterministic for ``seed``)."""

    phonemes: int = 24
    speakers: int = 8
    prompt_tokens: int = 3
    min_duration: int = 2
    max_duration: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.min_duration <= self.max_duration:
            raise ValueError(f"durations: need 1 <= min_duration <= max_duration, got {self.min_duration}, {self.max_duration}")
        if self.phonemes < 2 or self.speakers < 1:
            raise ValueError("phonemes must be >= 2 and speakers >= 1")

    @functools.lru_cache(maxsize=8)
    def _tables(self, codes: int) -> tuple[np.ndarray, np.ndarray]:
        """(base code per phoneme, voice offset per speaker) for a codebook of ``codes``."""
        rng = np.random.default_rng(self.seed)
        return rng.integers(0, codes, self.phonemes), rng.integers(0, codes, self.speakers)

    def duration(self, phoneme: int, speaker: int) -> int:
        span = self.max_duration - self.min_duration + 1
        return self.min_duration + (phoneme * 7 + speaker * 3) % span

    def next_code(self, codes: int, phoneme: int, speaker: int, frame: int, previous: int) -> int:
        base, voice = self._tables(codes)
        return int((base[phoneme] + voice[speaker] + 7 * frame + previous % 3) % codes)

    def rest_code(self, codes: int, speaker: int) -> int:
        """The code an utterance of ``speaker`` starts from (the "previous" code of its first frame)."""
        return int(self._tables(codes)[1][speaker])

    def speech(self, codes: int, text: list[int], speaker: int) -> tuple[list[int], list[int]]:
        """(codes of the utterance, index into ``text`` of the phoneme each frame speaks)."""
        out, align = [], []
        previous = self.rest_code(codes, speaker)
        for position, phoneme in enumerate(text):
            for frame in range(self.duration(phoneme, speaker)):
                previous = self.next_code(codes, phoneme, speaker, frame, previous)
                out.append(previous)
                align.append(position)
        return out, align

    def prompt(self, codes: int, speaker: int) -> list[int]:
        """The speaker's prompt speech tokens (fixed per speaker)."""
        _, voice = self._tables(codes)
        return [int((voice[speaker] * (i + 3) + i) % codes) for i in range(self.prompt_tokens)]


def speech_codes(spec) -> np.ndarray:
    """The spec's speech ids without its stop ids: the codebook the law speaks in (code k is id
    ``speech_codes(spec)[k]``), and the ids the evals restrict greedy speech decoding to."""
    lo, hi = spec.speech_range
    return np.array([i for i in range(lo, hi) if i not in spec.stop_token_ids])


def text_limit(spec, task: SyntheticTask) -> int | None:
    """The longest text (phonemes) the spec's positions hold, None without a limit: its text positions
    and its generated ones (prompt + the longest speech of that text + stop; IndexTTS's learned positions)."""
    limits = []
    if spec.max_text_tokens is not None:
        limits.append(spec.max_text_tokens - 2)
    if spec.max_generated_tokens is not None:
        limits.append((spec.max_generated_tokens - 1 - task.prompt_tokens - 2) // task.max_duration)
    return min(limits) if limits else None


def synthetic_rows(spec, n: int, task: SyntheticTask = SyntheticTask(), seed: int = 0,
                   min_text: int = TEXT_LENGTHS[0], max_text: int = TEXT_LENGTHS[1], split: str = "train",
                   alignment: bool = False) -> list[dict]:
    """``n`` utterances for a model spec; ``seed`` picks the utterances (the law is ``task``'s).

    Text lengths are capped by the spec's own limits (IndexTTS's text and mel positions). With
    ``alignment``, each row also holds ``phoneme_index`` (per generated token, the index into the text
    of the phoneme it speaks), ``text`` (the phoneme ids) and ``speaker`` for analysis; they are not
    corpus columns."""
    codes = speech_codes(spec)
    limit = text_limit(spec, task)
    if limit is not None:
        max_text = min(max_text, limit)
    min_text = min(min_text, max_text)
    rng = np.random.default_rng([seed, task.seed, 7])
    rows = []
    for i in range(n):
        speaker = int(rng.integers(0, task.speakers))
        text = rng.integers(0, task.phonemes, int(rng.integers(min_text, max_text + 1))).tolist()
        generated, align = task.speech(len(codes), text, speaker)
        prompt = task.prompt(len(codes), speaker)
        # The end-of-speech id after the speech, as upstream training lays out its targets: a model
        # trained on these rows learns to stop. It "speaks" position len(text), one past the text.
        spoken = torch.cat([torch.as_tensor(codes[generated]), torch.tensor([spec.stop_token_ids[0]])])
        align = align + [len(text)]
        text_ids = torch.tensor(text) + spec.reserved_text_ids  # IndexTTS: 0/1 are start/stop text
        glob = None
        if spec.global_codes is not None:  # Spark: the speaker's global tokens
            g = spec.global_codes
            glob = torch.tensor([(speaker * 5 + k) % g for k in range(g)])
        ids, prefix = spec.layout(text_ids, torch.as_tensor(codes[prompt]), spoken, glob)
        row = {"id": f"syn-{split}-{seed}-{i:05d}", "input_ids": ids.tolist(), "prefix_length": prefix,
               "prompt_length": len(prompt)}
        if spec.latent_shape is not None:
            n_lat, dim = spec.latent_shape
            latent_rng = np.random.default_rng([task.seed, speaker, 11])  # the speaker's voice embedding
            row["conditioning_latents"] = latent_rng.standard_normal(n_lat * dim).astype(np.float32).tolist()
        if alignment:  # for analysis (the transcriber, phoneme-start accuracy): not corpus columns
            row.update(phoneme_index=align, text=text, speaker=speaker)
        rows.append(row)
    return rows


def phoneme_starts(row: dict) -> np.ndarray:
    """Bool per generated token of a row made with ``alignment=True``: True where a new phoneme starts
    (the tokens no local window can predict: which phoneme comes next is only in the prefix)."""
    index = np.asarray(row["phoneme_index"])
    return np.concatenate([[True], index[1:] != index[:-1]])
