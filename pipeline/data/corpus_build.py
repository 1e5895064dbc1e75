"""The corpus builder at scale, as Ray Data work: each input piece (a JSONL or Parquet file, local or
s3://, or a part of a large one: ``corpus_inputs``) is read, laid out and checked by a task where the
data is, streaming in chunks, and written as Parquet part files of at most ``rows_per_file`` rows to
a staging prefix; the driver only ever holds one small summary per piece. All or nothing: problems (bad records, unreadable lines, duplicate
ids across files) are collected across the cluster, bounded (the first ``max_problems`` per kind,
with their file and line, and a count of the rest), and unless there are none the staging prefix is
removed and nothing is published. Otherwise the parts move into the output folder and the corpus
manifest (``corpus.json``: rows, files with their row counts, the fingerprint, the layout and the
builder's settings) is written last: a corpus folder without it is unfinished.

Fingerprint: the sum of the rows' content hashes (``row_hash``) modulo 2^256, combined from the
tasks' partial sums: the same rows in any files or order give the same fingerprint. Duplicate ids
are found in a second round: every task files its ids into hash buckets on the staging prefix and
one task per bucket counts them, so no process holds every id.
"""

from __future__ import annotations

import io
import json
import logging
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.data.corpus import check_batch
from pipeline.data.corpus_builder import build_rows
from pipeline.data.corpus_batch import BatchBuilder
from pipeline.data.corpus_inputs import chunks_of, count_newlines, first_lines, input_files, PIECE_BYTES, pieces
from pipeline.data.corpus_io import MANIFEST, STAGING, write_manifest

log = logging.getLogger("wand.corpus")

CHUNK = 8192                  # records laid out and checked at once
BUCKET_BYTES = 64 << 20       # input bytes per duplicate-id bucket (about 100k records)
MODULUS = 1 << 256


class CorpusProblems(ValueError):
    """Bad input found while building; the message lists them (bounded) and says nothing was written."""


def add_problem(problems: dict, kind: str, line: str, limit: int) -> None:
    """Keep the first ``limit`` lines of each kind and count the rest."""
    entry = problems.setdefault(kind, {"lines": [], "count": 0})
    entry["count"] += 1
    if len(entry["lines"]) < limit:
        entry["lines"].append(line)


def merge_problems(into: dict, other: dict, limit: int) -> None:
    for kind, entry in other.items():
        mine = into.setdefault(kind, {"lines": [], "count": 0})
        mine["count"] += entry["count"]
        mine["lines"].extend(entry["lines"][:max(0, limit - len(mine["lines"]))])


def combine(fingerprints) -> str:
    """Partial sums of row hashes (hex) -> one order-independent fingerprint (hex)."""
    return format(sum(int(f, 16) for f in fingerprints) % MODULUS, "064x")


def buckets_of(ids: pa.Array, buckets: int) -> np.ndarray:
    """Each id's duplicate-id bucket, for a whole chunk at once: a polynomial hash of its UTF-8 bytes
    (uint64 arithmetic, wrapping), mixed, modulo ``buckets``. The same id gets the same bucket in
    every task, on every machine; ids are never empty (both paths refuse them)."""
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    ids = ids.cast(pa.large_string())  # 64-bit offsets, whatever the input
    offsets = np.frombuffer(ids.buffers()[1], dtype=np.int64)[ids.offset:ids.offset + len(ids) + 1]
    data = np.frombuffer(ids.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]].astype(np.uint64)
    lengths = np.diff(offsets)
    within = np.arange(len(data), dtype=np.int64) - np.repeat(offsets[:-1] - offsets[0], lengths)
    powers = np.cumprod(np.full(int(lengths.max(initial=1)), 1099511628211, dtype=np.uint64))  # FNV prime
    with np.errstate(over="ignore"):
        h = np.add.reduceat(data * powers[within], offsets[:-1] - offsets[0]) if len(data) else np.zeros(0, np.uint64)
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
    return (h % np.uint64(buckets)).astype(np.int64)


class FileBuilder:
    """One input piece (a file, or a part of a large one) -> part files and id buckets under the
    staging prefix, and a small summary. Runs in a Ray Data task (``map``); holds at most one chunk
    and one part file's writer."""

    def __init__(self, spec, source: str, staging: str, endpoint: str | None, rows_per_file: int, buckets: int,
                 max_problems: int, tokenizer_path: str | None = None):
        self.spec, self.source, self.staging, self.endpoint = spec, source, staging, endpoint
        self.rows_per_file, self.buckets, self.max_problems = rows_per_file, buckets, max_problems
        self.tokenizer_path = tokenizer_path

    def __call__(self, row: dict) -> dict:
        item = json.loads(row["piece"])
        tokenizer = None
        if self.tokenizer_path:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        fs, _ = storage.resolve(self.source, self.endpoint)
        out_fs, staging = storage.resolve(self.staging, self.endpoint)
        out_fs.create_dir(staging, recursive=True)
        problems: dict = {}
        parts, records, rows, total = [], 0, 0, 0
        ids: dict[int, list[pa.Table]] = {}  # bucket -> this piece's (id, origin) tables
        writer, sink, part_rows, part_name = None, None, 0, None
        fast = BatchBuilder(self.spec) if tokenizer is None else None
        for chunk in chunks_of(fs, item, CHUNK):
            built = self._fast(fast, chunk)
            if built is not None:  # every record good: laid out and checked as one batch
                table, hashes = built
                origins = chunk.origins()
                records += table.num_rows
            else:  # the per-record path: names every problem of the chunk
                table, hashes, origins, count = self._per_record(chunk, tokenizer, item["path"], problems)
                records += count
                if table is None:
                    continue
            if problems:
                continue  # nothing of this build is published: only count what is left
            total = (total + sum(int(h, 16) for h in hashes)) % MODULUS
            entries = pa.table({"id": table.column("id"), "origin": pa.array(origins, pa.string())})
            buckets = buckets_of(table.column("id"), self.buckets)
            order = np.argsort(buckets, kind="stable")
            for group in np.split(order, np.flatnonzero(np.diff(buckets[order])) + 1):
                ids.setdefault(int(buckets[group[0]]), []).append(entries.take(group))
            start = 0
            while start < table.num_rows:
                if writer is None:
                    part_name = f"part-{item['index']:05d}-{len(parts):04d}.parquet"
                    sink = out_fs.open_output_stream(storage.join(staging, part_name))
                    writer = pq.ParquetWriter(sink, table.schema)
                    part_rows = 0
                take = min(self.rows_per_file - part_rows, table.num_rows - start)
                writer.write_table(table.slice(start, take))
                part_rows, rows, start = part_rows + take, rows + take, start + take
                if part_rows == self.rows_per_file:
                    _close(writer, sink)  # the stream too: an S3 upload completes only when it is closed
                    parts.append({"name": part_name, "rows": part_rows})
                    writer = None
        if writer is not None:
            _close(writer, sink)
            parts.append({"name": part_name, "rows": part_rows})
        for bucket, tables in ids.items():
            folder = storage.join(staging, "_ids", f"{bucket:04d}")
            buffer = io.BytesIO()
            pq.write_table(pa.concat_tables(tables), buffer)
            storage.write_bytes(out_fs, storage.join(folder, f"{item['index']:05d}.parquet"), buffer.getvalue())
        return {"index": item["index"], "path": item["path"], "bytes": item["bytes"], "records": records,
                "rows": rows, "parts": json.dumps(parts), "fingerprint": format(total, "064x"),
                "problems": json.dumps(problems)}

    @staticmethod
    def _fast(fast, chunk):
        if fast is None or chunk.problem:
            return None
        table = fast.from_json_lines([raw for _, raw in chunk.lines]) if chunk.lines is not None \
            else fast.from_arrow(chunk.table)
        return fast.build(table) if table is not None else None

    def _per_record(self, chunk, tokenizer, path: str, problems: dict):
        """One chunk record by record (``build_rows`` and the row checks): every problem is filed;
        returns (rows table, hashes, origins, readable records), the table None when nothing of
        this build will be published (a problem) or nothing is left."""
        read = list(chunk.records())
        for origin, _, problem in read:
            if problem:
                add_problem(problems, "read", problem, self.max_problems)
        good = [(origin, record) for origin, record, problem in read if record is not None]
        built, row_problems = build_rows(self.spec, [r for _, r in good], tokenizer, [o for o, _ in good])
        for line in row_problems:
            add_problem(problems, "record", line, self.max_problems)
        if not built:
            return None, None, None, len(good)
        origin_of = {}  # the built rows' origins (build_rows keeps the first of an id inside a chunk)
        for origin, record in good:
            origin_of.setdefault(str(record.get("id")), origin)
        table = pa.Table.from_pylist(built)
        checks = check_batch(table.append_column("path", pa.array([path] * len(built))), self.spec)
        reasons = checks.column("reason").to_pylist()
        for row, reason in zip(built, reasons):
            if reason:
                add_problem(problems, "record", f"{origin_of[row['id']]}: record {row['id']!r}: {reason}",
                            self.max_problems)
        if any(reasons) or problems:
            return None, None, None, len(good)  # nothing of this build is published anyway; keep counting
        return table, checks.column("row_hash").to_pylist(), [origin_of[r["id"]] for r in built], len(good)


def _close(writer, sink) -> None:
    writer.close()
    if not sink.closed:
        sink.close()


def _rows(items: list[dict]) -> list[dict]:
    """Pieces as Ray Data rows: their fields differ by kind, so each travels as one JSON string."""
    return [{"index": p["index"], "piece": json.dumps(p)} for p in items]


class NewlineCounter:
    """A JSONL byte range -> its newline count (``corpus_inputs.count_newlines``), in a task."""

    def __init__(self, source: str, endpoint: str | None):
        self.source, self.endpoint = source, endpoint

    def __call__(self, row: dict) -> dict:
        piece = json.loads(row["piece"])
        return {"index": piece["index"], "newlines": count_newlines(storage.resolve(self.source, self.endpoint)[0], piece)}


class DuplicateFinder:
    """One id bucket (every task's ids that hash there) -> duplicate-id problems (bounded)."""

    def __init__(self, staging: str, endpoint: str | None, max_problems: int):
        self.staging, self.endpoint, self.max_problems = staging, endpoint, max_problems

    def __call__(self, item: dict) -> dict:
        fs, staging = storage.resolve(self.staging, self.endpoint)
        folder = storage.join(staging, "_ids", f"{item['bucket']:04d}")
        problems: dict = {}
        if storage.exists(fs, folder):
            table = pa.concat_tables([pq.read_table(f, filesystem=fs)
                                      for f in storage.list_files(fs, folder, (".parquet",))])
            # only ids seen more than once come back to Python (a vectorised count first)
            counts = table.group_by("id").aggregate([("id", "count")])
            repeated = counts.filter(pc.greater(counts.column("id_count"), 1)).column("id")
            table = table.filter(pc.is_in(table.column("id"), value_set=repeated.combine_chunks()))
            first: dict[str, str] = {}
            for row_id, origin in zip(table.column("id").to_pylist(), table.column("origin").to_pylist()):
                if row_id in first:
                    add_problem(problems, "duplicate", f"{origin}: record {row_id!r}: duplicate id "
                                f"(first at {first[row_id]})", self.max_problems)
                else:
                    first[row_id] = origin
        return {"bucket": item["bucket"], "problems": json.dumps(problems)}


# ----------------------------------------------------------------------------- driver side
def build_corpus(spec, source: str, output: str, endpoint: str | None = None, rows_per_file: int = 100_000,
                 max_problems: int = 50, tokenizer_path: str | None = None, num_cpus: float = 1.0,
                 settings: dict | None = None, piece_bytes: int = PIECE_BYTES) -> dict:
    """Build ``output`` from the records at ``source`` (Ray must be up); return the manifest.
    Raises CorpusProblems (nothing published) when any record is bad."""
    import os

    import ray.data

    # Tasks run in other processes (other nodes): every local path absolute before it is handed out.
    source, output = [u if storage.is_remote(u) else os.path.abspath(os.path.expanduser(u)) for u in (source, output)]
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    local = [f"{flag} {uri}" for flag, uri in (("--input", source), ("--output", output)) if not storage.is_remote(uri)]
    if nodes > 1 and local:  # the tasks run on other nodes: they can neither read nor write this disk
        raise ValueError(f"this Ray cluster has {nodes} nodes, so the corpus must be read from and written to "
                         f"shared storage (s3://bucket/prefix), not a node's local disk: {', '.join(local)}")
    files = input_files(source, endpoint)
    out_fs, root = storage.resolve(output, endpoint)
    if storage.exists(out_fs, storage.join(root, MANIFEST)) or (
            storage.exists(out_fs, root) and any(i.path.endswith(".parquet") for i in storage.list_dir(out_fs, root))):
        raise ValueError(f"--output {output}: already holds a corpus; write to a new folder")
    staging = storage.join(output, STAGING, uuid.uuid4().hex[:12])
    buckets = max(1, min(256, -(-sum(f["bytes"] for f in files) // BUCKET_BYTES)))
    items = pieces(storage.resolve(source, endpoint)[0], files, piece_bytes)
    numbered = [p for p in items if p.get("end") is not None]  # byte ranges with more of their file after them
    if numbered:  # line numbers as the whole file counts them: one read of the bytes before each piece
        counter = NewlineCounter(source, endpoint)
        counts = {c["index"]: c["newlines"] for c in ray.data.from_items(_rows(numbered)).map(
            counter, num_cpus=num_cpus).iter_rows()}
        starts = first_lines([p for p in items if "start" in p], counts)
        items = [{**p, "first_line": starts[p["index"]]} if p["index"] in starts else p for p in items]
    total_bytes = sum(p["bytes"] for p in items)  # the progress line's unit (a Parquet piece: its row groups' bytes)
    started, done_bytes, records = time.monotonic(), 0, 0
    summaries: list[dict] = []
    problems: dict = {}
    try:
        builder = FileBuilder(spec, source, staging, endpoint, rows_per_file, buckets, max_problems, tokenizer_path)
        for summary in ray.data.from_items(_rows(items)).map(builder, num_cpus=num_cpus).iter_rows():
            summaries.append({**summary, "problems": None})  # the problems are merged (bounded) right here
            merge_problems(problems, json.loads(summary["problems"]), max_problems)
            done_bytes, records = done_bytes + summary["bytes"], records + summary["records"]
            elapsed = time.monotonic() - started
            eta = elapsed * (total_bytes - done_bytes) / done_bytes if done_bytes else float("nan")
            log.info("corpus: %d/%d pieces of %d input file(s), %d records (%.0f records/s), ETA %.0f s",
                     len(summaries), len(items), len(files), records, records / max(elapsed, 1e-9), eta)
        if not problems:
            finder = DuplicateFinder(staging, endpoint, max_problems)
            for found in ray.data.from_items([{"bucket": b} for b in range(buckets)]).map(
                    finder, num_cpus=num_cpus).iter_rows():
                merge_problems(problems, json.loads(found["problems"]), max_problems)
        if not records and not problems:
            raise CorpusProblems(f"--input {source}: holds no records; nothing was written")
        if problems:
            raise CorpusProblems(problem_report(problems, source, records))
        return publish(summaries, staging, output, endpoint, spec, settings or {})
    finally:
        _remove(out_fs, storage.resolve(staging, endpoint)[1])
        parent = storage.join(root, STAGING)
        if storage.exists(out_fs, parent) and not storage.list_dir(out_fs, parent):
            _remove(out_fs, parent)
        if not storage.exists(out_fs, storage.join(root, MANIFEST)) and storage.exists(out_fs, root) \
                and not storage.list_dir(out_fs, root):
            _remove(out_fs, root)  # a failed build leaves no empty output folder behind


def problem_report(problems: dict, source: str, records: int) -> str:
    count = sum(entry["count"] for entry in problems.values())
    lines = [f"{count} problem(s) in {source} ({records} readable record(s)); nothing was written:"]
    for kind in ("read", "record", "duplicate"):
        entry = problems.get(kind)
        if entry:
            lines += [f"  {line}" for line in entry["lines"]]
            if entry["count"] > len(entry["lines"]):
                lines.append(f"  ... and {entry['count'] - len(entry['lines'])} more {kind} problem(s)")
    return "\n".join(lines)


def publish(summaries: list[dict], staging: str, output: str, endpoint: str | None, spec, settings: dict) -> dict:
    """Move the parts from staging into ``output``, then write the manifest (last: its presence says
    the corpus is complete)."""
    fs, staging_path = storage.resolve(staging, endpoint)
    _, root = storage.resolve(output, endpoint)
    files = []
    for summary in sorted(summaries, key=lambda s: s["index"]):
        for part in json.loads(summary["parts"]):
            storage.retrying(fs, "moving", part["name"], lambda p=part: fs.move(
                storage.join(staging_path, p["name"]), storage.join(root, p["name"])))
            files.append({**part, "input": summary["path"]})
    manifest = {"format": "wand-corpus/1", "rows": sum(f["rows"] for f in files), "files": files,
                "fingerprint": combine(s["fingerprint"] for s in summaries),
                "model": spec.name, "size": spec.size, "stop_id": spec.stop_token_ids[0],
                "inputs": {"files": len({s["path"] for s in summaries}), "pieces": len(summaries), "records": sum(s["records"] for s in summaries)},
                "builder": settings}
    write_manifest(manifest, output, endpoint)
    return manifest


def _remove(fs, path: str) -> None:
    try:
        fs.delete_dir(path)
    except (FileNotFoundError, OSError):
        pass
