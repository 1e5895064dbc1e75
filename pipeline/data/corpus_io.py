"""Corpus files in and out, one way for every job and benchmark: ``write_corpus`` (one Parquet file,
written whole or not at all, local or s3://), the corpus manifest (``corpus.json``, written last by
the builder, ``pipeline.data.corpus_build``), ``corpus_files`` (the files a reader may trust) and
``read_rows`` (the evals' held-out rows, by id), ``file_batches`` (one file in bounded batches: the
precompute's check). The precompute reads the files of ``corpus_files`` with Ray Data
(``pipeline.data.precompute``), as many files in parallel.
"""

from __future__ import annotations

import io
import json
import random

from typing import Iterator

import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipeline import storage

__all__ = ["corpus_files", "file_batches", "read_manifest", "read_rows", "sample_rows", "write_corpus", "write_manifest", "CORPUS_FILE", "MANIFEST"]

CORPUS_FILE = "corpus.parquet"
MANIFEST = "corpus.json"
STAGING = "_staging"


def write_manifest(manifest: dict, uri: str, endpoint: str | None = None) -> None:
    fs, root = storage.resolve(uri, endpoint)
    storage.write_json(fs, storage.join(root, MANIFEST), manifest)


def read_manifest(uri: str, endpoint: str | None = None) -> dict | None:
    """The corpus manifest of folder ``uri``, or None when it has none (a corpus made by hand)."""
    fs, root = storage.resolve(uri, endpoint)
    path = storage.join(root, MANIFEST)
    return storage.read_json(fs, path) if storage.exists(fs, path) else None


def corpus_files(uri: str, endpoint: str | None, field: str = "corpus") -> list[str]:
    """The data files of corpus ``uri`` (filesystem paths, sorted): the manifest's when it has one
    (each checked to exist), else every .parquet / .jsonl under it (a corpus made by hand). Files and
    folders named ``_*`` are never corpus data; a folder with a builder's staging prefix and no
    manifest is an unfinished build and is refused."""
    fs, root = storage.resolve(uri, endpoint)
    manifest = _manifest_of(uri, endpoint)
    if manifest is not None:
        files = [storage.join(root, f["name"]) for f in manifest["files"]]
        missing = [f for f in files if not storage.exists(fs, f)]
        if missing:
            raise ValueError(f"{field}: {uri}/{MANIFEST} lists {len(missing)} file(s) that are not there, "
                             f"e.g. {missing[0]}: the corpus was changed after it was built; rebuild it")
        return sorted(files)
    files = storage.list_files(fs, root, (".parquet", ".jsonl"))
    if any(f"/{STAGING}/" in f"/{f[len(root):].lstrip('/')}" for f in files):
        raise ValueError(f"{field}: {uri} holds an unfinished corpus build ({STAGING}/ and no {MANIFEST}): "
                         "run jobs.make_corpus again into a new folder")
    return [f for f in files if not any(part.startswith("_") for part in f[len(root):].split("/") if part)]


def write_corpus(rows: list[dict], uri: str, endpoint: str | None = None, name: str = CORPUS_FILE) -> str:
    """``rows`` as ``<uri>/<name>``, written whole or not at all; returns where it went."""
    fs, root = storage.resolve(uri, endpoint)
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    storage.write_bytes(fs, storage.join(root, name), buffer.getvalue())
    return storage.join(uri, name)


# ----------------------------------------------------------------------------- inputs
def read_rows(uri: str, endpoint: str | None, limit: int | None) -> list[dict]:
    """The evals' rows of a corpus. A built corpus (with its manifest): a seeded sample of ``limit``
    rows (``sample_rows``, seed 0), reading only the row groups that hold them. A corpus made by
    hand: the first ``limit`` rows by id (None: all), which reads it whole."""
    manifest = _manifest_of(uri, endpoint) if limit is not None else None
    if manifest is not None:
        return _sample_built(uri, endpoint, manifest, limit, seed=0)
    return _all_rows(uri, endpoint)[:limit]


def sample_rows(uri: str, endpoint: str | None, count: int, seed: int) -> list[dict]:
    """``count`` rows drawn with ``seed`` (all rows when there are fewer), in id order. With a
    manifest the draw is over row numbers from its per-file counts, and only the files and row
    groups holding the drawn rows are read; without one, over the rows sorted by id."""
    manifest = _manifest_of(uri, endpoint)
    if manifest is None:
        rows = _all_rows(uri, endpoint)
        picked = rows if len(rows) <= count else random.Random(seed).sample(rows, count)
        return sorted(picked, key=lambda r: str(r["id"]))
    return _sample_built(uri, endpoint, manifest, count, seed)


def _sample_built(uri: str, endpoint: str | None, manifest: dict, count: int, seed: int) -> list[dict]:
    """``sample_rows`` of a corpus with its manifest: only the row groups of the drawn rows are read."""
    fs, root = storage.resolve(uri, endpoint)
    total = manifest["rows"]
    wanted = sorted(random.Random(seed).sample(range(total), min(count, total)))
    rows, start = [], 0
    for entry in manifest["files"]:
        end = start + entry["rows"]
        local = [n - start for n in wanted if start <= n < end]
        start = end
        if not local:
            continue
        parquet = pq.ParquetFile(fs.open_input_file(storage.join(root, entry["name"])))
        group_start = 0
        for group in range(parquet.num_row_groups):
            size = parquet.metadata.row_group(group).num_rows
            inside = [n - group_start for n in local if group_start <= n < group_start + size]
            if inside:
                rows.extend(parquet.read_row_group(group).take(inside).to_pylist())
            group_start += size
    return sorted(rows, key=lambda r: str(r["id"]))


def file_batches(fs, path: str, rows: int) -> Iterator[pa.Table]:
    """A corpus file in batches (the precompute's check) of at most ``rows`` rows: Parquet streamed by record batches; JSONL
    read whole (as Ray Data's read_json does: one schema for the file) and sliced."""
    if path.endswith(".parquet"):
        for batch in pq.ParquetFile(fs.open_input_file(path)).iter_batches(batch_size=rows):
            yield pa.Table.from_batches([batch])
        return
    with fs.open_input_stream(path) as stream:
        table = pajson.read_json(stream)
    for start in range(0, table.num_rows, rows):
        yield table.slice(start, rows)


def _manifest_of(uri: str, endpoint: str | None) -> dict | None:
    """The manifest when ``uri`` is a folder that has one (a file, or a folder without: None)."""
    fs, root = storage.resolve(uri, endpoint)
    return read_manifest(uri, endpoint) if fs.get_file_info(root).type.name == "Directory" else None


def _all_rows(uri: str, endpoint: str | None) -> list[dict]:
    fs, _ = storage.resolve(uri, endpoint)
    files = corpus_files(uri, endpoint, "evaluate.corpus")
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
    return rows
