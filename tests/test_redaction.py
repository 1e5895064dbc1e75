"""Credentials never printed (pipeline.redaction) and configs read as strict YAML 1.2 (pipeline.yaml_strict)."""

from __future__ import annotations

import logging

import pytest

from pipeline.redaction import has_credentials, install_log_redaction, redact
from pipeline.yaml_strict import ConfigFileError, load

SECRET = "hunter2pw"


@pytest.mark.parametrize("text", [
    f"http://bob:{SECRET}@127.0.0.1:5000/api",       # user-info with a scheme
    f"bob:{SECRET}@mlflow.internal:5000",             # ... and without one
    f"s3://AKIAKEY:{SECRET}@bucket/key",
    f"sqlite:////data/mlflow.db?password={SECRET}&mode=rw",
    f"https://host/x?token={SECRET}",
    f"https://bucket.s3.amazonaws.com/k?X-Amz-Credential=AKIA&X-Amz-Signature={SECRET}",
    f"https://acct.blob.core.windows.net/c/b?sv=2024&sig={SECRET}",
    f"postgresql://u@h/db?sslmode=require&api_key={SECRET}",
])
def test_credentials_in_any_part_of_a_uri_are_found_and_redacted(text):
    assert has_credentials(text)
    out = redact(f"failed to reach {text} (timeout)")
    assert SECRET not in out and "***" in out and out.startswith("failed to reach ") and out.endswith("(timeout)")


@pytest.mark.parametrize("text", ["http://127.0.0.1:5000", "s3://bucket/corpus/part-0.parquet", "user@example.com",
                                  "runs:/abc123/model", "https://h/x?page=2&sort=asc", "teachers/cosyvoice2"])
def test_plain_locations_are_left_alone(text):
    assert not has_credentials(text) and redact(text) == text


def test_log_lines_are_redacted_by_every_handler(capsys):
    root = logging.getLogger()
    handler = logging.StreamHandler()
    root.addHandler(handler)
    try:
        install_log_redaction()
        logging.getLogger("wand.test").warning("could not reach %s", f"http://bob:{SECRET}@host")
        try:
            raise RuntimeError(f"GET https://host/x?token={SECRET} failed")
        except RuntimeError:
            logging.getLogger("wand.test").exception("request failed")
    finally:
        root.removeHandler(handler)
    err = capsys.readouterr().err
    assert "could not reach http://***@host" in err and "token=***" in err and SECRET not in err


def test_yaml_is_read_as_yaml_1_2():
    values = load("a: 010\nb: 0o10\nc: 0x1f\nd: yes\ne: 1:30\nf: true\ng: 1e3\nh: .inf\ni: ~\nj: 2026-01-01\n", "f.yaml")
    assert values == {"a": 10, "b": 8, "c": 31, "d": "yes", "e": "1:30", "f": True, "g": 1000.0, "h": float("inf"),
                      "i": None, "j": "2026-01-01"}


@pytest.mark.parametrize("text, message", [
    ("a: 1\nb: 2\na: 3\n", r"f\.yaml: line 3: duplicate key 'a' \(first at line 1\)"),
    ("a: {x: 1, x: 2}\n", r"line 1: duplicate key 'x'"),
    ("a: !!python/name:os.system\n", r"the tag '!!python/name:os\.system' is not allowed"),
    ("a: !!timestamp 2026-01-01\n", r"the tag '!!timestamp' is not allowed"),
    ("a: 1\n---\na: 2\n", r"holds 2 YAML documents"),
    ("a: [1, 2\n", r"not valid YAML: line 2"),
    (b"a: \xc3\x28\n", r"not UTF-8 text \(byte 3\)"),
])
def test_malformed_yaml_is_one_line_naming_the_file(text, message):
    with pytest.raises(ConfigFileError, match=message) as err:
        load(text, "f.yaml")
    assert str(err.value).startswith("f.yaml: ") and "\n" not in str(err.value)
