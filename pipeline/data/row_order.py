"""Which rows a training worker reads at each step: a seeded shuffle per epoch over the manifest's
shards (``RowOrder``), and the shards those rows sit in, read on demand with a small cache
(``ShardRows``). A function of the seed and the step, so a restarted stage reads what it would have.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import numpy as np

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
