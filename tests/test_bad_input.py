"""Hostile and bad input, one case per kind: what the user gets for it. These are the rows of the
README's "Bad input" table (a test below keeps the two in step).

Corpus rows go through the precompute's own row check (``pipeline.corpus.RowChecker``; that the
precompute lists every such row with its file and writes nothing, or quarantines it, is
tests/test_precompute.py's bad-row tests on Ray). Configs go through the experiment config every
entry point loads; teacher sources through the loader the precompute and the stages share."""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from helpers import corpus_rows
from pipeline.chain import DistillConfig
from pipeline.cli import load_experiments
from pipeline.corpus import RowChecker
from wand.models import get_spec

ROOT = Path(__file__).resolve().parents[1]
INPUT = "input"  # what a case hands the pipeline (a config file, a weights file) goes here


@dataclass(frozen=True)
class Case:
    kind: str  # the README row
    run: Callable[[Path], str]  # returns what the user is told (an error message or a row's reason)
    expect: str  # a regex the message must match: it names the row, field or path


def row_reason(change: Callable[[dict], dict], model: str = "cosyvoice2") -> Callable[[Path], str]:
    def run(_tmp: Path) -> str:
        spec = get_spec(model, "tiny")
        row = change(dict(corpus_rows(spec, 1, seed=3)[0]))
        return RowChecker(spec).reason(row) or "accepted"
    return run


def speech(model: str = "cosyvoice2") -> int:
    return int(get_spec(model, "tiny").target_ids()[0])


def text_token(model: str = "cosyvoice2") -> int:
    spec = get_spec(model, "tiny")
    return min(set(range(spec.vocab_size)) - set(spec.target_ids().tolist()))


def config_error(**fields) -> Callable[[Path], str]:
    """An experiment config with ``fields`` changed, loaded the way every entry point loads one."""
    def run(tmp: Path) -> str:
        values = {"experiment": "e", "model": "cosyvoice2", "model_size": "tiny", "corpus": "c", "shards": "s",
                  "storage": "st", "evaluate": {"enabled": False}, **fields}
        (tmp / INPUT).mkdir(exist_ok=True)
        (tmp / INPUT / "exp.yaml").write_text(yaml.safe_dump(values))
        return cli_error("--config", str(tmp / INPUT / "exp.yaml"))(tmp)
    return run


def cli_error(*argv: str) -> Callable[[Path], str]:
    def run(tmp: Path) -> str:
        import contextlib
        import io

        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                load_experiments(DistillConfig, argparse.ArgumentParser(prog="distill.py"),
                                 [*argv, "--root", str(tmp)])
        except SystemExit as exit_:
            return f"exit {exit_.code}: {stderr.getvalue()}"
        except ValueError as err:
            return str(err)
        return "accepted"
    return run


def teacher_error(model: str, source: Callable[[Path], str]) -> Callable[[Path], str]:
    def run(tmp: Path) -> str:
        from pipeline.teacher_topk import teacher_weights

        try:
            teacher_weights(get_spec(model, "mini"), source(tmp), 0, None)
        except ValueError as err:
            return str(err)
        return "accepted"
    return run


class Payload:
    """Unpickling this would run a shell command that leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pickled_code(tmp: Path) -> str:
    (tmp / INPUT).mkdir()
    torch.save({"model": Payload(tmp / "executed")}, tmp / INPUT / "llm.pt")
    return str(tmp / INPUT)


TINY = str(ROOT / "jobs" / "configs" / "tiny.yaml")

CASES = [
    # corpus rows
    Case("row: token id outside the vocabulary", row_reason(lambda r: {**r, "input_ids": r["input_ids"][:-1] + [10**6]}),
         r"token id 1000000 at position \d+ outside the vocabulary \[0, \d+\)"),
    Case("row: empty generated part", row_reason(lambda r: {**r, "input_ids": r["input_ids"][: r["prefix_length"]]}),
         r"prefix_length \d+ outside \[1, \d+\) \(every row needs a prefix and at least one target token\)"),
    Case("row: prefix longer than the row", row_reason(lambda r: {**r, "prefix_length": len(r["input_ids"]) + 5}),
         r"prefix_length \d+ outside \[1, \d+\)"),
    Case("row: NaN prefix length", row_reason(lambda r: {**r, "prefix_length": float("nan")}),
         r"prefix_length nan is not an integer"),
    Case("row: negative prefix length", row_reason(lambda r: {**r, "prefix_length": -3}), r"prefix_length -3 outside"),
    Case("row: float prefix length (wrong dtype)", row_reason(lambda r: {**r, "prefix_length": float(r["prefix_length"])}),
         r"is a float.*write the column as int64"),
    Case("row: float token ids (wrong dtype)", row_reason(lambda r: {**r, "input_ids": r["input_ids"][:-1] + [7.5]}),
         r"input_ids holds 7\.5 \(float\): token ids must be integers"),
    Case("row: missing column", row_reason(lambda r: {**r, "prefix_length": None}), r"missing column 'prefix_length'"),
    Case("row: text token where speech is generated", row_reason(lambda r: {**r, "input_ids": r["input_ids"] + [text_token()]}),
         r"target token \d+ at position \d+ is not a speech or stop id of cosyvoice2"),
    Case("row: 10x longer than the model's context", row_reason(
        lambda r: {**r, "input_ids": r["input_ids"] + [speech()] * 10 * 4096}),
        r"\d+ tokens, longer than cosyvoice2's context of 4096 positions"),
    Case("row: more speech than IndexTTS has mel positions", row_reason(
        lambda r: {**r, "input_ids": r["input_ids"][: r["prefix_length"]] + [speech("indextts")] * 4000}, "indextts"),
        r"4000 generated tokens, more than indextts's limit of \d+"),
    # experiment configs
    Case("config: unknown key", config_error(windw=3), r"windw: Extra inputs are not permitted"),
    Case("config: wrong type", config_error(precompute={"k": "many"}), r"precompute\.k: Input should be a valid integer"),
    Case("config: window wider than the context", config_error(curriculum={"window_start": 100_000}),
         r"curriculum\.window_start \(100000\) is wider than cosyvoice2's context of 4096"),
    Case("config: window_target above window_start", config_error(curriculum={"window_start": 8, "window_target": 16}),
         r"curriculum\.window_target \(16\) must be <= window_start \(8\)"),
    Case("config: k larger than the vocabulary", config_error(precompute={"k": 100_000}),
         r"precompute\.k \(100000\) exceeds the target vocabulary of cosyvoice2"),
    Case("config: zero workers", config_error(train={"num_workers": 0}), r"train\.num_workers: Input should be greater than"),
    Case("config: empty storage path", config_error(storage=""), r"storage: String should have at least 1 character"),
    Case("config: unknown model", config_error(model="tacotron"), r"unknown model preset 'tacotron'"),
    Case("config: experiment name that is a path", config_error(experiment="../x"), r"experiment must be letters"),
    Case("config: credentials in the tracking URI", config_error(tracking={"uri": "http://bob:hunter2pw@127.0.0.1:5000"}),
         r"tracking\.uri: put MLflow credentials in MLFLOW_TRACKING_USERNAME"),
    Case("config: credentials in any other URL", config_error(s3_endpoint="http://AKIAKEY:hunter2pw@127.0.0.1:9000"),
         r"s3_endpoint: a URL with user-info \(user:password@\) or a credential in its query.*credentials come from the environment"),
    # teacher sources
    Case("teacher: missing folder", teacher_error("cosyvoice2", lambda tmp: str(tmp / "no-such-teacher")),
         r"no such file or directory: .*no-such-teacher"),
    Case("teacher: another family's checkpoint", teacher_error("indextts", lambda _: str(ROOT / "teachers/cosyvoice2/llm.pt")),
         r"indextts: .*llm\.pt does not match this preset's architecture: missing"),
    Case("teacher: a folder without the family's weights file", teacher_error("cosyvoice2", lambda _: str(ROOT / "teachers/sparktts")),
         r"teachers/sparktts holds none of llm\.pt"),
    Case("teacher: a pickle that runs code", teacher_error("cosyvoice2", pickled_code),
         r"input/llm\.pt: refused: it pickles objects other than tensors"),
    # command lines
    Case("cli: --set without a value", cli_error("--config", TINY, "--set", "curriculum.stages"),
         r"exit 2: .*--set curriculum\.stages: expected FIELD=VALUE"),
    Case("cli: --set of an unknown field", cli_error("--config", TINY, "--set", "train.batchsize=4"),
         r"train\.batchsize: Extra inputs are not permitted"),
    Case("cli: --config that does not exist", cli_error("--config", "/no/such.yaml"), r"exit 2: .*--config: no such file: /no/such\.yaml"),
    Case("cli: --only an unknown experiment", cli_error("--config", TINY, "--only", "tacotron"),
         r"exit 2: .*--only tacotron: no experiment or model of that name"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.kind for c in CASES])
def test_bad_input_gets_a_clear_error(case, tmp_path):
    before = sorted(tmp_path.rglob("*"))
    message = case.run(tmp_path)
    assert re.search(case.expect, message, re.S), message
    created = sorted(set(tmp_path.rglob("*")) - set(before))
    assert all(p.relative_to(tmp_path).parts[0] == INPUT for p in created), created  # nothing written
    assert not (tmp_path / "executed").exists()  # no pickled code ran


def test_error_messages_do_not_echo_secrets(tmp_path):
    uri = {"uri": "http://bob:hunter2pw@127.0.0.1:5000"}
    for fields in ({"tracking": uri}, {"model": "tacotron", "tracking": uri}, {"windw": "hunter2pw"},
                   {"corpus": "s3://bob:hunter2pw@bucket/corpus"}):
        message = config_error(**fields)(tmp_path)
        assert "invalid config" in message and "hunter2pw" not in message
    with pytest.raises(ValueError) as err:  # in code, not only through the command line
        DistillConfig.model_validate({"experiment": "e", "model": "tacotron", "corpus": "c", "shards": "s",
                                      "storage": "st", "tracking": uri})
    assert "hunter2pw" not in str(err.value)


def test_an_s3_location_without_credentials_fails_before_anything_is_written(monkeypatch, tmp_path):
    from pipeline import storage

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup: loopback traffic only
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(storage.StorageError, match=r"s3://bucket/topk: no S3 credentials found\. Set AWS_ACCESS_KEY_ID"):
        storage.require_credentials(str(tmp_path / "corpus"), "s3://bucket/topk")
    storage.require_credentials(str(tmp_path / "corpus"))  # local paths need none
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "example-secret")
    storage.require_credentials("s3://bucket/topk")


def test_the_readme_table_lists_every_case():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("### Bad input"):]
    table = table[: table.index("\n\n", table.index("|"))]
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[1:] == [c.kind for c in CASES]
