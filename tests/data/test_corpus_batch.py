"""The builder's fast path against the per-record one: for every model's layout, random good records
and records broken in every way the per-record path refuses, one at a time and in whole chunks, from
JSONL and from Parquet. The fast path must give the very rows and hashes ``build_row`` and the row
checks give, and must hand every record they refuse back (None) rather than accept it."""

import json
import random

import numpy as np
import pyarrow as pa
import pytest

from helpers import spark_tokenizer
from pipeline.data.corpus import check_batch
from pipeline.data.corpus_batch import BatchBuilder
from pipeline.data.corpus_builder import build_row, code_count, RowError
from wand.models import get_spec

MODELS = ["cosyvoice2", "indextts", "sparktts", "sparktts:clone_no_text", "llasa-3b", "orpheus-3b"]


def spec_of(name):
    model, _, form = name.partition(":")
    spec = get_spec(model, "tiny")
    return spec.with_prompt_form(form) if form else spec


def good_record(spec, rng, i):
    count = code_count(spec)
    limit = getattr(spec, "text_vocab_size", None) or spec.vocab_size
    reserved = set(spec.target_ids().tolist()) | {spec.prefix_end_token_id}
    text_pool = [t for t in range(limit) if getattr(spec, "text_vocab_size", None) or t not in reserved]
    record = {"id": f"r{i}", "text_ids": [rng.choice(text_pool) for _ in range(rng.randint(1, 6))],
              "target_codes": [rng.randrange(count) for _ in range(rng.randint(1, 9))]}
    if getattr(spec, "prompt_form", "clone") == "clone" and rng.random() < 0.7:
        record["prompt_codes"] = [rng.randrange(count) for _ in range(rng.randint(0, 4))]
    if spec.global_codes is not None:
        record["global_codes"] = [rng.randrange(spec.global_codes) for _ in range(spec.global_codes)]
    if spec.latent_shape is not None:
        n, dim = spec.latent_shape
        record["conditioning_latents"] = [rng.uniform(-2, 2) for _ in range(n * dim)]
    return record


def broken_records(spec, rng, i):
    """One record per way of being wrong that the per-record path refuses (or may refuse)."""
    count = code_count(spec)
    limit = getattr(spec, "text_vocab_size", None) or spec.vocab_size
    base = good_record(spec, rng, i)
    cases = [dict(base, target_codes=[count]), dict(base, target_codes=[-1]), dict(base, prompt_codes=[count]),
             dict(base, text_ids=[limit]), dict(base, text_ids=[-1]), dict(base, text_ids=[]),
             dict(base, target_codes=[]), {k: v for k, v in base.items() if k != "target_codes"},
             {k: v for k, v in base.items() if k != "text_ids"}, dict(base, text_ids=None, text="hello"),
             {k: v for k, v in base.items() if k != "id"}, dict(base, id=""), dict(base, id=7),
             dict(base, text_ids=[1.5]), dict(base, target_codes=[True]), dict(base, target_codes=[1, None]),
             dict(base, target_codes=[[1]]), dict(base, target_codes=list(range(count)) * 40)]  # beyond the context
    if getattr(spec, "text_vocab_size", None) is None:
        cases.append(dict(base, text_ids=[int(spec.target_ids()[0])]))  # a speech id where text belongs
        cases.append(dict(base, text_ids=[spec.prefix_end_token_id]))
    if spec.global_codes is not None:
        cases += [{k: v for k, v in base.items() if k != "global_codes"}, dict(base, global_codes=[spec.global_codes])]
    if getattr(spec, "prompt_form", "clone") != "clone":
        cases.append(dict(base, prompt_codes=[1]))
    if spec.latent_shape is not None:
        cases += [dict(base, conditioning_latents=[1.0, 2.0]), dict(base, conditioning_latents="/no/such.npy"),
                  {k: v for k, v in base.items() if k != "conditioning_latents"},
                  dict(base, text_ids=[5] * (spec.max_text_tokens + 1))]
    return cases


def per_record(spec, record):
    """The per-record path: build_row, then the precompute's row checks; (row, hash) or None."""
    try:
        row = build_row(spec, record)
    except RowError:
        return None
    checked = check_batch(pa.Table.from_pylist([{**row, "path": "p"}]), spec).to_pylist()[0]
    return None if checked["reason"] else (row, checked["row_hash"])


@pytest.mark.parametrize("model", MODELS)
def test_fast_path_matches_build_row_record_by_record(model):
    spec, rng = spec_of(model), random.Random(model)
    builder = BatchBuilder(spec)
    good = [good_record(spec, rng, i) for i in range(40)]
    broken = [r for i in range(3) for r in broken_records(spec, rng, 100 + i)]
    refused = 0
    for record in good + broken:
        expected = per_record(spec, record)
        table = builder.from_json_lines([json.dumps(record).encode()])
        got = builder.build(table) if table is not None else None
        if got is None:
            # handing a record back is always safe (the per-record path decides); a good one must pass
            assert record not in good, f"the fast path refused a good record: {record}"
            refused += expected is None
            continue
        assert expected is not None, f"the fast path accepted a record the per-record path refuses: {record}"
        rows, hashes = got
        assert rows.to_pylist() == [expected[0]] and hashes == [expected[1]]
    assert refused >= 3 * 15


@pytest.mark.parametrize("model", MODELS)
def test_fast_path_chunks_equal_the_per_record_table(model):
    spec, rng = spec_of(model), random.Random(f"chunk-{model}")
    builder = BatchBuilder(spec)
    records = [good_record(spec, rng, i) for i in range(300)]
    expected = [per_record(spec, r) for r in records]
    want = pa.Table.from_pylist([e[0] for e in expected])  # what the per-record path writes
    for table in (builder.from_json_lines([json.dumps(r).encode() for r in records]),
                  builder.from_arrow(_as_parquet_types(want_records=records, spec=spec))):
        rows, hashes = builder.build(table)
        assert rows.schema == want.schema and rows.equals(want)
        assert hashes == [e[1] for e in expected]
    # one bad record, or a repeated id, sends the whole chunk to the per-record path
    bad = records[:50] + [dict(records[50], target_codes=[code_count(spec)])]
    assert builder.build(builder.from_json_lines([json.dumps(r).encode() for r in bad])) is None
    assert builder.build(builder.from_json_lines([json.dumps(r).encode() for r in records[:5] + records[:1]])) is None


def _as_parquet_types(want_records, spec):
    """The records as a Parquet reader hands them over, with narrower integer and float types."""
    keys = sorted({k for r in want_records for k in r})  # from_pylist takes its columns from the first record alone
    table = pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in want_records])
    columns = {}
    for name in table.column_names:
        column = table.column(name)
        if pa.types.is_list(column.type) and pa.types.is_integer(column.type.value_type):
            column = column.cast(pa.list_(pa.int32()))
        elif pa.types.is_list(column.type):
            column = column.cast(pa.list_(pa.float32()))
        columns[name] = column
    return pa.table(columns)


def test_forms_the_fast_path_leaves_to_the_per_record_path():
    control = get_spec("sparktts", "tiny").with_tokenizer(spark_tokenizer()).with_prompt_form("controllable")
    builder = BatchBuilder(control)  # its layout depends on each record's style labels
    record = {"id": "c", "text_ids": [5], "target_codes": [1], "style": [0, 1, 2], "global_codes": [0] * 32}
    assert builder.build(builder.from_json_lines([json.dumps(record).encode()])) is None
    assert build_row(control, record)["input_ids"][-1] == control.stop_token_ids[0]
    cosy = BatchBuilder(get_spec("cosyvoice2", "tiny"))
    ids_as_ints = pa.table({"id": [1, 2], "text_ids": [[1], [2]], "target_codes": [[1], [2]]})
    assert cosy.from_arrow(ids_as_ints) is None  # build_row turns them into strings: its path decides
    assert cosy.from_json_lines([b'{"id": "a", "text_ids": [1], "target_codes": [1]}', b"[1, 2]"]) is None
    assert cosy.from_json_lines([b'{"id": "\xff", "text_ids": [1], "target_codes": [1]}']) is None


def test_duplicate_id_buckets_are_the_same_for_an_id_wherever_it_is():
    """The builder files ids into buckets a chunk at a time (vectorised); an id's bucket must not
    depend on its chunk, its neighbours or the array's slicing: checked against the same hash in
    plain Python, byte by byte."""
    from pipeline.data.corpus_build import buckets_of

    def reference(row_id: str, buckets: int) -> int:
        h, mask = 0, (1 << 64) - 1
        for j, byte in enumerate(row_id.encode()):
            h = (h + byte * pow(1099511628211, j + 1, 1 << 64)) & mask
        h ^= h >> 33
        h = (h * 0xFF51AFD7ED558CCD) & mask
        h ^= h >> 33
        return h % buckets

    rng = random.Random(3)
    ids = [f"utt-{rng.randrange(10**9)}" for _ in range(500)] + ["ü-ñ", "x", "a" * 300]
    want = [reference(i, 13) for i in ids]
    assert buckets_of(pa.array(ids), 13).tolist() == want
    assert buckets_of(pa.array(ids).slice(7, 50), 13).tolist() == want[7:57]
    assert buckets_of(pa.chunked_array([ids[:3], ids[3:]]), 13).tolist() == want
    assert len(set(want)) == 13  # spread over every bucket


@pytest.mark.parametrize("with_latents", [False, True])
def test_batch_row_hashes_are_the_per_row_hashes(with_latents):
    from pipeline.data.corpus import row_hash, row_hashes

    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 40, 50)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = rng.integers(0, 70_000, int(offsets[-1]))
    prefix = rng.integers(1, 5, 50)
    ids = [f"utt-{i}-é" for i in range(50)]
    latents = rng.normal(size=50 * 6).astype(np.float32) if with_latents else None
    rows = [{"id": ids[i], "input_ids": flat[offsets[i]:offsets[i + 1]].tolist(), "prefix_length": int(prefix[i]),
             **({"conditioning_latents": latents[6 * i:6 * (i + 1)].tolist()} if with_latents else {})}
            for i in range(50)]
    assert row_hashes(ids, flat, offsets, prefix, latents) == [row_hash(r) for r in rows]
    assert len(set(row_hashes(ids, flat, offsets, prefix, latents))) == 50


@pytest.mark.parametrize("model", ["cosyvoice2", "indextts", "sparktts"])
def test_the_chunk_length_limits_are_the_row_checks_limits(model):
    from wand.models import ModelSpec

    spec = get_spec(model, "tiny")
    context, limit = spec.backbone_positions, spec.max_generated_tokens
    edges = sorted({n for n in (context, limit) if n} | {5})
    lengths = [n + d for n in edges for d in (-1, 0, 1, 2)]
    for prefix in (1, 3):
        too_many, too_long = (np.broadcast_to(x, len(lengths)) for x in
                              spec.over_limits(np.array(lengths), np.full(len(lengths), prefix)))
        for n, a, b in zip(lengths, too_many.tolist(), too_long.tolist()):
            problem = ModelSpec.row_problem(spec, {"input_ids": [0] * n, "prefix_length": prefix})
            assert (a or b) == (problem is not None), (n, prefix, problem)
            assert a == (limit is not None and n - prefix > limit) and b == (context is not None and n > context)


def test_a_chunk_of_megabytes_with_a_line_longer_than_a_mebibyte_reads_whole():
    """Arrow's JSON reader works in blocks (1 MiB by default; a line no block holds is an error):
    every record of a chunk of several MiB comes back once and in order, a 2 MiB line included."""
    spec, rng = spec_of("cosyvoice2"), random.Random("blocks")
    builder = BatchBuilder(spec)
    records = [dict(good_record(spec, rng, i), target_codes=[rng.randrange(code_count(spec)) for _ in range(300)])
               for i in range(3000)]
    records.insert(1700, dict(records[0], id="long", text_ids=[3] * 400_000))
    lines = [json.dumps(r).encode() for r in records]
    assert sum(map(len, lines)) > 4 << 20 and max(map(len, lines)) > 1 << 20
    table = builder.from_json_lines(lines)
    fields = [f.name for f in builder.schema]
    assert table.to_pylist() == [{k: r.get(k) for k in fields} for r in records]
