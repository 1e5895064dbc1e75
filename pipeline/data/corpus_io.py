"""Corpus files in and out, one way for every job and benchmark: ``write_corpus`` (one Parquet file,
written whole or not at all, local or s3://), the corpus manifest (``corpus.json``, written last by
the builder, ``pipeline.data.corpus_build``), ``corpus_files`` (the files a reader may trust) and
``read_rows`` (the evals' held-out rows, by id). The precompute reads the files of ``corpus_files``
with Ray Data (``pipeline.data.precompute``), as many files in parallel.
"""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage

__all__ = ["corpus_files", "read_manifest", "read_rows", "write_corpus", "write_manifest", "CORPUS_FILE", "MANIFEST"]

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
    manifest = read_manifest(uri, endpoint) if storage.exists(fs, root) and \
        fs.get_file_info(root).type.name == "Directory" else None
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
    """The first ``limit`` rows (by id; None: all) of a corpus folder of Parquet or JSONL files."""
    import pyarrow.parquet as pq

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
    return rows[:limit]
