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
from pipeline.teacher_topk import FAULT_ENV, PrecomputeConfig, ShardFault, decode_values, load_manifest, run_precompute, verify_manifest
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
    spec = get_spec(config.teacher, config.teacher_size)
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
    manifest = load_manifest(config.output)
    stored = {r["id"]: r for r in read_shards(config.output, manifest)}
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
    config = PrecomputeConfig(teacher="cosyvoice2", teacher_size="tiny", input=str(tmp_path / "in"),
                              output=str(tmp_path / "out"), k=8, temperature=0.8, value_dtype="float32",
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
    config = PrecomputeConfig(teacher="indextts", teacher_size="tiny", input="s3://corpus/tiny",
                              output="s3://corpus/topk", k=4, value_dtype="bfloat16", rows_per_shard=5)
    manifest = run_precompute(config)
    assert fs.exists("corpus/topk/manifest.json") and len(manifest["shards"]) == 3
    check_round_trip(config, rows, atol=0.02)  # bf16 keeps 8 bits of mantissa


def test_interrupted_run_resumes_and_keeps_every_row_once(ray_local, tmp_path, monkeypatch):
    spec = get_spec("llasa-1b", "tiny")
    rows = corpus_rows(spec, 30, seed=3)
    write_corpus(tmp_path / "in", rows, parts=3)
    config = PrecomputeConfig(teacher="llasa-1b", teacher_size="tiny", input=str(tmp_path / "in"),
                              output=str(tmp_path / "out"), k=4, rows_per_shard=6)
    monkeypatch.setenv(FAULT_ENV, f"3:{tmp_path / 'failed-once'}")
    with pytest.raises(Exception) as info:
        run_precompute(config)
    assert "injected failure on shard 3" in str(info.value) or isinstance(info.value, ShardFault)
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not (tmp_path / "out" / "shard-00003.json").exists()
    manifest = run_precompute(config)
    ids = [r["id"] for r in read_shards(config.output, manifest)]
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
    config = PrecomputeConfig(teacher="cosyvoice2", teacher_size="tiny", input=str(tmp_path / "in"),
                              output=str(tmp_path / "out"), k=4)
    with pytest.raises(ValueError) as info:
        run_precompute(config)
    message = str(info.value)
    for row_id, reason in reasons.items():
        line = next(line for line in message.splitlines() if f"id {row_id!r}" in line)
        assert reason in line and f"part-" in line
    assert "nothing was written" in message
    assert not (tmp_path / "out").exists()


def test_bad_rows_quarantine(ray_local, tmp_path):
    spec = get_spec("cosyvoice2", "tiny")
    rows, reasons = bad_corpus(spec)
    write_corpus(tmp_path / "in", rows)
    config = PrecomputeConfig(teacher="cosyvoice2", teacher_size="tiny", input=str(tmp_path / "in"),
                              output=str(tmp_path / "out"), k=4, on_bad_rows="quarantine")
    manifest = run_precompute(config)
    errors = pq.read_table(tmp_path / "out" / "errors" / "bad_rows.parquet").to_pylist()
    assert manifest["bad_rows"] == {"mode": "quarantine", "count": len(errors), "file": "errors/bad_rows.parquet"}
    by_id = {}
    for e in errors:
        by_id.setdefault(e["id"], []).append(e["reason"])
    for row_id, reason in reasons.items():
        assert any(reason in r for r in by_id[row_id]), (row_id, by_id.get(row_id))
    stored = {r["id"] for r in read_shards(config.output, manifest)}
    assert stored.isdisjoint(by_id) and manifest["rows"] == len(stored) > 0


def test_config_errors_name_the_field():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="unknown teacher preset 'tacotron'"):
        PrecomputeConfig(teacher="tacotron", input="x", output="y")
    with pytest.raises(ValidationError, match="k=500 exceeds the target vocabulary"):
        PrecomputeConfig(teacher="cosyvoice2", teacher_size="tiny", input="x", output="y", k=500)
    with pytest.raises(ValidationError, match="temperature"):
        PrecomputeConfig(teacher="cosyvoice2", input="x", output="y", temperature=0)
    with pytest.raises(ValidationError, match="rows_per_shard"):
        PrecomputeConfig(teacher="cosyvoice2", input="x", output="y", rows_per_shard=0)


def test_a_real_size_teacher_without_weights_is_a_config_error():
    """It used to distil silently from a randomly initialised 0.5B teacher."""
    from pydantic import ValidationError

    from pipeline.chain import DistillConfig
    from pipeline.train import TrainConfig

    with pytest.raises(ValidationError, match="teacher_source: a real-size model needs its released weights"):
        PrecomputeConfig(teacher="cosyvoice2", input="x", output="y")
    with pytest.raises(ValidationError, match="teacher_source: a real-size model needs its released weights"):
        TrainConfig(experiment="e", model="cosyvoice2", shards="s", storage="st")
    with pytest.raises(ValidationError, match="teacher_source: a real-size model needs its released weights"):
        DistillConfig(experiment="e", model="cosyvoice2", corpus="c", shards="s", storage="st",
                      evaluate={"enabled": False})
    # With weights named, or at a test size, it is fine.
    PrecomputeConfig(teacher="cosyvoice2", input="x", output="y", teacher_source="s3://b/cosyvoice2")
    DistillConfig(experiment="e", model="cosyvoice2", model_size="tiny", corpus="c", shards="s", storage="st",
                  evaluate={"enabled": False})


def test_stale_shards_are_never_reused_silently(ray_local, tmp_path):
    """Shards are reused only for the corpus and teacher files they were made from: through the chain
    (which used to skip the stage when only the settings matched), a changed corpus and new teacher
    weights at the same path are refused with the difference named; the same inputs are reused."""
    from pipeline.chain import DistillConfig, run_chain

    spec = get_spec("cosyvoice2", "tiny")
    torch.manual_seed(0)
    spec.save(spec.build(), str(tmp_path / "teacher"))
    rows = corpus_rows(spec, 12, seed=2)
    write_corpus(tmp_path / "corpus", rows)
    config = DistillConfig(experiment="stale", model="cosyvoice2", model_size="tiny", corpus=str(tmp_path / "corpus"),
                           shards=str(tmp_path / "topk"), storage=str(tmp_path / "ckpt"),
                           teacher_source=str(tmp_path / "teacher"), precompute={"k": 4, "rows_per_shard": 8},
                           train={"stages": 1, "window_start": 8, "window_target": 4}, tracking={"uri": None},
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
