"""The precompute's corpus check at scale: one Ray Data task per corpus file reads it in batches,
checks every row and reduces it to a small record (id, file number, content hash, reason); the
records are sorted by id on the cluster. The driver then streams the sorted records once, holding
one batch at a time, and derives from them:

* the input fingerprint: the sum of the rows' content hashes modulo 2^256, the same combination as
  the corpus builder's (``corpus.json``), so re-sharding the same rows gives the same value;
* duplicate ids: the copies of an id arrive next to each other; the copy kept is the first valid
  one by (file, content hash), every other copy is a bad row;
* the shard plan: shard s holds the good ids of rank [s * rows_per_shard, (s + 1) * rows_per_shard)
  in id order, so the plan is only the first id of each shard (one id per shard), plus the ids that
  have a bad copy (with the copy to keep): ``assign_shards`` places any row by a binary search.

What grows with the corpus stays on the cluster (the sorted records, in Ray's object store, spilled
to disk when large); the driver's memory grows with the number of shards and of bad rows only (in
fail mode, only the first ``SHOWN_BAD`` bad rows are kept, and a count).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.data.corpus import check_batch, row_hash
from pipeline.data.corpus_io import file_batches

log = logging.getLogger("wand.precompute")

MODULUS = 1 << 256
SHOWN_BAD = 20       # bad rows named in a fail-mode error
STREAM_BATCH = 65_536
CHECK_BATCH = 4096   # rows a check task turns into Python objects at once (a whole block could be 100k)
RECORD_SCHEMA = pa.schema([("id", pa.string()), ("file", pa.int32()), ("hash", pa.binary(32)),
                          ("reason", pa.string())])
# `_run.json` files written before this module recorded the fingerprint as the SHA-256 of the rows'
# sorted hex hashes, without this key; such a run is resumed when that legacy value still matches.
FINGERPRINT_KIND = "sum-of-row-sha256/1"


def check_records(batch: pa.Table, spec, number: int) -> pa.Table:
    """The row checks of one batch of file ``number``, then one small record per row."""
    checks = check_batch(batch, spec)
    return pa.table({"id": checks.column("id"), "file": pa.array([number] * batch.num_rows, pa.int32()),
                     "hash": pa.array([bytes.fromhex(h) for h in checks.column("row_hash").to_pylist()],
                                      pa.binary(32)),
                     "reason": checks.column("reason")}, schema=RECORD_SCHEMA)


def check_files(items: pa.Table, source: str, endpoint: str | None, spec) -> Iterator[pa.Table]:
    """Ray Data map_batches function: corpus files (``file``: number, ``path``) -> the records of
    their rows, ``CHECK_BATCH`` rows at a time (the task never holds a whole Parquet file)."""
    fs, _ = storage.resolve(source, endpoint)
    for number, path in zip(items.column("file").to_pylist(), items.column("path").to_pylist()):
        for batch in file_batches(fs, path, CHECK_BATCH):
            if "path" in batch.column_names:  # a corpus column of that name: the file's path is what counts here
                batch = batch.drop_columns(["path"])
            yield check_records(batch.append_column("path", pa.array([path] * batch.num_rows, pa.string())),
                                spec, number)


def file_records(files: list[str], source: str, endpoint: str | None, spec, num_cpus: float):
    """The Dataset of every row's record: one task per corpus file, streaming."""
    import ray.data

    items = ray.data.from_items([{"file": i, "path": p} for i, p in enumerate(files)], override_num_blocks=len(files))
    return items.map_batches(check_files, fn_kwargs={"source": source, "endpoint": endpoint, "spec": spec},
                             batch_size=1, batch_format="pyarrow", num_cpus=num_cpus)


@dataclass
class CorpusCheck:
    rows: int = 0                   # rows read, bad ones included
    good: int = 0                   # distinct ids that go into shards
    bad_count: int = 0
    bad: list[dict] = field(default_factory=list)          # {id, path, reason}; all, or the first SHOWN_BAD
    fingerprint: str = ""
    boundaries: list[str] = field(default_factory=list)    # the first id of each shard
    special: dict[str, tuple[str, str] | None] = field(default_factory=dict)  # id -> kept (path, hash) or None

    @property
    def shards(self) -> int:
        return len(self.boundaries)

    def plan(self, done: set[int], files: list[str]) -> dict:
        """What ``assign_shards`` needs (small: one id per shard, the ids with bad copies, the files)."""
        return {"boundaries": self.boundaries, "special": self.special, "done": sorted(done), "files": files}


def check_corpus(files: list[str], source: str, endpoint: str | None, spec, rows_per_shard: int, keep_all_bad: bool,
                 num_cpus: float) -> CorpusCheck:
    """Check every row of the corpus ``files`` (under ``source``) and plan the shards; see the module doc."""
    records = file_records(files, source, endpoint, spec, num_cpus)
    result = CorpusCheck()
    total, started, last_log = 0, time.monotonic(), time.monotonic()
    run_id, run = None, []  # the copies of the id being read: (file, hash, reason)
    for batch in records.sort("id").iter_batches(batch_size=STREAM_BATCH, batch_format="pyarrow"):
        ids, numbers_, reasons = (batch.column(c).to_pylist() for c in ("id", "file", "reason"))
        hashes = batch.column("hash").to_pylist()
        for row_id, number, digest, reason in zip(ids, numbers_, hashes, reasons):
            total += int.from_bytes(digest, "big")
            if row_id != run_id:
                if run:
                    _settle(result, run_id, run, files, rows_per_shard, keep_all_bad)
                run_id, run = row_id, []
            run.append((number, digest, reason))
        result.rows += batch.num_rows
        if time.monotonic() - last_log > 10:
            last_log = time.monotonic()
            log.info("precompute: checked %d rows (%.0f rows/s)", result.rows, result.rows / (last_log - started))
    if run:
        _settle(result, run_id, run, files, rows_per_shard, keep_all_bad)
    result.fingerprint = format(total % MODULUS, "064x")
    return result


def _settle(result: CorpusCheck, row_id: str, copies: list[tuple], files: list[str], rows_per_shard: int,
            keep_all_bad: bool) -> None:
    """One id's copies -> its place in the shards (or none) and its bad copies."""
    valid = sorted((number, digest) for number, digest, reason in copies if reason is None)
    first = valid[0] if valid else None
    bad, taken = [], False
    for number, digest, reason in copies:
        if reason is None and (number, digest) == first and not taken:
            taken = True  # the kept copy; a second identical copy of it is still a duplicate
            continue
        bad.append((number, digest, reason or "duplicate"))
    if valid:
        if result.good % rows_per_shard == 0:
            result.boundaries.append(row_id)
        result.good += 1
    if not bad:
        return
    result.special[row_id] = (files[first[0]], first[1].hex()) if first else None
    for number, digest, reason in bad:
        if reason == "duplicate":
            same = "same content" if digest == first[1] else "different content"
            reason = (f"duplicate id (appears {len(copies)} times; the first, in {files[first[0]]}, is kept; "
                      f"this copy has the {same})")
        result.bad_count += 1
        if keep_all_bad or len(result.bad) < SHOWN_BAD:
            result.bad.append({"id": row_id, "path": files[number], "reason": reason})


def assign_shards(batch: pa.Table, plan) -> pa.Table:
    """Ray Data map_batches function: add each row's shard (``plan`` from ``CorpusCheck.plan``, as an
    object ref) and drop the rows not computed this run: bad rows, every copy of an id but the one
    kept (only rows whose id has a bad copy are hashed again), and rows of finished shards."""
    import ray

    if isinstance(plan, ray.ObjectRef):
        plan = ray.get(plan)
    if "path" in batch.column_names:  # the kept copies are named by the paths the check read
        outside = pc.invert(pc.is_in(batch.column("path"), pa.array(plan["files"], pa.string())))
        if pc.any(outside).as_py():
            raise RuntimeError(f"precompute: rows from {batch.filter(outside).column('path')[0]}, a file the "
                               "corpus check did not read")
    ids = batch.column("id")
    boundaries = np.asarray(plan["boundaries"], dtype=str)
    present = pc.fill_null(pc.invert(pc.is_null(ids)), False).to_numpy(zero_copy_only=False)
    id_values = ids.fill_null("").to_numpy(zero_copy_only=False).astype(str)
    shards = np.searchsorted(boundaries, id_values, side="right").astype(np.int64) - 1
    keep = present & (shards >= 0)
    special = plan["special"]
    if special:
        for i in np.nonzero(keep)[0]:
            row_id = id_values[i]
            if row_id in special:
                kept = special[row_id]
                row = batch.slice(int(i), 1).to_pylist()[0]
                keep[i] = kept is not None and row.get("path") == kept[0] and row_hash(row) == kept[1]
    if plan["done"]:
        keep &= ~np.isin(shards, plan["done"])
    return batch.append_column("shard", pa.array(shards, pa.int64())).filter(pa.array(keep))


def legacy_fingerprint(files: list[str], source: str, endpoint: str | None, spec, num_cpus: float) -> str:
    """The input fingerprint as `_run.json` files recorded it before ``FINGERPRINT_KIND``: SHA-256 of
    the rows' sorted hex hashes, streamed from a cluster-side sort (only to resume such a run)."""
    hashes = file_records(files, source, endpoint, spec, num_cpus).select_columns(["hash"])
    digest = hashlib.sha256()
    for batch in hashes.sort("hash").iter_batches(batch_size=STREAM_BATCH, batch_format="pyarrow"):
        digest.update("".join(h.hex() for h in batch.column("hash").to_pylist()).encode())
    return digest.hexdigest()
