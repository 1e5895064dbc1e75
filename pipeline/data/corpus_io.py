"""Corpus files in and out, one way for every job and benchmark: ``write_corpus`` (one Parquet file,
written whole or not at all, local or s3://) and ``read_rows`` (the evals' held-out rows, by id).
The precompute reads corpora with Ray Data (``pipeline.data.precompute``), as many files in parallel.
"""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage

__all__ = ["read_rows", "write_corpus", "CORPUS_FILE"]

CORPUS_FILE = "corpus.parquet"


def write_corpus(rows: list[dict], uri: str, endpoint: str | None = None, name: str = CORPUS_FILE) -> str:
    """``rows`` as ``<uri>/<name>``, written whole or not at all; returns where it went."""
    fs, root = storage.resolve(uri, endpoint)
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    storage.write_bytes(fs, storage.join(root, name), buffer.getvalue())
    return storage.join(uri, name)


# ----------------------------------------------------------------------------- inputs
def read_rows(uri: str, endpoint: str | None, limit: int | None) -> list[dict]:
    """The first ``limit`` rows (by id; None: all) of a corpus folder of Parquet or JSONL files."""
    import pyarrow.parquet as pq

    fs, path = storage.resolve(uri, endpoint)
    files = storage.list_files(fs, path, (".parquet", ".jsonl"))
    if not files:
        raise ValueError(f"evaluate.corpus: no .parquet or .jsonl files under {uri}")
    rows: list[dict] = []
    for name in files:
        if name.endswith(".parquet"):
            rows.extend(pq.read_table(name, filesystem=fs).to_pylist())
        else:
            text = storage.read_bytes(fs, name).decode()
            rows.extend(json.loads(line) for line in text.splitlines() if line.strip())
    rows.sort(key=lambda r: str(r["id"]))
    return rows[:limit]
