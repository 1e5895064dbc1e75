"""Which shard rows each training worker reads at each step: seeded, shuffled, and the same after a restart.

The order is a pure function of (seed, epoch, step, rank): a worker that restarts at step t reads
exactly the rows an uninterrupted run reads at step t. Per epoch, a seeded permutation of the
shards, then the rows of each window of ``window`` consecutive shards (in that order) shuffled
together. Shards hold rows sorted by id, and real corpora sort by speaker, so without the shuffle
a batch would be single-speaker and each curriculum stage would see different speakers. The window
bounds what a worker keeps in memory (at most two windows of shards are read at a time) while
mixing rows across ``window`` shards; a corpus of up to ``window`` shards is shuffled completely.

Global position g (step t = g // rows_per_step) is row ``epoch_order(g // rows)[g % rows]``;
within a step, worker r takes positions [r * batch_size, (r + 1) * batch_size).
"""

from __future__ import annotations

import functools
import hashlib
import io
from collections import OrderedDict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage

__all__ = ["RowOrder", "ShardRows", "ShardCorrupt", "read_shard", "check_shard"]


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


class RowOrder:
    def __init__(self, shard_rows: list[int], seed: int, window: int):
        if not shard_rows or min(shard_rows) < 1:
            raise ValueError(f"row order: every shard needs rows, got {shard_rows}")
        if window < 1:
            raise ValueError(f"shuffle_window must be >= 1, got {window}")
        self.shard_rows = list(shard_rows)
        self.offsets = np.concatenate([[0], np.cumsum(shard_rows)])
        self.rows = int(self.offsets[-1])
        self.seed, self.window = seed, window

    @functools.lru_cache(maxsize=4)
    def epoch(self, epoch: int) -> np.ndarray:
        """Global row indices (into the manifest's shards, in order) of one epoch."""
        rng = np.random.default_rng([self.seed, epoch, 17])
        shards = rng.permutation(len(self.shard_rows))
        parts = []
        for start in range(0, len(shards), self.window):
            rows = np.concatenate([np.arange(self.offsets[s], self.offsets[s + 1]) for s in shards[start : start + self.window]])
            parts.append(rows[rng.permutation(len(rows))])
        return np.concatenate(parts)

    def positions(self, positions: np.ndarray) -> np.ndarray:
        return np.array([self.epoch(int(g // self.rows))[int(g % self.rows)] for g in positions], dtype=np.int64)

    def batch(self, step: int, rank: int, batch_size: int, workers: int) -> np.ndarray:
        """Global row indices worker ``rank`` trains on at ``step``."""
        first = step * batch_size * workers + rank * batch_size
        return self.positions(np.arange(first, first + batch_size))

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, row within the shard) of a global row index."""
        shard = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return shard, int(index - self.offsets[shard])


class ShardRows:
    """Rows of the shard files by global index, keeping the ``cache`` most recently read shards."""

    def __init__(self, read_table, files: list[str], order: RowOrder, cache: int):
        self.read_table, self.files, self.order = read_table, files, order
        self.cache: OrderedDict[int, list[dict]] = OrderedDict()
        self.capacity = max(1, cache)

    def _shard(self, shard: int) -> list[dict]:
        if shard in self.cache:
            self.cache.move_to_end(shard)
            return self.cache[shard]
        rows = self.read_table(self.files[shard]).to_pylist()
        if len(rows) != self.order.shard_rows[shard]:
            raise RuntimeError(f"{self.files[shard]}: {len(rows)} rows, the manifest says {self.order.shard_rows[shard]}")
        self.cache[shard] = rows
        if len(self.cache) > self.capacity:
            self.cache.popitem(last=False)
        return rows

    def take(self, indices: np.ndarray) -> list[dict]:
        out = []
        for index in indices:
            shard, row = self.order.locate(int(index))
            out.append(self._shard(shard)[row])
        return out
