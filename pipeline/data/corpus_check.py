"""The precompute's corpus check at scale: every row is checked where it is read (Ray Data tasks),
reduced to a small record (id, file number, content hash, reason), and the records are sorted by id
on the cluster. The driver then streams the sorted records once, holding one batch at a time, and
derives from them:

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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.data.corpus import check_batch, row_hash

log = logging.getLogger("wand.precompute")

MODULUS = 1 << 256
SHOWN_BAD = 20       # bad rows named in a fail-mode error
STREAM_BATCH = 65_536
RECORD_SCHEMA = pa.schema([("id", pa.string()), ("file", pa.int32()), ("hash", pa.binary(32)),
                          ("reason", pa.string())])
# `_run.json` files written before this module recorded the fingerprint as the SHA-256 of the rows'
# sorted hex hashes, without this key; such a run is resumed when that legacy value still matches.
FINGERPRINT_KIND = "sum-of-row-sha256/1"


def check_records(batch: pa.Table, spec, files: dict[str, int]) -> pa.Table:
    """Ray Data map_batches function: the row checks, then one small record per row (``files``: the
    read's path -> its number in the sorted file list)."""
    checks = check_batch(batch, spec)
    paths = checks.column("path").to_pylist()
    unknown = sorted({p for p in paths if p not in files})
    if unknown:
        raise RuntimeError(f"precompute: rows from {unknown[:3]}, a file the corpus listing did not name")
    return pa.table({"id": checks.column("id"), "file": pa.array([files[p] for p in paths], pa.int32()),
                     "hash": pa.array([bytes.fromhex(h) for h in checks.column("row_hash").to_pylist()],
                                      pa.binary(32)),
                     "reason": checks.column("reason")}, schema=RECORD_SCHEMA)


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

    def plan(self, done: set[int]) -> dict:
        """What ``assign_shards`` needs (small: one id per shard and the ids with bad copies)."""
        return {"boundaries": self.boundaries, "special": self.special, "done": sorted(done)}


def check_corpus(ds, files: list[str], spec, rows_per_shard: int, keep_all_bad: bool, num_cpus: float) -> CorpusCheck:
    """Check every row of ``ds`` (read with ``include_paths``) and plan the shards; see the module doc."""
    numbers = {path: i for i, path in enumerate(files)}
    records = ds.map_batches(check_records, fn_kwargs={"spec": spec, "files": numbers}, batch_format="pyarrow",
                             num_cpus=num_cpus)
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


def legacy_fingerprint(ds, spec, num_cpus: float) -> str:
    """The input fingerprint as `_run.json` files recorded it before ``FINGERPRINT_KIND``: SHA-256 of
    the rows' sorted hex hashes, streamed from a cluster-side sort (only to resume such a run)."""
    hashes = ds.map_batches(check_batch, fn_kwargs={"spec": spec}, batch_format="pyarrow",
                            num_cpus=num_cpus).select_columns(["row_hash"])
    digest = hashlib.sha256()
    for batch in hashes.sort("row_hash").iter_batches(batch_size=STREAM_BATCH, batch_format="pyarrow"):
        digest.update("".join(batch.column("row_hash").to_pylist()).encode())
    return digest.hexdigest()
