"""The training rows' order: seeded per-epoch shuffles, the same after a restart, speakers mixed."""

import numpy as np
import pyarrow as pa
import pytest

from pipeline.data.row_order import RowOrder, ShardRows


def test_each_epoch_is_a_permutation_and_seeded():
    order = RowOrder([16, 16, 7], seed=3, window=16)
    for epoch in range(3):
        assert sorted(order.epoch(epoch).tolist()) == list(range(39))
    assert order.epoch(0).tolist() != order.epoch(1).tolist()
    assert RowOrder([16, 16, 7], seed=3, window=16).epoch(1).tolist() == order.epoch(1).tolist()
    assert RowOrder([16, 16, 7], seed=4, window=16).epoch(1).tolist() != order.epoch(1).tolist()


def test_workers_split_each_step_and_a_restart_reads_the_same_rows():
    shard_rows, batch, workers = [10, 10, 10], 4, 3
    order = RowOrder(shard_rows, seed=0, window=2)
    rows = sum(shard_rows)
    for step in range(12):  # 12 steps x 12 rows: almost 5 epochs
        got = np.concatenate([order.batch(step, rank, batch, workers) for rank in range(workers)])
        positions = np.arange(step * batch * workers, (step + 1) * batch * workers)
        expected = [order.epoch(int(g // rows))[int(g % rows)] for g in positions]  # brute force
        assert got.tolist() == expected
    restarted = RowOrder(shard_rows, seed=0, window=2)  # a new process after a crash at step 7
    assert all(restarted.batch(7, r, batch, workers).tolist() == order.batch(7, r, batch, workers).tolist()
               for r in range(workers))


def test_batches_mix_speakers_of_a_speaker_sorted_corpus():
    # 8 speakers x 16 utterances, ids sorted by speaker (as real corpora are), 8 shards of 16 rows:
    # each shard holds one speaker.
    speaker = np.repeat(np.arange(8), 16)
    order = RowOrder([16] * 8, seed=0, window=4)
    batches = [speaker[order.batch(step, 0, 8, 1)] for step in range(16)]
    assert all(len(set(b.tolist())) >= 3 for b in batches)
    unshuffled = [speaker[np.arange(step * 8, step * 8 + 8)] for step in range(16)]  # the old contiguous slices
    assert all(len(set(b.tolist())) == 1 for b in unshuffled)


def test_shard_rows_reads_through_a_bounded_cache():
    shard_rows = [5, 5, 5, 5]
    tables = {f"s{i}": pa.table({"id": [f"r{i}-{j}" for j in range(5)]}) for i in range(4)}
    reads = []

    def read(path):
        reads.append(path)
        return tables[path]

    order = RowOrder(shard_rows, seed=1, window=2)
    reader = ShardRows(read, list(tables), order, cache=4)
    picked = reader.take(order.epoch(0))
    assert sorted(r["id"] for r in picked) == sorted(f"r{i}-{j}" for i in range(4) for j in range(5))
    assert len(reads) == 4  # one epoch in window order reads each shard once
    with pytest.raises(RuntimeError, match="s0: 5 rows, the manifest says 6"):
        ShardRows(read, list(tables), RowOrder([6, 5, 5, 4], seed=1, window=2), cache=1).take([0])
