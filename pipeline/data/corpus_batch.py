"""The corpus builder's fast path: a whole chunk of records laid out and checked at once, in Arrow
and numpy, instead of one ``build_row`` and one ``RowChecker.reason`` per record.

It is a screen, not a second authority: it lays rows out from the spec's own ``layout_plan`` (the
definition ``spec.layout`` uses), and accepts a chunk only when every record passes checks that are
at least as strict as ``build_row``'s and the precompute's row checks (types, code and text ranges,
reserved ids, empty parts, the vocabulary, target ids, ``spec.row_problem``'s limits, duplicate ids
in the chunk). Anything else (one bad record, a field of another type, text without ``text_ids``, a
latents path, Spark's controllable form) returns None and the chunk goes through the per-record path,
which names every problem. So a good chunk costs a few vectorised passes, and a bad one is reported
exactly as before. ``tests/data/test_corpus_batch.py`` checks both paths agree record by record.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from pipeline.data.corpus import row_hashes
from pipeline.data.corpus_builder import code_count, RowError
from wand.models import ModelSpec

__all__ = ["BatchBuilder"]

INTS = pa.list_(pa.int64())


class BatchBuilder:
    """``build(table)`` -> (rows table, row hashes) for a chunk of records in the user's format, or
    None when the chunk needs the per-record path. One per task; holds no rows between chunks."""

    def __init__(self, spec):
        self.spec = spec
        try:
            self.plan = spec.layout_plan()
        except (ValueError, TypeError):  # needs per-record labels (Spark's controllable form)
            self.plan = None
        lo = spec.speech_range[0]
        try:
            self.codes = code_count(spec)
        except RowError:
            self.plan = None
            self.codes = 0
        self.lo, self.stop, self.vocab = lo, spec.stop_token_ids[0], spec.vocab_size
        self.text_limit = getattr(spec, "text_vocab_size", None) or spec.vocab_size
        self.reserved = None
        if getattr(spec, "text_vocab_size", None) is None:  # one shared vocabulary: text must not hit these
            self.reserved = np.unique(np.append(spec.target_id_array(), spec.prefix_end_token_id))
        self.is_target = np.zeros(spec.vocab_size, dtype=bool)  # a lookup per token: faster than a search
        self.is_target[spec.target_id_array()] = True
        fields = [("id", pa.string()), ("text_ids", INTS), ("prompt_codes", INTS), ("target_codes", INTS)]
        if spec.global_codes is not None:
            fields.append(("global_codes", INTS))
        if spec.latent_shape is not None:
            fields.append(("conditioning_latents", pa.list_(pa.float64())))  # read as JSON doubles, then float32 as build_row does
        self.schema = pa.schema(fields)
        self.json_options = pj.ParseOptions(explicit_schema=self.schema, unexpected_field_behavior="ignore")

    # ------------------------------------------------------------------ inputs
    def from_json_lines(self, lines: list[bytes]) -> pa.Table | None:
        """Raw JSONL lines (no blank ones) -> a table of the record fields, or None (not plain JSON
        objects of the expected types: the per-record path says what is wrong)."""
        blob = b"\n".join(lines)
        try:
            blob.decode("utf-8")
            table = pj.read_json(io.BytesIO(blob), parse_options=self.json_options,
                                 read_options=pj.ReadOptions(use_threads=False, block_size=max(1 << 20, len(blob) + 1)))
        except (pa.ArrowInvalid, UnicodeDecodeError):
            return None
        return table if table.num_rows == len(lines) else None

    def from_arrow(self, table: pa.Table) -> pa.Table | None:
        """A Parquet batch -> the record fields as this builder reads them, or None (other types)."""
        columns = {}
        for field in self.schema:
            if field.name not in table.column_names:
                columns[field.name] = pa.nulls(table.num_rows, field.type)
                continue
            column = table.column(field.name)
            kind = column.type
            if field.name == "id":
                if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
                    return None
            elif not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not (
                    pa.types.is_integer(kind.value_type) if field.type == INTS else pa.types.is_floating(kind.value_type)):
                return None
            try:
                columns[field.name] = column.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                return None
        return pa.table(columns, schema=self.schema)

    # ------------------------------------------------------------------ the chunk
    def build(self, table: pa.Table) -> tuple[pa.Table, list[str]] | None:
        if self.plan is None or not table.num_rows:
            return None
        n = table.num_rows
        ids = table.column("id").combine_chunks()
        if ids.null_count or pc.any(pc.equal(pc.utf8_length(ids), 0)).as_py() or pc.count_distinct(ids).as_py() != n:
            return None
        parts = {}
        for name in ("text_ids", "prompt_codes", "target_codes", "global_codes"):
            if name in table.column_names:
                parts[name] = _lists(table.column(name).combine_chunks(), required=name != "prompt_codes")
                if parts[name] is None:
                    return None
        text, (prompt, prompt_len), (target, target_len) = (
            parts["text_ids"], parts["prompt_codes"], parts["target_codes"])
        if not (text[1].all() and target_len.all()):  # empty text or targets
            return None
        if not _within(text[0], 0, self.text_limit) or (
                self.reserved is not None and np.isin(text[0], self.reserved).any()):
            return None
        if not (_within(prompt, 0, self.codes) and _within(target, 0, self.codes)):
            return None
        glob = parts.get("global_codes")
        if glob is not None and not _within(glob[0], 0, self.spec.global_codes):
            return None
        has_prompt = any(step[0] == "prompt" for step in self.plan)
        if not has_prompt and prompt_len.any():
            return None
        variable = {"text": text, "prompt": (prompt + self.lo, prompt_len),
                    "generated": (target + self.lo, target_len), "global": glob}
        flat, offsets, prefix = self._assemble(variable, n)
        if flat.size and (flat.min() < 0 or flat.max() >= self.vocab):
            return None
        latents = None
        if self.spec.latent_shape is not None:
            latents = self._latents(table.column("conditioning_latents").combine_chunks())
            if latents is None:
                return None
        lengths = np.diff(offsets)
        if not ((prefix >= 1) & (prefix < lengths)).all():
            return None
        # every token from the prefix on must be a speech or stop id (the precompute's check)
        after = np.repeat(offsets[:-1] + prefix, lengths - prefix) + _ranges(lengths - prefix)
        if not self.is_target[flat[after]].all():
            return None
        id_list = ids.to_pylist()
        rows = {"id": pa.array(id_list, pa.string()),
                "input_ids": pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(flat)),
                "prefix_length": pa.array(prefix), "prompt_length": pa.array(prompt_len)}
        width = int(np.prod(self.spec.latent_shape)) if latents is not None else 0
        if latents is not None:  # as build_row stores them: float32 values as Python floats (list<double>)
            rows["conditioning_latents"] = pa.ListArray.from_arrays(
                pa.array(np.arange(n + 1, dtype=np.int32) * width), pa.array(latents.astype(np.float64)))
        if type(self.spec).row_problem is ModelSpec.row_problem:  # the base limits, on the whole chunk at once
            if any(np.any(over) for over in self.spec.over_limits(lengths, prefix)):
                return None
        else:  # a model with limits of its own (IndexTTS's text tokens): its check, row by row
            for i in range(n):
                row = {"id": id_list[i], "input_ids": flat[offsets[i]:offsets[i + 1]], "prefix_length": int(prefix[i]),
                       "prompt_length": int(prompt_len[i])}
                if latents is not None:
                    row["conditioning_latents"] = latents[i * width:(i + 1) * width]
                if self.spec.row_problem(row):
                    return None
        return pa.table(rows), row_hashes(id_list, flat, offsets, prefix, latents)

    def _assemble(self, variable: dict, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The plan over the whole chunk: flat ids, row offsets, prefix lengths."""
        steps = []  # (values or None, per-row lengths, constant ids or None)
        prefix = None
        for kind, *arg in self.plan:
            if kind == "prefix":
                prefix = sum(lengths for _, lengths, _ in steps) if steps else np.zeros(n, np.int64)
            elif kind == "ids":
                steps.append((None, np.full(n, len(arg[0]), np.int64), np.asarray(arg[0], np.int64)))
            elif kind in ("text", "global"):
                values, lengths = variable[kind]
                steps.append((values + arg[0], lengths, None))
            else:
                steps.append((*variable[kind], None))
                if kind == "generated":  # the stop id after the targets, as build_row appends it
                    steps.append((None, np.ones(n, np.int64), np.asarray([self.stop], np.int64)))
        lengths = sum(step[1] for step in steps)
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.empty(int(offsets[-1]), np.int64)
        position = offsets[:-1].copy()
        for values, step_lengths, constant in steps:
            if constant is not None:
                flat[(position[:, None] + np.arange(len(constant))).reshape(-1)] = np.tile(constant, n)
            elif values.size:
                flat[np.repeat(position, step_lengths) + _ranges(step_lengths)] = values
            position += step_lengths
        return flat, offsets, np.asarray(prefix, np.int64)

    def _latents(self, column: pa.Array) -> np.ndarray | None:
        """Every row's latents, flat, as float32 (build_row's rounding), or None (missing, wrong size)."""
        count, dim = self.spec.latent_shape
        lengths = pc.list_value_length(column)
        if column.null_count or not pc.all(pc.equal(lengths, count * dim)).as_py():
            return None
        values = column.flatten()
        if values.null_count:
            return None
        return values.to_numpy().astype(np.float32)


def _lists(column: pa.Array, required: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """(flat values, per-row lengths) of a list<int64> column; a missing list is empty unless
    ``required`` (then None, as is a null inside a list)."""
    if column.null_count and required:
        return None
    values = column.flatten()
    if values.null_count:
        return None
    lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    return values.to_numpy(zero_copy_only=False).astype(np.int64, copy=False), lengths


def _within(values: np.ndarray, low: int, high: int) -> bool:
    return not values.size or (values.min() >= low and values.max() < high)


def _ranges(lengths: np.ndarray) -> np.ndarray:
    """0..len-1 for each length, concatenated."""
    total = int(lengths.sum())
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.arange(total, dtype=np.int64) - starts
