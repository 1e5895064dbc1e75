"""Hostile and bad input, one case per kind: what the user gets for it. These are the rows of the
docs' "Bad input" table (docs/faults-and-bad-input.md; a test below keeps the two in step).

Corpus rows go through the precompute's own row check (``pipeline.data.corpus.RowChecker``; that the
precompute lists every such row with its file and writes nothing, or quarantines it, is
tests/data/test_precompute.py's bad-row tests on Ray). Configs go through the experiment config every
entry point loads; teacher sources through the loader the precompute and the stages share."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bad_input_builders import (
    Case,
    INPUT,
    ROOT,
    SECRET,
    checkpoint_error,
    cli_error,
    config_error,
    config_file,
    make_corpus_error,
    manifest_error,
    partial_stage_checkpoint,
    pickled_code,
    record,
    row_reason,
    shard_error,
    spark_teacher,
    speech,
    teacher_error,
    text_token,
    truncated,
    with_env,
)
from pipeline.config import DistillConfig

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
    # config values that cannot work
    Case("config: infinite epochs", config_error(curriculum={"epochs": float("inf")}),
         r"curriculum\.epochs: Input should be a finite number"),
    Case("config: NaN tau", config_error(curriculum={"tau_start": float("nan")}), r"curriculum\.tau_start: Input should be a finite number"),
    Case("config: seed beyond 63 bits", config_error(teacher_seed=2**70), r"teacher_seed: Input should be less than or equal to 9223372036854775807"),
    Case("config: negative GPUs", config_error(evaluate={"enabled": False, "num_gpus": -1}),
         r"evaluate\.num_gpus: must be >= 0 or 'auto'"),
    Case("config: window 0 for the window chooser", config_error(evaluate={"enabled": False, "windows": [0, -5]}),
         r"evaluate\.windows\.0: Input should be greater than or equal to 1"),
    Case("config: audio length out of range", config_error(evaluate={"enabled": False, "seconds": [-1, 1e12]}),
         r"evaluate\.seconds\.0: Input should be greater than 0.*evaluate\.seconds\.1: Input should be less than or equal to 3600"),
    Case("config: unknown evaluation device", config_error(evaluate={"enabled": False, "device": "garbage"}),
         r"evaluate\.device: String should match pattern"),
    Case("config: held-out corpus that is the training corpus, spelled differently",
         config_error(corpus="X/corpus.parquet", evaluate={"corpus": "./X/"}),
         r"evaluate\.corpus: the evals would score the training corpus"),
    Case("config: a token in a URL's query", config_error(s3_endpoint=f"http://127.0.0.1:9000/?X-Amz-Signature={SECRET}"),
         r"s3_endpoint: a URL with user-info \(user:password@\) or a credential in its query"),
    Case("config: user-info without a scheme", config_error(shards=f"bob:{SECRET}@bucket/topk"),
         r"shards: a URL with user-info"),
    # config files
    Case("config file: duplicate key", config_file("experiment: e\nmodel: cosyvoice2\nmodel: sparktts\n"),
         r"exit 2: .*exp\.yaml: line 3: duplicate key 'model' \(first at line 2\)"),
    Case("config file: a YAML tag that would run code", config_file(
        "experiment: !!python/object/apply:os.system ['touch executed']\n"),
        r"exit 2: .*line 1: the tag '!!python/object/apply:os\.system' is not allowed in a config"),
    Case("config file: two YAML documents", config_file("experiment: e\n---\nexperiment: f\n"),
         r"exit 2: .*holds 2 YAML documents"),
    Case("config file: experiments is not a list", config_file("experiments: cosyvoice2\n"),
         r"exit 2: .*experiments: must be a non-empty list of experiments"),
    Case("config file: experiments is empty", config_file("experiments:\n"),
         r"exit 2: .*experiments: must be a non-empty list of experiments"),
    Case("config file: a folder", config_file("", directory=True), r"exit 2: .*exp\.yaml: is a folder, not a YAML file"),
    Case("config file: not UTF-8", config_file(b"experiment: \xff\xfe\n"), r"exit 2: .*not UTF-8 text \(byte 12\)"),
    Case("cli: --set with malformed YAML", cli_error("--config", TINY, "--set", "curriculum.stages=[unclosed"),
         r"exit 2: .*--set curriculum\.stages: not valid YAML: line 1"),
    # environment variables
    Case("env: WAND_STORAGE_RETRY_S=nan", with_env("WAND_STORAGE_RETRY_S", "nan", cli_error("--config", TINY)),
         r"exit 2: .*WAND_STORAGE_RETRY_S: must be a finite number of seconds >= 0, got 'nan'"),
    Case("env: WAND_STORAGE_RETRY_S=abc", with_env("WAND_STORAGE_RETRY_S", "abc", cli_error("--config", TINY)),
         r"exit 2: .*WAND_STORAGE_RETRY_S: expected a number of seconds, got 'abc'"),
    # records for jobs/make_corpus.py
    Case("records: negative text ids", make_corpus_error(record(text_ids=[-3, 1])),
         r"exit 2: .*records\.jsonl, line 1: record 'r1': text_ids holds -3, outside the text vocabulary \[0, 64\)"),
    Case("records: empty input", make_corpus_error(""), r"exit 2: .*records\.jsonl: holds no records; nothing was written"),
    Case("records: a line that is a list", make_corpus_error(record() + "\n[1, 2]\n"),
         r"exit 2: .*records\.jsonl, line 2: a JSON list, not an object of fields"),
    Case("records: a number where a list belongs", make_corpus_error(record(text_ids=3)),
         r"exit 2: .*line 1: record 'r1': text_ids must be a list of integers"),
    Case("records: nested 100,000 deep", make_corpus_error('{"id": "r1", "text_ids": ' + "[" * 100_000 + "]" * 100_000 + "}"),
         r"exit 2: .*records\.jsonl, line 1: nested too deeply"),
    # weights
    Case("weights: safetensors lacking 25 of 38 tensors", teacher_error("sparktts", spark_teacher(
        lambda t: {k: t[k] for k in sorted(t)[:13]})), r"sparktts: .*spark does not hold this model's weights completely: missing 25"),
    Case("weights: NaN weights", teacher_error("sparktts", spark_teacher(
        lambda t: {k: v.fill_(float("nan")) if k == sorted(t)[0] else v for k, v in t.items()})),
        r"spark: \d tensor\(s\) hold NaN or inf values"),
    Case("weights: truncated llm.pt", teacher_error("cosyvoice2", truncated("llm.pt", "cosyvoice2")),
         r"input/cosyvoice2/llm\.pt: cannot be read as a torch weights file"),
    Case("weights: a stage checkpoint with 1 of its tensors", partial_stage_checkpoint,
         r"stage 1's checkpoint: .*checkpoint_000001 lacks \d+ of the model's tensors"),
    # stored files
    Case("manifest: not JSON", manifest_error(raw=b"{not json"), r"shards/manifest\.json: not a JSON manifest"),
    Case("manifest: no teacher", manifest_error(lambda m: {k: v for k, v in m.items() if k != "teacher"}),
         r"manifest\.json: teacher: missing or malformed"),
    Case("manifest: a shard path out of its folder", manifest_error(
        lambda m: {**m, "shards": [{**m["shards"][0], "file": "../../../../etc/hostname"}]}),
        r"shards\[0\]\.file names '\.\./\.\./\.\./\.\./etc/hostname': only a relative path inside its own folder"),
    Case("manifest: rows that its shards do not hold", manifest_error(lambda m: {**m, "rows": 10**9}),
         r"manifest\.json: rows: says 1000000000, its shards hold 3"),
    Case("shard: out-of-range top-k ids (sha256 updated)", shard_error(
        lambda c: {**c, "topk_indices": [[[0, 1, 2, 60000]] * len(c["topk_indices"][0])]}),
        r"shard-00000\.parquet: topk_indices holds top-k indices outside the speech targets \[0, \d+\)"),
    Case("shard: NaN log-probs (sha256 updated)", shard_error(
        lambda c: {**c, "topk_logprobs": [[[float("nan")] * 4] * len(c["topk_logprobs"][0])]}),
        r"shard-00000\.parquet: topk_logprobs holds NaN or log-probabilities above 0"),
    Case("checkpoint: a checksum list naming ../../dev/zero", checkpoint_error(
        {"../../../../dev/zero": {"bytes": 1, "sha256": "0" * 64}}),
        r"rank-0\.json names '\.\./\.\./\.\./\.\./dev/zero': only a relative path inside its own folder"),
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


# What each case told the user in this session (as the docs show it), so the docs' table is made
# from these runs instead of running every case again (some start a job and its Ray).
SHOWN: dict[str, str] = {}


@pytest.mark.parametrize("case", CASES, ids=[c.kind for c in CASES])
def test_bad_input_gets_a_clear_error(case, tmp_path):
    before = sorted(tmp_path.rglob("*"))
    message = case.run(tmp_path)
    SHOWN[case.kind] = shown(message, tmp_path)
    assert re.search(case.expect, message, re.S), message
    assert "Traceback" not in message and SECRET not in message, message  # one clear line, no credential
    if message.startswith("exit "):  # what an entry point does with it: exit status 2
        assert message.startswith("exit 2:"), message
    created = sorted(set(tmp_path.rglob("*")) - set(before))
    assert all(p.relative_to(tmp_path).parts[0] == INPUT for p in created), created  # nothing written
    assert not (tmp_path / "executed").exists() and not (ROOT / "executed").exists()  # no pickled or tagged code ran


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


# What happens to each kind of input, by the case's prefix (the table's middle column).
WHAT_HAPPENS = {
    "row": "listed with file and id, nothing written (or quarantined)",
    "config": "refused before anything runs",
    "config file": "exit status 2 with the usage, no traceback",
    "cli": "exit status 2 with the usage",
    "env": "exit status 2 with the usage",
    "records": "listed with file and line, exit status 2, nothing written",
    "weights": "refused naming the file, before anything is computed",
    "teacher": "refused before anything is computed",
    "manifest": "refused naming the file and field, before training reads it",
    "shard": "refused by name before its rows reach training",
    "checkpoint": "skipped with a warning naming it; the resume takes the one before",
}


def shown(message: str, tmp: Path) -> str:
    """A case's message as the docs show it: one line, temp folders as <tmp>, the repo as '.'."""
    lines = [line for line in message.removeprefix("exit 2: ").splitlines()
             if not line.startswith(("usage:", " " * 10))]
    text = " ".join(line.strip() for line in lines)
    text = re.sub(r"^\S+\.py: error: ", "", text).replace(str(tmp), "<tmp>").replace(str(ROOT), ".")
    text = text.replace("|", "\\|")
    return text if len(text) <= 150 else text[:150] + " ..."


def docs_table() -> str:
    """The docs' table of bad input, made by running every case (python tests/test_bad_input.py)."""
    import tempfile

    rows = ["| input | what happens | what the user is told |", "|---|---|---|"]
    for case in CASES:
        if case.kind in SHOWN:
            message = SHOWN[case.kind]
        else:
            with tempfile.TemporaryDirectory() as tmp:
                message = shown(case.run(Path(tmp)), Path(tmp))
        rows.append(f"| {case.kind} | {WHAT_HAPPENS[case.kind.split(':')[0]]} | {message} |")
    return "\n".join(rows)


def test_the_docs_table_is_made_from_the_cases():
    page = (ROOT / "docs" / "faults-and-bad-input.md").read_text()
    start = page.index("| input |", page.index("## Bad input"))
    end = page.find("\n\n", start)
    table = page[start: end if end >= 0 else None].rstrip("\n")
    assert table == docs_table(), "docs/faults-and-bad-input.md's bad-input table is stale: python tests/test_bad_input.py prints it"


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(ROOT))
    print(docs_table())
