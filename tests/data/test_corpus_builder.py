"""Corpus rows from tokenized data, token by token against the upstream layouts written out by hand
(tiny presets: their small id spaces keep the hand-written sequences short), with the stop id after
the targets."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.corpus import check_batch
from pipeline.data.corpus_builder import build_row, build_rows, code_count, RowError
from wand.models import get_spec

ROOT = Path(__file__).resolve().parents[2]


def test_cosyvoice2_row():
    # cosyvoice/llm/llm.py, Qwen2LM.forward: inputs [sos_eos, text, task_id, speech], targets
    # [IGNORE] * (2 + text_len) + speech + [speech_token_size]. Tiny preset: speech_token_size S = 61,
    # sos = S + 3 = 64, task_id = S + 4 = 65, text ids offset by S + 5 = 66.
    spec = get_spec("cosyvoice2", "tiny")
    row = build_row(spec, {"id": "u1", "text_ids": [3, 7], "prompt_codes": [5], "target_codes": [9, 2]})
    assert row == {"id": "u1", "input_ids": [64, 69, 73, 65, 5, 9, 2, 61], "prefix_length": 5, "prompt_length": 1}


def test_indextts_row():
    # indextts/gpt/model.py, UnifiedVoice.forward: [conditioning latents, start_text, text, stop_text,
    # start_mel] then mel codes, targets padded with stop_mel_token. Tiny preset: 4 latent slots (id 66
    # = number_mel_codes), start_text 0 / stop_text 1 / BPE ids offset by 67, start_mel 64, stop_mel 65.
    spec = get_spec("indextts", "tiny")
    latents = [0.5] * (4 * spec.config["n_embd"])
    row = build_row(spec, {"id": "u2", "text_ids": [4, 6], "target_codes": [10, 11], "conditioning_latents": latents})
    assert row["input_ids"] == [66, 66, 66, 66, 67, 71, 73, 68, 64, 10, 11, 65]
    assert row["prefix_length"] == 9 and row["prompt_length"] == 0 and row["conditioning_latents"] == latents
    assert code_count(spec) == 64  # start_mel and stop_mel are not codes


def test_sparktts_row():
    # sparktts/cli/SparkTTS.py, process_prompt (voice cloning): <|task_tts|><|start_content|> text
    # <|end_content|><|start_global_token|> globals <|end_global_token|><|start_semantic_token|>
    # prompt semantic, then the semantic tokens and <|im_end|>. Tiny preset ids 64..70, globals from
    # 71, semantic tokens from 103.
    spec = get_spec("sparktts", "tiny")
    globals_ = list(range(32))
    row = build_row(spec, {"id": "u3", "text_ids": [5, 6], "global_codes": globals_, "prompt_codes": [3],
                           "target_codes": [7]})
    assert row["input_ids"] == [64, 65, 5, 6, 66, 67, *[71 + g for g in globals_], 68, 69, 106, 110, 70]
    assert row["prefix_length"] == len(row["input_ids"]) - 2 and row["prompt_length"] == 1


def test_llasa_and_orpheus_rows():
    # Llasa (model card inference): template + text ... <|SPEECH_GENERATION_START|> <|s_N|>...
    # <|SPEECH_GENERATION_END|>; tiny: start 68, <|s_0|> = 72, end 69.
    llasa = build_row(get_spec("llasa-3b", "tiny"), {"id": "l", "text_ids": [1, 2, 3], "prompt_codes": [4],
                                                      "target_codes": [0, 255]})
    assert llasa["input_ids"] == [1, 2, 3, 68, 76, 72, 327, 69] and llasa["prefix_length"] == 5
    # Orpheus (orpheus_tts engine): prompt tokens, start_of_speech, SNAC tokens, end_of_speech;
    # tiny: start 65, first audio token 74, end 66.
    orpheus = build_row(get_spec("orpheus-3b", "tiny"), {"id": "o", "text_ids": [8, 9], "target_codes": list(range(7))})
    assert orpheus["input_ids"] == [8, 9, 65, *range(74, 81), 66] and orpheus["prefix_length"] == 3


@pytest.mark.parametrize("model", ["cosyvoice2", "indextts", "sparktts", "llasa-3b", "orpheus-3b"])
def test_built_rows_pass_the_row_checks_and_end_with_the_stop_id(model):
    spec = get_spec(model, "tiny")
    record = {"id": "x", "text_ids": [2, 3, 4], "prompt_codes": [1, 2], "target_codes": [3, 4, 5]}
    if spec.family == "sparktts":
        record["global_codes"] = [0] * 32
    if spec.family == "indextts":
        record["conditioning_latents"] = [0.0] * (spec.extra["num_latents"] * spec.config["n_embd"])
    row = build_row(spec, record)
    assert row["input_ids"][-1] == spec.stop_token_ids[0]
    checked = check_batch(pa.Table.from_pylist([{**row, "path": "p"}]), spec).to_pylist()
    assert checked[0]["reason"] is None


def test_bad_records_name_the_record_and_the_field():
    spec = get_spec("cosyvoice2", "tiny")
    cases = [({"id": "a", "text_ids": [1], "target_codes": [61]}, "record 'a': target_codes holds 61, outside"),
             ({"id": "b", "text_ids": [1]}, "record 'b': missing field 'target_codes'"),
             ({"id": "c", "text": "hello", "target_codes": [1]}, "record 'c': has text but no text_ids"),
             ({"id": "d", "text_ids": [1.5], "target_codes": [1]}, "record 'd': text_ids must be a list of integers"),
             ({"id": "e", "text_ids": [1], "target_codes": []}, "record 'e': target_codes is empty"),
             ({"id": "f", "text_ids": [100], "target_codes": [1]}, "record 'f': text_ids holds 100, outside the text vocabulary"),
             ({"id": "g", "text_ids": [-3], "target_codes": [1]}, "record 'g': text_ids holds -3, outside the text vocabulary")]
    for record, message in cases:
        with pytest.raises(RowError, match=message):
            build_row(spec, record)
    with pytest.raises(RowError, match="conditioning_latents has 3 values"):
        build_row(get_spec("indextts", "tiny"), {"id": "g", "text_ids": [1], "target_codes": [1],
                                                 "conditioning_latents": [1.0, 2.0, 3.0]})
    rows, problems = build_rows(spec, [{"id": "h", "text_ids": [1], "target_codes": [1]}] * 2 + [cases[0][0]])
    assert len(rows) == 1 and problems == ["record 'h': duplicate id",
                                           "record 'a': target_codes holds 61, outside the codec's codes [0, 61)"]


def test_make_corpus_job_writes_all_or_nothing(tmp_path):
    records = [{"id": f"u{i}", "text_ids": [1, 2], "target_codes": [3, 4, i]} for i in range(5)]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    cmd = [sys.executable, "-m", "jobs.make_corpus", "--model", "cosyvoice2", "--size", "tiny",
           "--input", str(tmp_path / "in.jsonl")]
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    out = subprocess.run([*cmd, "--output", str(tmp_path / "corpus")], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    manifest = json.loads((tmp_path / "corpus" / "corpus.json").read_text())
    rows = pa.concat_tables([pq.read_table(tmp_path / "corpus" / f["name"]) for f in manifest["files"]]).to_pylist()
    assert [r["id"] for r in rows] == [f"u{i}" for i in range(5)] and all(r["input_ids"][-1] == 61 for r in rows)
    assert manifest["rows"] == 5 and "records/s" in out.stderr  # progress lines
    records[3]["target_codes"] = [999]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    out = subprocess.run([*cmd, "--output", str(tmp_path / "bad")], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env=env)
    assert out.returncode == 2 and "in.jsonl, line 4: record 'u3': target_codes holds 999" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "bad").exists()
