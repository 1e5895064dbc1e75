"""Corpus rows from a user's tokenized data, in each released model's own sequence layout.

Input: one record per utterance, what a user has after running their model's own text tokenizer and
speech codec (JSONL or Parquet):

    id                       utterance id (unique)
    text_ids | text          the text as the model's tokenizer ids, or as a string (then a tokenizer
                             path is needed). CosyVoice 2: prompt text + text, as its frontend joins
                             them; IndexTTS: the BPE ids without start/stop; Spark: the text ids;
                             Llasa / Orpheus: every token before the speech-start marker (their chat
                             template included).
    prompt_codes             optional: the reference (prompt) speech codes, 0-based codec indices
    target_codes             the speech to learn, 0-based codec indices (Orpheus: SNAC codes already
                             in its 7-per-frame token order, as offsets from its first audio token)
    global_codes             Spark: the 32 BiCodec global (speaker) codes
    style                    Spark's controllable form: [gender, pitch, speed] label indices
    conditioning_latents     IndexTTS: its 32 perceiver latents, flattened (or a .npy / .pt path)

Output: corpus rows (``id``, ``input_ids``, ``prefix_length``, ``prompt_length`` and IndexTTS's
``conditioning_latents``) whose ids are ``[prefix | prompt speech | target speech | stop]``, the
layout the models' own training code uses, ending with the end-of-speech id after the targets:
without it a student never learns to stop (CosyVoice 2's ``Qwen2LM`` targets end with
``speech_token_size``; IndexTTS pads its mel targets with ``stop_mel_token``; Spark ends with
``<|im_end|>``; Llasa with ``<|SPEECH_GENERATION_END|>``; Orpheus with its end-of-speech token).
"""

from __future__ import annotations

from typing import Any, TYPE_CHECKING

import numpy as np

# The record-by-record path (a chunk with a problem, a tokenizer, Spark's labels) builds rows with
# the spec's tensor layout; the builder's batch path (corpus_batch) needs no torch, so a data
# worker imports it only when a chunk takes this path.
if TYPE_CHECKING:
    import torch

__all__ = ["build_row", "build_rows", "code_count", "RowError"]


class RowError(ValueError):
    """A record that cannot become a row; the message names the record and the field."""


def code_count(spec) -> int:
    """How many codec codes the spec's speech ids stand for: its speech range without the stop ids
    and the start-of-speech marker that sit inside it (IndexTTS's start_mel / stop_mel)."""
    lo, hi = spec.speech_range
    if lo < 0:
        raise RowError(f"{spec.name}: speech ids unknown; use spec.with_tokenizer(...) first")
    special = set(spec.stop_token_ids) | {spec.prefix_end_token_id}
    return hi - lo - sum(1 for s in special if lo <= s < hi)


def _ints(record: dict, field: str, required: bool = True) -> list[int]:
    value = record.get(field)
    if value is None:
        if required:
            raise RowError(f"record {record.get('id')!r}: missing field {field!r}")
        return []
    if isinstance(value, list) and set(map(type, value)) <= {int}:  # the JSON case, checked at C speed
        return value
    if not isinstance(value, (list, tuple, np.ndarray)) or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
        raise RowError(f"record {record.get('id')!r}: {field} must be a list of integers")
    return [int(v) for v in value]


def _codes(record: dict, field: str, count: int, required: bool = True) -> torch.Tensor:
    codes = np.asarray(_ints(record, field, required), dtype=np.int64)
    bad = codes[(codes < 0) | (codes >= count)]
    if bad.size:
        raise RowError(f"record {record.get('id')!r}: {field} holds {int(bad[0])}, outside the codec's codes [0, {count})")
    import torch

    return torch.from_numpy(codes)


def _latents(spec, record: dict) -> list[float]:
    value = record.get("conditioning_latents")
    n, dim = spec.latent_shape
    if isinstance(value, str):
        import torch

        try:
            value = (np.load(value) if value.endswith(".npy")
                     else torch.load(value, weights_only=True).float().numpy())
        except (OSError, ValueError, RuntimeError) as err:
            raise RowError(f"record {record.get('id')!r}: conditioning_latents: cannot read {value}: {err}") from None
    if value is None:
        raise RowError(f"record {record.get('id')!r}: missing field 'conditioning_latents' ({n} x {dim} floats)")
    flat = np.asarray(value, dtype=np.float32).reshape(-1)
    if flat.size != n * dim:
        raise RowError(f"record {record.get('id')!r}: conditioning_latents has {flat.size} values; "
                       f"{spec.name} needs {n} x {dim} = {n * dim}")
    return flat.tolist()


def _check_text_ids(spec, record_id, text: list[int]) -> None:
    """Text ids are the tokenizer's: within its vocabulary, never a speech, stop or marker id (a
    negative id would otherwise land on one of those once the layout offsets it)."""
    limit = getattr(spec, "text_vocab_size", None) or spec.vocab_size
    bad = [t for t in text if not 0 <= t < limit]
    if bad:
        raise RowError(f"record {record_id!r}: text_ids holds {bad[0]}, outside the text vocabulary [0, {limit})")
    if getattr(spec, "text_vocab_size", None) is None:  # one shared vocabulary (Spark, Llasa, Orpheus)
        reserved = set(spec.target_id_array().tolist()) | {spec.prefix_end_token_id}
        clash = [t for t in text if t in reserved]
        if clash:
            raise RowError(f"record {record_id!r}: text_ids holds {clash[0]}, a speech, stop or marker id of "
                           f"{spec.name}, not text")


def build_row(spec, record: dict, tokenizer: Any = None) -> dict:
    """One corpus row in ``spec``'s layout, the stop id after the targets. Raises RowError."""
    import torch

    if not isinstance(record, dict):
        raise RowError(f"a record is a {type(record).__name__}, not an object of fields")
    if not record.get("id"):
        raise RowError(f"a record has no id: {sorted(map(str, record))[:6]}")
    if not isinstance(record["id"], (str, int)) or isinstance(record["id"], bool):
        raise RowError(f"a record's id is a {type(record['id']).__name__}, not a string")
    if record.get("text_ids") is not None:
        text = _ints(record, "text_ids")
    elif record.get("text") is not None:
        if tokenizer is None:
            raise RowError(f"record {record['id']!r}: has text but no text_ids; pass the model's tokenizer "
                           "(--tokenizer PATH) to tokenize it")
        text = list(tokenizer(record["text"], add_special_tokens=False)["input_ids"])
    else:
        raise RowError(f"record {record['id']!r}: missing field 'text_ids' (or 'text' with a tokenizer)")
    if not text:
        raise RowError(f"record {record['id']!r}: the text is empty")
    _check_text_ids(spec, record["id"], text)
    count = code_count(spec)
    lo = spec.speech_range[0]
    prompt = _codes(record, "prompt_codes", count, required=False) + lo
    target = _codes(record, "target_codes", count) + lo
    if not len(target):
        raise RowError(f"record {record['id']!r}: target_codes is empty")
    parts = {}
    if spec.global_codes is not None:
        parts["global_tokens"] = _codes(record, "global_codes", spec.global_codes)
    if getattr(spec, "prompt_form", None) == "controllable":  # Spark without reference audio
        parts["style"] = _ints(record, "style")
    target = torch.cat([target, torch.tensor([spec.stop_token_ids[0]])])
    try:
        ids, prefix = spec.layout(torch.tensor(text, dtype=torch.long), prompt, target, **parts)
    except ValueError as err:
        raise RowError(f"record {record['id']!r}: {err}") from None
    if int(ids.max()) >= spec.vocab_size or int(ids.min()) < 0:
        raise RowError(f"record {record['id']!r}: text_ids fall outside {spec.name}'s vocabulary [0, {spec.vocab_size})")
    row = {"id": str(record["id"]), "input_ids": ids.tolist(), "prefix_length": int(prefix),
           "prompt_length": int(len(prompt))}
    if spec.latent_shape is not None:
        row["conditioning_latents"] = _latents(spec, record)
    return row


def build_rows(spec, records: list[dict], tokenizer: Any = None,
               origins: list[str] | None = None) -> tuple[list[dict], list[str]]:
    """(rows, problems): every record is tried, so one run lists every bad record (each problem
    opens with the record's origin, e.g. its file and line, when ``origins`` gives them)."""
    rows, problems, seen = [], [], set()
    for number, record in enumerate(records):
        where = f"{origins[number]}: " if origins else ""
        try:
            row = build_row(spec, record, tokenizer)
        except RowError as err:
            problems.append(f"{where}{err}")
            continue
        if row["id"] in seen:
            problems.append(f"{where}record {row['id']!r}: duplicate id")
            continue
        seen.add(row["id"])
        rows.append(row)
    return rows, problems
