"""Teacher top-k precompute on a real local Ray instance, local disk and S3 (moto)."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.json  # noqa: F401
import pyarrow.parquet as pq
import pytest
import torch

import wand
from helpers import corpus_rows
from pipeline import storage
from pipeline.data.corpus import check_batch, RowChecker
from pipeline.config import PrecomputeConfig
from pipeline.data.precompute import FAULT_ENV, run_precompute, ShardFault
from pipeline.data.shards import decode_values, load_manifest, verify_manifest
from wand.models import get_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def write_corpus(directory, rows, parts=2, fmt="parquet"):
    os.makedirs(directory, exist_ok=True)
    size = (len(rows) + parts - 1) // parts
    for p in range(parts):
        chunk = rows[p * size:(p + 1) * size]
        if fmt == "parquet":
            pq.write_table(pa.Table.from_pylist(chunk), os.path.join(directory, f"part-{p}.parquet"))
        else:
            with open(os.path.join(directory, f"part-{p}.jsonl"), "w") as f:
                for r in chunk:
                    f.write(json.dumps(r) + "\n")


def read_shards(uri, manifest):
    fs, root = storage.resolve(uri)
    tables = [pq.read_table(storage.join(root, s["file"]), filesystem=fs) for s in manifest["shards"]]
    return pa.concat_tables(tables).to_pylist()


def direct_topk(config, row):
    """Independent reference: one unpadded teacher forward per row, then torch.topk(log_softmax)."""
    spec = get_spec(config.model, config.model_size)
    torch.manual_seed(config.teacher_seed)
    model = wand.enable_wand(spec.build().eval(), None)
    ids = torch.tensor([row["input_ids"]])
    kwargs = {}
    if spec.family == "indextts":
        kwargs["conditioning_latents"] = torch.tensor(row["conditioning_latents"]).view(
            1, spec.extra["num_latents"], spec.config["n_embd"])
    with torch.no_grad():
        logits = model(input_ids=ids, prefix_lengths=torch.tensor([row["prefix_length"]]), **kwargs).logits[0]
    p, n = row["prefix_length"], len(row["input_ids"])
    logprobs = torch.log_softmax(logits[p - 1:n - 1] / config.temperature, -1)[:, spec.target_ids()]
    return torch.topk(logprobs, config.k, -1)


def check_round_trip(config, rows, atol):
    manifest = load_manifest(config.shards)
    stored = {r["id"]: r for r in read_shards(config.shards, manifest)}
    assert sorted(stored) == sorted(r["id"] for r in rows)
    for row in rows:
        got = stored[row["id"]]
        values, index = direct_topk(config, row)
        got_index = torch.tensor(np.array(got["topk_indices"], dtype=np.int64))
        got_values = decode_values(np.array(got["topk_logprobs"]), config.value_dtype)
        assert torch.equal(got_index, index), row["id"]
        torch.testing.assert_close(got_values, values, atol=atol, rtol=0)
        mass = got_values.exp().sum(-1) + torch.tensor(got["rest_logprob"]).exp()
        torch.testing.assert_close(mass, torch.ones_like(mass), atol=atol * 10, rtol=0)
        assert got["input_ids"] == row["input_ids"] and got["prefix_length"] == row["prefix_length"]
    return manifest


def test_round_trip_local(ray_local, tmp_path):
    spec = get_spec("cosyvoice2", "tiny")
    rows = corpus_rows(spec, 23, seed=1)
    write_corpus(tmp_path / "in", rows)
    config = PrecomputeConfig(model="cosyvoice2", model_size="tiny", corpus=str(tmp_path / "in"),
                              shards=str(tmp_path / "out"), k=8, temperature=0.8, value_dtype="float32",
                              rows_per_shard=10, max_tokens_per_batch=200)
    manifest = run_precompute(config)
    assert [s["rows"] for s in manifest["shards"]] == [10, 10, 3]
    assert manifest["rows"] == 23 and manifest["index_dtype"] == "uint8" and manifest["bad_rows"]["count"] == 0
    check_round_trip(config, rows, atol=1e-5)
    schema = pq.read_schema(tmp_path / "out" / "shard-00000.parquet")
    assert schema.field("topk_indices").type == pa.list_(pa.list_(pa.uint8(), 8))
    assert schema.field("topk_logprobs").type == pa.list_(pa.list_(pa.float32(), 8))
    verify_manifest(manifest, teacher="cosyvoice2", k=8, temperature=0.8)
    with pytest.raises(ValueError, match="k=8 .config needs 16"):
        verify_manifest(manifest, teacher="cosyvoice2", k=16)
    with pytest.raises(ValueError, match="teacher 'cosyvoice2'"):
        verify_manifest(manifest, teacher="indextts")
    # Same command again: nothing recomputed, same manifest.
    before = (tmp_path / "out" / "shard-00000.json").stat().st_mtime_ns
    assert run_precompute(config) == manifest
    assert (tmp_path / "out" / "shard-00000.json").stat().st_mtime_ns == before
    # Other settings against the same folder are refused, naming what differs.
    with pytest.raises(ValueError, match="another run.*k: 8 -> 4"):
        run_precompute(config.model_copy(update={"k": 4}))


def test_round_trip_s3_with_latents_and_bf16(ray_local, s3_server, tmp_path):
    import s3fs

    spec = get_spec("indextts", "tiny")
    rows = corpus_rows(spec, 12, seed=2)
    write_corpus(tmp_path / "in", rows)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint})
    fs.mkdir("corpus")
    fs.put(str(tmp_path / "in") + "/", "corpus/tiny/", recursive=True)
    config = PrecomputeConfig(model="indextts", model_size="tiny", corpus="s3://corpus/tiny",
                              shards="s3://corpus/topk", k=4, value_dtype="bfloat16", rows_per_shard=5)
    manifest = run_precompute(config)
    assert fs.exists("corpus/topk/manifest.json") and len(manifest["shards"]) == 3
    check_round_trip(config, rows, atol=0.02)  # bf16 keeps 8 bits of mantissa


def test_interrupted_run_resumes_and_keeps_every_row_once(ray_local, tmp_path, monkeypatch):
    spec = get_spec("llasa-1b", "tiny")
    rows = corpus_rows(spec, 30, seed=3)
    write_corpus(tmp_path / "in", rows, parts=3)
    config = PrecomputeConfig(model="llasa-1b", model_size="tiny", corpus=str(tmp_path / "in"),
                              shards=str(tmp_path / "out"), k=4, rows_per_shard=6)
    monkeypatch.setenv(FAULT_ENV, f"3:{tmp_path / 'failed-once'}")
    with pytest.raises(Exception) as info:
        run_precompute(config)
    assert "injected failure on shard 3" in str(info.value) or isinstance(info.value, ShardFault)
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not (tmp_path / "out" / "shard-00003.json").exists()
    manifest = run_precompute(config)
    ids = [r["id"] for r in read_shards(config.shards, manifest)]
    assert len(ids) == len(set(ids)) == 30 and set(ids) == {r["id"] for r in rows}
    assert [s["file"] for s in manifest["shards"]] == [f"shard-{i:05d}.parquet" for i in range(5)]


def bad_corpus(spec):
    rows = corpus_rows(spec, 8, seed=4)
    vocab = spec.vocab_size
    bad = [
        {**rows[0], "id": "no-prefix", "prefix_length": None},
        {**rows[1], "id": "prefix-zero", "prefix_length": 0},
        {**rows[2], "id": "empty-target", "prefix_length": len(rows[2]["input_ids"])},
        {**rows[3], "id": "bad-token", "input_ids": rows[3]["input_ids"][:-1] + [vocab + 5]},
        {**rows[4], "id": "text-as-target", "input_ids": rows[4]["input_ids"] + [spec.vocab_size - 1]},
        {**rows[5], "id": rows[6]["id"]},  # duplicate id
    ]
    return rows[6:] + bad, {"no-prefix": "missing column 'prefix_length'", "prefix-zero": "prefix_length 0 outside",
                            "empty-target": "outside [1,", "bad-token": "outside the vocabulary",
                            "text-as-target": "is not a speech or stop id", rows[6]["id"]: "duplicate id"}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_bad_rows_fail_before_writing(ray_local, tmp_path, fmt):
    spec = get_spec("cosyvoice2", "tiny")
    rows, reasons = bad_corpus(spec)
    write_corpus(tmp_path / "in", rows, parts=2, fmt=fmt)
    config = PrecomputeConfig(model="cosyvoice2", model_size="tiny", corpus=str(tmp_path / "in"),
                              shards=str(tmp_path / "out"), k=4)
    with pytest.raises(ValueError) as info:
        run_precompute(config)
    message = str(info.value)
    for row_id, reason in reasons.items():
        line = next(line for line in message.splitlines() if f"id {row_id!r}" in line)
        assert reason in line and "part-" in line
    assert "nothing was written" in message
    assert not (tmp_path / "out").exists()


def test_bad_rows_quarantine(ray_local, tmp_path):
    spec = get_spec("cosyvoice2", "tiny")
    rows, reasons = bad_corpus(spec)
    write_corpus(tmp_path / "in", rows)
    config = PrecomputeConfig(model="cosyvoice2", model_size="tiny", corpus=str(tmp_path / "in"),
                              shards=str(tmp_path / "out"), k=4, on_bad_rows="quarantine")
    assert rows[0]["id"] == rows[-1]["id"]  # the duplicate: last in the file order
    manifest = run_precompute(config)
    errors = pq.read_table(tmp_path / "out" / "errors" / "bad_rows.parquet").to_pylist()
    assert manifest["bad_rows"] == {"mode": "quarantine", "count": len(errors), "file": "errors/bad_rows.parquet"}
    by_id = {}
    for e in errors:
        by_id.setdefault(e["id"], []).append(e["reason"])
    for row_id, reason in reasons.items():
        assert any(reason in r for r in by_id[row_id]), (row_id, by_id.get(row_id))
    shard_rows = read_shards(config.shards, manifest)
    stored = [r["id"] for r in shard_rows]
    duplicated = rows[0]["id"]  # rows[0] is the first copy in file order; its later copy is quarantined
    assert len(stored) == len(set(stored)) == manifest["rows"] > 0
    assert set(stored) & set(by_id) == {duplicated} and len(by_id[duplicated]) == 1
    kept = next(r for r in shard_rows if r["id"] == duplicated)
    assert list(kept["input_ids"]) == list(rows[0]["input_ids"])  # the first copy, not the later one


def test_rows_the_checks_used_to_miss_are_listed_with_row_and_field():
    """A float prefix_length (pandas writes one when a value is missing) used to raise TypeError in a
    Ray task; float token ids were truncated silently; IndexTTS rows past max_mel_tokens were clamped."""
    spec = get_spec("cosyvoice2", "tiny")
    row = corpus_rows(spec, 1, seed=9)[0]
    checker = RowChecker(spec)
    prefix = row["prefix_length"]
    assert f"prefix_length {float(prefix)} is a float" in checker.reason({**row, "prefix_length": float(prefix)})
    assert "write the column as int64" in checker.reason({**row, "prefix_length": float(prefix)})
    assert "not an integer" in checker.reason({**row, "prefix_length": float("nan")})
    ids = list(row["input_ids"])
    assert "input_ids holds 7.5 (float)" in checker.reason({**row, "input_ids": ids[:-1] + [7.5]})
    table = pa.Table.from_pylist([{**row, "prefix_length": float(prefix), "path": "p"}])
    (checked,) = check_batch(table, spec).to_pylist()  # a float column: listed, not a crash
    assert checked["id"] == row["id"] and "is a float" in checked["reason"]

    index = get_spec("indextts", "tiny")
    limit = index.max_generated_tokens  # max_mel_tokens codes + the stop code
    base = corpus_rows(index, 1, seed=9)[0]
    speech = int(index.target_ids()[0])
    long_row = {**base, "input_ids": base["input_ids"][: base["prefix_length"]] + [speech] * (limit + 1)}
    assert f"{limit + 1} generated tokens, more than indextts's limit of {limit}" in RowChecker(index).reason(long_row)
    ok_row = {**long_row, "input_ids": long_row["input_ids"][:-1]}
    assert RowChecker(index).reason(ok_row) is None


def test_indextts_generation_past_its_mel_positions_raises_with_the_limit():
    spec = get_spec("indextts", "tiny")
    torch.manual_seed(0)
    model = wand.enable_wand(spec.build().eval(), 8)
    row = corpus_rows(spec, 1, seed=2)[0]
    prefix = row["prefix_length"]
    ids = torch.tensor([row["input_ids"][:prefix]])
    latents = spec.row_inputs([row])
    last = spec.extra["max_mel_tokens"] + 2  # the last learned mel position (start_mel is at 0)
    # Tokens are fed back up to the last position; feeding one past it raises instead of silently
    # reusing the last position's embedding (the token generated from it is the last one kept).
    out = wand.generate(model, ids, [prefix], 8, max_new_tokens=last + 1, prefill_kwargs=latents)
    assert out.shape[1] == prefix + last + 1
    with pytest.raises(ValueError, match="generated past max_mel_tokens"):
        wand.generate(model, ids, [prefix], 8, max_new_tokens=last + 2, prefill_kwargs=latents)


def test_config_errors_name_the_field():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="unknown model preset 'tacotron'"):
        PrecomputeConfig(model="tacotron", corpus="x", shards="y")
    with pytest.raises(ValidationError, match=r"k \(500\) exceeds the target vocabulary"):
        PrecomputeConfig(model="cosyvoice2", model_size="tiny", corpus="x", shards="y", k=500)
    with pytest.raises(ValidationError, match="temperature"):
        PrecomputeConfig(model="cosyvoice2", corpus="x", shards="y", temperature=0)
    with pytest.raises(ValidationError, match="rows_per_shard"):
        PrecomputeConfig(model="cosyvoice2", corpus="x", shards="y", rows_per_shard=0)


def test_a_real_size_teacher_without_weights_is_a_config_error():
    """It used to distil silently from a randomly initialised 0.5B teacher."""
    from pydantic import ValidationError

    from pipeline.config import DistillConfig
    from pipeline.config import TrainConfig

    with pytest.raises(ValidationError, match="teacher_source: a real-size model needs its released weights"):
        PrecomputeConfig(model="cosyvoice2", corpus="x", shards="y")
    with pytest.raises(ValidationError, match="teacher_source: a real-size model needs its released weights"):
        TrainConfig(experiment="e", model="cosyvoice2", shards="s", storage="st")
    with pytest.raises(ValidationError, match="teacher_source: a real-size model needs its released weights"):
        DistillConfig(experiment="e", model="cosyvoice2", corpus="c", shards="s", storage="st",
                      evaluate={"enabled": False})
    # With weights named, or at a test size, it is fine.
    PrecomputeConfig(model="cosyvoice2", corpus="x", shards="y", teacher_source="s3://b/cosyvoice2")
    DistillConfig(experiment="e", model="cosyvoice2", model_size="tiny", corpus="c", shards="s", storage="st",
                  evaluate={"enabled": False})


def test_stale_shards_are_never_reused_silently(ray_local, tmp_path):
    """Shards are reused only for the corpus and teacher files they were made from: through the chain
    (which used to skip the stage when only the settings matched), a changed corpus and new teacher
    weights at the same path are refused with the difference named; the same inputs are reused."""
    from pipeline.chain import run_chain
    from pipeline.config import DistillConfig

    spec = get_spec("cosyvoice2", "tiny")
    torch.manual_seed(0)
    spec.save(spec.build(), str(tmp_path / "teacher"))
    rows = corpus_rows(spec, 12, seed=2)
    write_corpus(tmp_path / "corpus", rows)
    config = DistillConfig(experiment="stale", model="cosyvoice2", model_size="tiny", corpus=str(tmp_path / "corpus"),
                           shards=str(tmp_path / "topk"), storage=str(tmp_path / "ckpt"),
                           teacher_source=str(tmp_path / "teacher"), precompute={"k": 4, "rows_per_shard": 8},
                           curriculum={"stages": 1, "window_start": 8, "window_target": 4}, tracking={"uri": None},
                           evaluate={"enabled": False})
    first = run_precompute(config.precompute_config())

    # The same inputs: the shards are reused, nothing is recomputed.
    again = run_precompute(config.precompute_config())
    assert again["shards"] == first["shards"]

    # One token changed in one row of the corpus.
    changed = [dict(r) for r in rows]
    changed[5]["input_ids"] = list(changed[5]["input_ids"])
    changed[5]["input_ids"][-1] = (changed[5]["input_ids"][-1] + 1) % spec.speech_range[1]
    write_corpus(tmp_path / "corpus", changed)
    with pytest.raises(ValueError, match=r"holds shards of another run .*input_fingerprint"):
        run_chain(config)
    write_corpus(tmp_path / "corpus", rows)

    # New teacher weights written over the old ones, same path, same settings.
    torch.manual_seed(1)
    spec.save(spec.build(), str(tmp_path / "teacher"))
    with pytest.raises(ValueError, match=r"teacher weights differ: teacher_files"):
        run_chain(config)


def test_teacher_weights_on_s3_are_read_from_the_configured_endpoint(s3_server, tmp_path, monkeypatch):
    """wand.models.weights opened its own S3 client with AWS_ENDPOINT_URL only, ignoring a config's
    s3_endpoint (an S3-compatible server such as MinIO)."""
    import s3fs

    from wand.models.weights import fingerprint, s3_endpoint

    spec = get_spec("cosyvoice2", "tiny")
    torch.manual_seed(5)
    teacher = spec.build()
    spec.save(teacher, str(tmp_path / "teacher"))
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint})
    fs.mkdir("endpoint-models", exist_ok=True)  # the session's S3 server may hold it from another test
    fs.put(str(tmp_path / "teacher") + "/", "endpoint-models/teacher/", recursive=True)
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only the configured endpoint knows where the bucket is
    monkeypatch.setenv("WAND_CACHE_DIR", str(tmp_path / "cache"))
    with s3_endpoint(s3_server.endpoint):
        loaded = spec.load("s3://endpoint-models/teacher")
    assert fingerprint(loaded.state_dict()) == fingerprint(teacher.state_dict())
