"""The precompute's corpus check at scale (pipeline/data/corpus_check.py) on a real local Ray: the
fingerprint, the bad and duplicate rows and the shard plan, streamed from a cluster-side sort in
small batches (so ids' copies cross batch boundaries), against a direct computation row by row;
the fingerprint against the corpus builder's; the rows ``assign_shards`` keeps against the plan."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import pipeline.data.corpus_check as corpus_check
from helpers import corpus_rows
from pipeline.config import PrecomputeConfig
from pipeline.data.corpus import RowChecker, row_hash
from pipeline.data.corpus_check import assign_shards, check_corpus, legacy_fingerprint
from pipeline.data.precompute import read_corpus, run_precompute, RUN_FILE
from wand.models import get_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SPEC = get_spec("cosyvoice2", "tiny")


def hostile_rows() -> list[list[dict]]:
    """Three files: good rows, identical and different copies of ids across and inside files, an
    invalid copy of a good id, and an id whose only copies are invalid."""
    rows = corpus_rows(SPEC, 40, seed=7)
    first, second, third = rows[:15], rows[15:30], rows[30:]
    second = second + [dict(rows[3]), {**rows[4], "prefix_length": 0}, {**rows[5], "input_ids": rows[6]["input_ids"]}]
    third = third + [dict(rows[35]), {**rows[20], "id": "only-bad", "prefix_length": None},
                     {**rows[21], "id": "only-bad", "prefix_length": 0}]
    return [first, second, third]


def write(folder: Path, parts: list[list[dict]]) -> list[str]:
    folder.mkdir(parents=True)
    for number, part in enumerate(parts):
        (folder / f"part-{number}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return [str(folder / f"part-{number}.jsonl") for number in range(len(parts))]


def direct(parts: list[list[dict]], files: list[str], rows_per_shard: int) -> dict:
    """Row by row in plain Python: reasons, the copy kept per id (first valid by file, then hash),
    the shards as chunks of the sorted good ids, and the fingerprint."""
    checker = RowChecker(SPEC)
    copies: dict[str, list] = {}
    total = 0
    for number, part in enumerate(parts):
        for row in part:
            digest = row_hash(row)
            total += int(digest, 16)
            full = {c: row.get(c) for c in ("id", "input_ids", "prefix_length", "prompt_length")}
            copies.setdefault(row["id"], []).append((number, digest, checker.reason(full)))
    kept, bad = {}, []
    for row_id, found in copies.items():
        valid = sorted((n, d) for n, d, r in found if r is None)
        if valid:
            kept[row_id] = (files[valid[0][0]], valid[0][1])
        bad += [(row_id, files[n]) for n, d, r in found if r is not None]
        bad += [(row_id, files[n]) for n, d in valid[1:]]
    ordered = sorted(kept)
    return {"fingerprint": format(total % (1 << 256), "064x"), "kept": kept, "bad": sorted(bad),
            "shards": [ordered[i:i + rows_per_shard] for i in range(0, len(ordered), rows_per_shard)]}


def test_check_and_plan_match_a_direct_computation(ray_local, tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_check, "STREAM_BATCH", 4)  # an id's copies straddle the driver's batches
    parts = hostile_rows()
    write(tmp_path / "in", parts)
    config = PrecomputeConfig(model="cosyvoice2", model_size="tiny", corpus=str(tmp_path / "in"), shards="unused")
    ds, files = read_corpus(config)
    expected = direct(parts, files, rows_per_shard=7)
    check = check_corpus(files, config.corpus, None, SPEC, 7, keep_all_bad=True, num_cpus=0.5)

    assert check.fingerprint == expected["fingerprint"] and check.rows == sum(map(len, parts))
    assert sorted((b["id"], b["path"]) for b in check.bad) == expected["bad"]
    assert check.bad_count == len(expected["bad"]) and check.good == len(expected["kept"])
    assert check.boundaries == [shard[0] for shard in expected["shards"]]
    reasons = {(b["id"], b["path"]): b["reason"] for b in check.bad}
    assert "same content" in reasons[(parts[0][3]["id"], files[1])]
    assert "different content" in reasons[(parts[0][5]["id"], files[1])]
    assert reasons[(parts[0][4]["id"], files[1])].startswith("prefix_length 0 outside")
    assert check.special["only-bad"] is None

    # The rows assign_shards lets through: the kept copies, each in its planned shard.
    assigned = ds.map_batches(assign_shards, fn_kwargs={"plan": check.plan(set(), files)}, batch_format="pyarrow").take_all()
    got = sorted((r["id"], r["path"], row_hash(r), r["shard"]) for r in assigned)
    want = sorted((row_id, *expected["kept"][row_id], s) for s, shard in enumerate(expected["shards"]) for row_id in shard)
    # (An identical copy in the kept copy's own file passes too: TeacherTopK stores an id once.)
    assert sorted(set(got)) == want and len(got) == len(want) + 1
    # Finished shards are left out.
    again = ds.map_batches(assign_shards, fn_kwargs={"plan": check.plan({0, 2}, files)}, batch_format="pyarrow").take_all()
    assert sorted({r["id"] for r in again}) == sorted(i for s, shard in enumerate(expected["shards"]) if s not in (0, 2)
                                                    for i in shard)

    # Fail mode keeps the first SHOWN_BAD bad rows and counts the rest.
    monkeypatch.setattr(corpus_check, "SHOWN_BAD", 2)
    bounded = check_corpus(files, config.corpus, None, SPEC, 7, keep_all_bad=False, num_cpus=0.5)
    assert len(bounded.bad) == 2 and bounded.bad_count == check.bad_count

    # The same rows in other files and another order: the same fingerprint.
    everything = [r for part in parts for r in part][::-1]
    write(tmp_path / "resharded", [everything[:5], everything[5:]])
    _, files2 = read_corpus(config.model_copy(update={"corpus": str(tmp_path / "resharded")}))
    assert check_corpus(files2, str(tmp_path / "resharded"), None, SPEC, 7, True, 0.5).fingerprint == check.fingerprint

    # The legacy fingerprint (resuming an older run): SHA-256 of the sorted hex hashes.
    hashes = sorted(row_hash(r) for part in parts for r in part)
    assert legacy_fingerprint(files, config.corpus, None, SPEC, 0.5) == hashlib.sha256("".join(hashes).encode()).hexdigest()


def test_a_built_corpus_has_the_precompute_fingerprint_and_an_older_run_resumes(ray_local, tmp_path):
    """The corpus builder's manifest and the precompute's check fingerprint the same rows the same
    way; a `_run.json` from before (the legacy fingerprint) is resumed, not refused or recomputed,
    and a changed input is still refused."""
    from pipeline.data.corpus_build import build_corpus

    records = [{"id": f"u{i:03d}", "text_ids": [1 + i % 7, 2], "prompt_codes": [i % 5],
                "target_codes": [3, 4 + i % 40, i % 61]} for i in range(30)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    manifest = build_corpus(SPEC, str(tmp_path / "in"), str(tmp_path / "corpus"), rows_per_file=8)
    config = PrecomputeConfig(model="cosyvoice2", model_size="tiny", corpus=str(tmp_path / "corpus"),
                              shards=str(tmp_path / "topk"), k=4, rows_per_shard=12)
    first = run_precompute(config)
    assert first["input"]["fingerprint"] == manifest["fingerprint"] and first["rows"] == 30

    run_file = tmp_path / "topk" / RUN_FILE
    run = json.loads(run_file.read_text())
    rows = [r for f in sorted((tmp_path / "corpus").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    legacy = hashlib.sha256("".join(sorted(row_hash(r) for r in rows)).encode()).hexdigest()
    run.pop("input_fingerprint_kind")
    run_file.write_text(json.dumps({**run, "input_fingerprint": legacy}))
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "topk").glob("shard-*")}
    resumed = run_precompute(config)
    assert resumed["shards"] == first["shards"] and resumed["input"]["fingerprint"] == legacy
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "topk").glob("shard-*")} == stamps

    run_file.write_text(json.dumps({**run, "input_fingerprint": "0" * 64}))  # the input changed since
    with pytest.raises(ValueError, match="another run .*input_fingerprint"):
        run_precompute(config)
