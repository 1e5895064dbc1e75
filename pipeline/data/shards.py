"""The teacher top-k shard contract, in one place: the format and its metadata, how values are
encoded, the manifest (written by the precompute, read as untrusted input by training and the
evals), reading one shard back (checksum and content checks) and turning its rows into the
sparse teacher targets a training step needs.
"""

from __future__ import annotations

import hashlib
import io
import math
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from wand.distill import SparseTeacher

from pipeline import storage
from pipeline.config import PrecomputeConfig

MANIFEST = "manifest.json"


FORMAT = "wand-teacher-topk/1"


def index_type(target_vocab: int) -> pa.DataType:
    """Smallest unsigned integer type that holds every compact target index."""
    if target_vocab <= 1 << 8:
        return pa.uint8()
    if target_vocab <= 1 << 16:
        return pa.uint16()
    return pa.uint32()


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def encode_values(values: torch.Tensor, value_dtype: str) -> tuple[np.ndarray, pa.DataType]:
    if value_dtype == "float16":
        return values.to(torch.float16).numpy(), pa.float16()
    if value_dtype == "bfloat16":  # Arrow has no bf16: keep its bits in uint16 (decode with decode_values)
        return values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), pa.uint16()
    return values.to(torch.float32).numpy(), pa.float32()


def decode_values(array: np.ndarray, value_dtype: str) -> torch.Tensor:
    """Inverse of ``encode_values``: stored top-k values -> float32 log-probs."""
    if value_dtype == "bfloat16":
        bits = np.ascontiguousarray(np.asarray(array, dtype=np.uint16)).view(np.int16)
        return torch.from_numpy(bits).view(torch.bfloat16).float()
    return torch.from_numpy(np.asarray(array)).float()


def shard_metadata(config: PrecomputeConfig, target_vocab: int) -> dict:
    return {"format": FORMAT, "k": str(config.k), "temperature": str(config.temperature),
            "value_dtype": config.value_dtype, "teacher": config.model, "target_vocab_size": str(target_vocab)}


def build_shard_table(rows, results, k: int, value_dtype: str, target_vocab: int,
                      metadata: dict | None = None) -> pa.Table:
    """Rows with their teacher top-k (``topk_of_rows``) as one shard's table; ``metadata`` goes into
    its schema as ``wand.<key>``. The training worker reads these columns back with ``shard_topk``."""
    counts = np.array([len(res[1]) for res in results], dtype=np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    values, value_type = encode_values(torch.cat([res[0] for res in results]), value_dtype)
    idx_type = index_type(target_vocab)
    indices = np.concatenate([res[1] for res in results]).astype(idx_type.to_pandas_dtype())
    rests = np.concatenate([res[2] for res in results])

    def nested(flat: np.ndarray, dtype: pa.DataType) -> pa.Array:
        inner = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=dtype), k)
        return pa.ListArray.from_arrays(offsets, inner)

    columns = {
        "id": pa.array([r["id"] for r in rows], type=pa.string()),
        "input_ids": pa.array([r["input_ids"] for r in rows], type=pa.list_(pa.int32())),
        "prefix_length": pa.array([r["prefix_length"] for r in rows], type=pa.int32()),
        "topk_indices": nested(indices, idx_type),
        "topk_logprobs": nested(values, value_type),
        "rest_logprob": pa.ListArray.from_arrays(offsets, pa.array(rests, type=pa.float32())),
    }
    for optional, dtype in (("prompt_length", pa.int32()), ("conditioning_latents", pa.list_(pa.float32()))):
        if optional in rows[0]:
            columns[optional] = pa.array([r[optional] for r in rows], type=dtype)
    table = pa.table(columns)
    return table.replace_schema_metadata({f"wand.{key}": value for key, value in (metadata or {}).items()})


def load_manifest(uri: str, endpoint: str | None = None) -> dict:
    """The shards' manifest, checked as untrusted input: JSON of the expected shape, shard files
    confined to the shard folder, row counts that add up. A ValueError names the file and the field."""
    fs, root = storage.resolve(uri, endpoint)
    path = storage.join(root, MANIFEST)
    if not storage.exists(fs, path):
        raise FileNotFoundError(f"no {MANIFEST} under {uri}: run the precompute stage first")
    where = storage.join(uri, MANIFEST)
    try:
        manifest = storage.read_json(fs, path)
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{where}: not a JSON manifest ({str(err)[:120]}); rerun the precompute") from None
    check_manifest(manifest, where, root, fs)
    return manifest


def check_manifest(manifest, where: str, root: str, fs) -> None:
    """The fields training and the evals read, of the types they need (see ``run_precompute``)."""
    def need(ok: bool, field: str, what: str) -> None:
        if not ok:
            raise ValueError(f"{where}: {field}: {what}; rerun the precompute (jobs/precompute.py) to rewrite it")

    need(isinstance(manifest, dict), "(top level)", "must be a JSON object")
    teacher = manifest.get("teacher")
    need(isinstance(teacher, dict) and isinstance(teacher.get("preset"), str), "teacher",
         "missing or malformed (an object with preset, size, source, fingerprint)")
    for field in ("k", "rows"):
        value = manifest.get(field)
        need(isinstance(value, int) and not isinstance(value, bool) and value >= 1, field, "must be an integer >= 1")
    temperature = manifest.get("temperature")
    need(isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0, "temperature",
         "must be a finite number > 0")
    shards = manifest.get("shards")
    need(isinstance(shards, list) and len(shards) >= 1, "shards", "must be a non-empty list")
    for number, shard in enumerate(shards):
        field = f"shards[{number}]"
        need(isinstance(shard, dict), field, "must be an object with file, rows, sha256")
        rows, sha = shard.get("rows"), shard.get("sha256")
        need(isinstance(rows, int) and not isinstance(rows, bool) and rows >= 1, f"{field}.rows", "must be an integer >= 1")
        need(isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha) is not None, f"{field}.sha256",
             "must be a sha256 hex digest")
        try:
            storage.confined(root, shard.get("file"), fs, f"{field}.file")
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
    total = sum(s["rows"] for s in shards)
    need(total == manifest["rows"], "rows", f"says {manifest['rows']}, its shards hold {total}")


def verify_manifest(manifest: dict, *, teacher: str, k: int | None = None, temperature: float | None = None,
                    teacher_fingerprint: str | None = None) -> None:
    """Refuse shards computed with other settings than the training config expects."""
    problems = []
    if manifest.get("format") != FORMAT:
        problems.append(f"format {manifest.get('format')!r} (expected {FORMAT!r})")
    if manifest["teacher"]["preset"] != teacher:
        problems.append(f"teacher {manifest['teacher']['preset']!r} (config: {teacher!r})")
    if k is not None and manifest["k"] < k:
        problems.append(f"k={manifest['k']} (config needs {k})")
    if temperature is not None and manifest["temperature"] != temperature:
        problems.append(f"temperature={manifest['temperature']} (config: {temperature})")
    if teacher_fingerprint is not None and manifest["teacher"]["fingerprint"] != teacher_fingerprint:
        problems.append("teacher weights fingerprint differs")
    if problems:
        raise ValueError("teacher shards do not match the config: " + "; ".join(problems))


class ShardCorrupt(RuntimeError):
    """A shard file whose bytes are not the ones the precompute wrote (flipped, truncated, replaced)."""


def read_shard(fs, path: str, sha256: str, limits: tuple[int, int] | None = None) -> pa.Table:
    """A shard's table, after checking its bytes against the checksum the manifest recorded: a
    shard changed on storage is refused by name before any of its rows reach training. With ``limits``
    (vocabulary size, speech-target count) its contents are checked too (``check_shard``)."""
    data = storage.read_bytes(fs, path)
    found = hashlib.sha256(data).hexdigest()
    if found != sha256:
        raise ShardCorrupt(f"{path}: {len(data)} bytes whose sha256 ({found[:12]}...) is not the manifest's "
                           f"({sha256[:12]}...): the shard changed after it was written. Rerun the precompute "
                           "(jobs/precompute.py, or the whole chain): it recomputes shards that fail their checksum")
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as err:
        raise ShardCorrupt(f"{path}: not a readable Parquet shard ({str(err)[:200]})") from None
    if limits is not None:
        check_shard(table, path, *limits)
    return table


def check_shard(table: pa.Table, path: str, vocab_size: int, target_vocab: int) -> None:
    """A shard is input like any other (its checksum only proves it is the file the manifest
    names, and both could be rewritten together): token ids within the model's vocabulary, top-k
    indices within its speech targets, log-probabilities finite and <= 0."""
    import pyarrow.compute as pc

    needed = ("input_ids", "prefix_length", "topk_indices", "topk_logprobs", "rest_logprob")
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise ShardCorrupt(f"{path}: lacks the column(s) {missing}")

    def flat(column: str):
        values = table.column(column).combine_chunks()
        while pa.types.is_list(values.type) or pa.types.is_large_list(values.type) \
                or pa.types.is_fixed_size_list(values.type):
            values = values.flatten()
        return values

    for column, what in (("input_ids", f"token ids outside the vocabulary [0, {vocab_size})"),
                         ("topk_indices", f"top-k indices outside the speech targets [0, {target_vocab})")):
        values = flat(column)
        limit = vocab_size if column == "input_ids" else target_vocab
        if values.null_count or (len(values) and (pc.min(values).as_py() < 0 or pc.max(values).as_py() >= limit)):
            raise ShardCorrupt(f"{path}: {column} holds {what}; rerun the precompute")
    for column in ("topk_logprobs", "rest_logprob"):
        # -inf is a real log-probability (of a rest the top-k leaves empty); NaN and anything above 0 are not.
        values = flat(column)
        array = values.to_numpy(zero_copy_only=False)
        if array.dtype == np.uint16:  # bfloat16 bits (teacher_topk.encode_values): the high half of a float32
            array = (array.astype(np.uint32) << 16).view(np.float32)
        if values.null_count or (array.size and (np.isnan(array).any() or float(array.max()) > 1e-3)):
            raise ShardCorrupt(f"{path}: {column} holds NaN or log-probabilities above 0; rerun the precompute")


def shard_topk(rows: list[dict], target_ids: torch.Tensor, k: int, value_dtype: str) -> SparseTeacher:
    """The teacher's top-k that the shards store with each row, in collate's position order."""
    values = decode_values(np.concatenate([np.asarray(r["topk_logprobs"]) for r in rows]).reshape(-1, k), value_dtype)
    compact = torch.as_tensor(np.concatenate([np.asarray(r["topk_indices"], dtype=np.int64) for r in rows]).reshape(-1, k))
    rest = torch.as_tensor(np.concatenate([np.asarray(r["rest_logprob"], dtype=np.float32) for r in rows]))
    return SparseTeacher(values, target_ids[compact], rest)
