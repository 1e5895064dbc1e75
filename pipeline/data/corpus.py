"""The tokenized TTS corpus: its schema, and the checks every row passes before anything is written.

One row per utterance (Parquet or JSONL, local or ``s3://``):

| column | type | meaning |
|---|---|---|
| ``id`` | string | unique utterance id |
| ``input_ids`` | list<int> | prefix + target speech tokens, in the model spec's id space |
| ``prefix_length`` | int | conditioning prefix length P (marker + prompt speech included); 1 <= P < len |
| ``prompt_length`` | int, optional | prompt speech tokens inside the prefix (informational) |
| ``conditioning_latents`` | list<float>, IndexTTS only | the 32 perceiver latents, flattened (32 x 1280) |

Targets (positions >= P) must be speech or stop ids of the spec (``spec.target_ids()``): the
losses and the teacher's top-k apply there only.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from wand.models import ModelSpec

__all__ = ["REQUIRED_COLUMNS", "CHECK_SCHEMA", "RowChecker", "check_batch", "required_columns", "row_hash",
           "row_hashes"]

REQUIRED_COLUMNS = ("id", "input_ids", "prefix_length")
CHECK_SCHEMA = pa.schema([("id", pa.string()), ("path", pa.string()), ("length", pa.int64()),
                          ("row_hash", pa.string()), ("reason", pa.string())])


def required_columns(spec: ModelSpec) -> tuple[str, ...]:
    return REQUIRED_COLUMNS + spec.row_columns


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_batch(batch: pa.Table, spec: ModelSpec) -> pa.Table:
    """Ray Data map_batches function: one output row per input row (id, path, length, hash, reason)."""
    return RowChecker(spec)(batch)


class RowChecker:
    """Checks rows against the schema and a model spec's vocabulary."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.vocab = spec.vocab_size
        self.targets = set(spec.target_id_array().tolist())
        self.target_array = np.asarray(sorted(self.targets), dtype=np.int64)

    def __call__(self, batch: pa.Table) -> pa.Table:
        names = set(batch.column_names)
        n = batch.num_rows
        col = {c: (batch.column(c).to_pylist() if c in names else [None] * n)
               for c in required_columns(self.spec) + ("path", "prompt_length")}
        out = {f: [] for f in CHECK_SCHEMA.names}
        for i in range(n):
            row = {c: col[c][i] for c in col}
            reason = self.reason(row)
            ids = row["input_ids"] or []
            out["id"].append(row["id"] if row["id"] is not None else f"<missing id: row {i} of its batch>")
            out["path"].append(row["path"] or "")
            out["length"].append(len(ids))
            out["row_hash"].append(row_hash(row))
            out["reason"].append(reason)
        return pa.table(out, schema=CHECK_SCHEMA)

    def reason(self, row: dict) -> str | None:
        for column in required_columns(self.spec):
            if row[column] is None or (column == "id" and row[column] == ""):
                return f"missing column '{column}'"
        prefix = row["prefix_length"]
        if not _is_int(prefix):
            if isinstance(prefix, float) and prefix == prefix and prefix.is_integer():
                return (f"prefix_length {prefix} is a float, not an integer (pandas writes a float column when "
                        "any value is missing): write the column as int64")
            return f"prefix_length {prefix!r} is not an integer"
        raw = row["input_ids"]
        if not (isinstance(raw, list) and set(map(type, raw)) <= {int}) and not all(_is_int(v) for v in raw):
            bad = next(v for v in raw if not _is_int(v))
            return f"input_ids holds {bad!r} ({type(bad).__name__}): token ids must be integers"
        ids = np.asarray(raw, dtype=np.int64)
        if not 1 <= prefix < len(ids):
            return f"prefix_length {prefix} outside [1, {len(ids)}) (every row needs a prefix and at least one target token)"
        outside = np.nonzero((ids < 0) | (ids >= self.vocab))[0]
        if outside.size:
            j = int(outside[0])
            return f"token id {int(ids[j])} at position {j} outside the vocabulary [0, {self.vocab})"
        targets = ids[prefix:]  # sorted target ids: a binary search per token, no set lookups
        found = np.searchsorted(self.target_array, targets).clip(max=len(self.target_array) - 1)
        stray = np.nonzero(self.target_array[found] != targets)[0]
        if stray.size:
            j = prefix + int(stray[0])
            return f"target token {int(ids[j])} at position {j} is not a speech or stop id of {self.spec.name}"
        return self.spec.row_problem(row)


def row_hash(row: dict) -> str:
    """Content hash of one row (id, tokens, prefix, latents): the input fingerprint is built from these."""
    digest = hashlib.sha256()
    digest.update(str(row.get("id")).encode())
    ids = row.get("input_ids")
    digest.update(np.asarray([] if ids is None else ids, dtype=np.int64).tobytes())
    digest.update(str(row.get("prefix_length")).encode())
    if row.get("conditioning_latents") is not None:
        digest.update(np.asarray(row["conditioning_latents"], dtype=np.float32).tobytes())
    return digest.hexdigest()


def row_hashes(ids: list, flat: np.ndarray, offsets: np.ndarray, prefix: np.ndarray,
               latents: np.ndarray | None = None) -> list[str]:
    """``row_hash`` of every row of a flat batch (row i: ``flat[offsets[i]:offsets[i + 1]]``, its prefix
    length and its slice of ``latents``), the same digests without a dict or an array per row: the
    corpus builder's hot loop at a million rows."""
    data = memoryview(np.ascontiguousarray(flat, dtype=np.int64)).cast("B")
    bounds = (8 * np.asarray(offsets, dtype=np.int64)).tolist()
    lat, width = None, 0
    if latents is not None:
        lat = memoryview(np.ascontiguousarray(latents, dtype=np.float32)).cast("B")
        width = 4 * (len(latents) // max(1, len(ids)))
    sha256 = hashlib.sha256
    out = []
    for i, (row_id, p) in enumerate(zip(ids, np.asarray(prefix).tolist())):
        digest = sha256(str(row_id).encode())
        digest.update(data[bounds[i]:bounds[i + 1]])
        digest.update(str(p).encode())
        if lat is not None:
            digest.update(lat[i * width:(i + 1) * width])
        out.append(digest.hexdigest())
    return out
