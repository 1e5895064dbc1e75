"""The student as an MLflow model, without a server: the promotion gates against hand-made metrics,
and the pyfunc loader (``pipeline.registry.pyfunc``) against ``wand.generate`` on the same folder.
The logged, registered and served model on a real ``mlflow server`` is in test_tracking.py."""

import json

import pytest
import torch

import wand
from helpers import wand_speech
from pipeline.evals.gates import check_gates, gate_metrics, missed, passed
from pipeline.registry.pyfunc import _load_pyfunc, DESCRIBE, prompt_of
from pipeline.synthetic.random_corpus import corpus_rows
from wand.models import get_spec

GOOD = {"kv_reduction_10s": 0.3, "kv_reduction_60s": 0.8, "latency_wand_ratio_late_early": 1.1}


def by_name(results):
    return {r.gate.name: r for r in results}


def test_gates_read_the_longest_length_and_need_kv_and_latency():
    results = by_name(check_gates(GOOD))
    assert results["kv_reduction"].value == 0.8  # 60 s, not 10 s: the longest length decides
    assert passed(check_gates(GOOD)) and missed(check_gates(GOOD)) == ""
    # Quality gates do not apply without the content eval; KV and latency are required.
    assert {n for n, r in results.items() if r.applies} == {"kv_reduction", "latency_flat"}
    assert not passed(check_gates({})) and "kv_reduction not measured" in missed(check_gates({}))
    assert not passed(check_gates({**GOOD, "kv_reduction_60s": 0.49}))
    assert not passed(check_gates({**GOOD, "latency_wand_ratio_late_early": 1.26}))
    assert gate_metrics(check_gates({**GOOD, "latency_wand_ratio_late_early": 2.0})) == {
        "gate_kv_reduction": 1.0, "gate_latency_flat": 0.0, "gates_passed": 0.0}


@pytest.mark.parametrize("key, value, gate", [
    ("stopped_student", 0.97, "stops"), ("speaker_accuracy_student", 0.98, "speaker"),
    ("length_ratio_student", 0.89, "length_ratio"), ("length_ratio_student", 1.11, "length_ratio"),
    ("per_student", 0.33, "per_gap")])
def test_each_quality_gate_misses_just_past_its_bound(key, value, gate):
    quality = {"stopped_student": 1.0, "speaker_accuracy_student": 1.0, "length_ratio_student": 1.0,
               "per_student": 0.31, "per_teacher": 0.30}
    assert passed(check_gates({**GOOD, **quality}))
    results = check_gates({**GOOD, **quality, key: value})
    assert [r.gate.name for r in results if not r.passed] == [gate]
    assert missed(results).startswith(f"{gate} ")
    if gate == "per_gap":
        assert by_name(results)["per_gap"].value == pytest.approx(0.33 - 0.30)


def saved_student(spec, folder, window=4):
    torch.manual_seed(3)
    spec.save(spec.build().eval(), folder)
    (folder / DESCRIBE).write_text(json.dumps({"model": spec.name, "model_size": spec.size, "window": window}))
    return folder


@pytest.mark.parametrize("name", ["cosyvoice2", "indextts", "sparktts"])
def test_pyfunc_generates_what_wand_generate_does_on_the_same_folder(name, tmp_path):
    spec = get_spec(name, "tiny")
    folder = saved_student(spec, tmp_path / "student")
    model = _load_pyfunc(str(folder))
    rows = [prompt_of(spec, r) for r in corpus_rows(spec, 2, seed=4)]
    out = model.predict(rows, {"max_new_tokens": 24})
    reference = wand.enable_wand(spec.load(str(folder)).eval(), 4)
    for row, got in zip(rows, out.to_dict(orient="records")):
        speech = wand_speech(spec, reference, 4, row, 24)
        assert got["speech_ids"] == speech and got["stopped"] == (len(speech) < 24)
        assert got["generated_tokens"] == len(speech)


def test_pyfunc_refuses_bad_rows_naming_the_row_and_field(tmp_path):
    spec = get_spec("indextts", "tiny")
    model = _load_pyfunc(str(saved_student(spec, tmp_path / "student")))
    row = prompt_of(spec, corpus_rows(spec, 1, seed=4)[0])
    cases = [({"prefix_length": 0}, "row 1: prefix_length must be an int in"),
             ({"input_ids": [spec.vocab_size]}, "row 1: indextts: token id .* outside the vocabulary"),
             ({"input_ids": []}, "row 1: input_ids: a non-empty list of ints"),
             ({"conditioning_latents": [0.0]}, "row 1: conditioning_latents has 1 values"),
             ({"conditioning_latents": None}, "row 1: missing column 'conditioning_latents'")]
    for change, message in cases:
        bad = {**row, **change}
        if "input_ids" in change:
            bad["prefix_length"] = max(1, len(bad["input_ids"]))
        with pytest.raises(ValueError, match=message):
            model.predict([row, bad], {"max_new_tokens": 2})
    with pytest.raises(ValueError, match="unknown params"):
        model.predict([row], {"max_tokens": 2})
    with pytest.raises(FileNotFoundError, match=DESCRIBE):
        _load_pyfunc(str(tmp_path))


def test_the_docs_gate_table_is_the_one_in_the_code():
    """docs/tracking-and-evals.md lists each gate with its bound; both come from GATES."""
    from pathlib import Path

    from pipeline.evals.gates import GATES

    docs = (Path(__file__).resolve().parents[1] / "docs" / "tracking-and-evals.md").read_text()
    rows = {line.split("|")[1].strip().strip("`"): line.split("|")[3].strip()
            for line in docs.splitlines() if line.startswith("| `") and line.count("|") == 5}
    expected = {}
    for gate in GATES:
        if gate.low is not None and gate.high is not None:
            expected[gate.name] = f"{gate.low:g} - {gate.high:g}"
        else:
            expected[gate.name] = f">= {gate.low:g}" if gate.low is not None else f"<= {gate.high:g}"
    assert {name: rows.get(name) for name in expected} == expected
    always = {g.name for g in GATES if g.required}
    assert always == {name for name, line in ((l.split("|")[1].strip().strip("`"), l) for l in docs.splitlines()
                                              if l.startswith("| `") and l.count("|") == 5) if "always" in line}
