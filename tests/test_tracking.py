"""MLflow tracking of the tiny chain against a real ``mlflow server`` (queried over HTTP)."""

import json
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import wand
from helpers import corpus_rows
from pipeline.chain import run_chain
from pipeline.config import DistillConfig
from pipeline.config import TrackingConfig
from pipeline.redaction import redact
from pipeline.tracking import load_logged_student
from pipeline.train.worker import FAULT_ENV
from wand.models import get_spec

ROOT = Path(__file__).resolve().parents[1]
SECRETS = {"AWS_SESSION_TOKEN": "sess-token-7c1e5b90d2", "WAND_TEST_API_TOKEN": "tok-3f9a1c77e0e1"}


def test_redact_removes_secret_env_values_and_url_userinfo(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_PASSWORD", "hunter2-hunter2")
    monkeypatch.setenv("HOME_DIR_NAME", "hunter2-hunter2-not-secret-name")
    assert redact("x hunter2-hunter2 y") == "x *** y"
    assert redact("https://alice:pw@host/path s3://k:s@b/x") == "https://***@host/path s3://***@b/x"
    assert redact({"a": 1}) == "{'a': 1}"


def test_redact_removes_the_ray_token_that_the_environment_points_at(monkeypatch, tmp_path):
    from pipeline.services import read_token, write_token

    token = read_token(write_token(tmp_path / "token"))
    assert len(token) == 64 and (tmp_path / "token").stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    assert redact(f"logged {token} here") == "logged *** here"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    assert redact(f"logged {token} here") == f"logged {token} here"  # nothing to read: nothing known


def test_tracking_uri_with_credentials_is_refused(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValueError, match="uri\n.*put MLflow credentials in") as err:  # when the config is read
        TrackingConfig(uri="http://bob:secret@127.0.0.1:5000")
    assert "secret" not in str(err.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://bob:secret@127.0.0.1:5000")
    with pytest.raises(ValueError, match="tracking.uri: put MLflow credentials in"):  # from the environment
        TrackingConfig().resolved_uri()
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert TrackingConfig().resolved_uri() is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert TrackingConfig().resolved_uri() == "http://127.0.0.1:1"


def test_log_steps_is_idempotent_and_reattaches(mlflow_server):
    from pipeline.tracking import Tracker

    tracker = Tracker(mlflow_server.uri, "wand-tts-unit")
    parent = tracker.parent_run("unit", {"wand.model": "cosyvoice2"})
    child = tracker.child_run(parent, "stage-1")
    history = [{"step": i, "loss": 1 / (i + 1), "ce": 0.5, "kd": 0.1, "window": 8, "tau": 1.0, "lr": 1e-3,
                "tokens_per_s": 100.0} for i in range(300)]  # 2,100 values: more than one log_batch call
    assert tracker.log_steps(child, history[:120]) == 120
    assert tracker.log_steps(child, history[:200]) == 80  # a restart re-sends its checkpoint's history
    assert tracker.log_steps(child, history) == 100
    assert tracker.log_steps(child, history) == 0
    for key in ("loss", "tokens_per_s"):
        assert sorted(m.step for m in tracker.client.get_metric_history(child, key)) == list(range(300))
    assert tracker.parent_run("unit", {}) == parent and tracker.child_run(parent, "stage-1") == child
    fresh = tracker.child_run(parent, "eval")
    assert tracker.child_run(parent, "eval", fresh=True) != fresh  # eval tables are replaced, not appended


@pytest.fixture(scope="module")
def tracked(ray_local, mlflow_server, tmp_path_factory):
    """The tiny chain with tracking: stage 1 fails once (a worker dies, no retries), the same
    command is submitted again and resumes; then a third submission finds everything done."""
    root = tmp_path_factory.mktemp("tracked")
    spec = get_spec("cosyvoice2", "tiny")
    # A secret that leaks into a config value (here a folder name) must still not reach MLflow.
    corpus = root / f"corpus-{SECRETS['WAND_TEST_API_TOKEN']}"
    corpus.mkdir()
    pq.write_table(pa.Table.from_pylist(corpus_rows(spec, 32, seed=31, min_gen=24, max_gen=40)), corpus / "c.parquet")
    config = DistillConfig(
        experiment="tracked-cosyvoice2", model="cosyvoice2", model_size="tiny", corpus=str(corpus),
        shards=str(root / "topk"), storage=str(root / "ckpt"), precompute={"k": 8, "rows_per_shard": 16},
        curriculum={"stages": 2, "window_start": 16, "window_target": 4, "lr": 1e-2, "epochs": 3.0},
        train={"batch_size": 2, "num_workers": 2, "checkpoint_every": 4, "max_failures": 0},
        evaluate={"allow_training_corpus": True},
        tracking={"uri": mlflow_server.uri, "experiment_name": "wand-tts-test"})
    saved = {k: os.environ.get(k) for k in SECRETS}
    os.environ.update(SECRETS)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(FAULT_ENV, f"5:{root / 'died'}")
            with pytest.raises(Exception):
                run_chain(config)
        assert (root / "died").exists()
        summary = run_chain(config)  # the same command again
        again = run_chain(config)
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("wand-tts-test")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    return {"config": config, "summary": summary, "again": again, "client": client, "runs": runs,
            "uri": mlflow_server.uri}


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_one_parent_and_one_child_per_stage(tracked):
    runs = tracked["runs"]
    parents = [r for r in runs if r.data.tags.get("wand.role") == "parent"]
    assert len(parents) == 1  # three submissions, one parent
    parent = parents[0]
    assert parent.info.run_id == tracked["summary"]["parent_run_id"] == tracked["again"]["parent_run_id"]
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["wand.stage"] for r in children) == ["eval", "precompute", "stage-1", "stage-2"]
    assert len(runs) == 5
    # The third submission found the evals of this student logged and did not run them again.
    logged, measured = tracked["again"]["evals"], tracked["summary"]["evals"]
    assert {k: logged[k] for k in measured} == pytest.approx(measured)
    params, tags = parent.data.params, parent.data.tags
    assert params["model"] == "cosyvoice2" and params["zero_stage"] == "2" and params["curriculum.window_target"] == "4"
    assert len(params["teacher_fingerprint"]) >= 16 and len(params["data_fingerprint"]) >= 16
    assert params["cluster.nodes"] == "1"
    assert tags["wand.family"] == "cosyvoice2" and tags["wand.git_commit"] and tags["mlflow.source.type"] == "JOB"
    # The UI: a model-training experiment, and the data each run used in its Dataset column (the
    # corpus and the shards, digests from our fingerprints), logged once across three submissions.
    client = tracked["client"]
    assert client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    inputs = {d.tags[0].value: d.dataset for d in client.get_run(parent.info.run_id).inputs.dataset_inputs}
    assert len(client.get_run(parent.info.run_id).inputs.dataset_inputs) == 2
    assert inputs["training"].digest == params["data_fingerprint"][:16]
    assert inputs["teacher-top-k"].name == "topk" and len(inputs["teacher-top-k"].digest) == 16
    for r in children:
        assert r.info.status == "FINISHED"
    stages = {r.data.tags["wand.stage"]: r for r in children}
    record = tracked["summary"]["stages"][0]
    assert stages["stage-1"].data.tags["wand.checkpoint_uri"] == record["checkpoint"]
    assert stages["stage-1"].data.tags["wand.restarts"] == "1"  # the resubmission resumed it


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_step_metrics_are_monotone_and_logged_once(tracked):
    client, summary = tracked["client"], tracked["summary"]
    children = {r.data.tags.get("wand.stage"): r.info.run_id for r in tracked["runs"]}
    for record in summary["stages"]:
        run_id = children[f"stage-{record['stage']}"]
        for key in ("loss", "ce", "kd", "window", "tau", "lr", "tokens_per_s"):
            history = client.get_metric_history(run_id, key)
            steps = [m.step for m in history]
            assert sorted(steps) == list(range(record["start"], record["end"])), (key, steps)
        windows = {m.step: m.value for m in client.get_metric_history(run_id, "window")}
        assert all(windows[m["step"]] == m["window"] for m in record["metrics"])


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_student_artifact_loads_and_generates(tracked):
    parent = tracked["summary"]["parent_run_id"]
    model = load_logged_student(f"runs:/{parent}/student", tracking_uri=tracked["uri"])
    checksum = wand.models.weights.fingerprint(model.state_dict())
    assert checksum == tracked["summary"]["stages"][-1]["param_checksum"]
    spec = get_spec("cosyvoice2", "tiny")
    prompt = torch.tensor([[int(spec.target_ids()[0])] * 5 + [spec.prefix_end_token_id]])
    tokens, cache = wand.generate(wand.enable_wand(model, 4), prompt, torch.tensor([6]), 4, 20, return_cache=True)
    assert tokens.shape[1] == 26 and cache.nbytes() == spec.kv_bytes_per_token(torch.float32) * (6 + 4)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_eval_tables_figures_and_the_kv_curves(tracked, tmp_path):
    client = tracked["client"]
    evals = next(r for r in tracked["runs"] if r.data.tags.get("wand.stage") == "eval")
    names = {f.path for f in client.list_artifacts(evals.info.run_id, "evals")}
    for name in ("kv_memory", "decode_latency", "attention_flops", "quality", "window_chooser"):
        assert f"evals/{name}.json" in names and f"evals/{name}.png" in names
    local = client.download_artifacts(evals.info.run_id, "evals/kv_memory.json", str(tmp_path))
    table = json.load(open(local))
    seconds = table["data"] if "data" in table else table
    columns = table["columns"]
    assert [row[columns.index("seconds")] for row in seconds] == [10.0, 30.0, 60.0]
    assert [row[columns.index("generated_tokens")] for row in seconds] == [250, 750, 1500]
    # Read back from the server: WAND's cache is flat, full attention's grows linearly.
    full = sorted((m.step, m.value) for m in client.get_metric_history(evals.info.run_id, "kv_bytes_full"))
    ours = sorted((m.step, m.value) for m in client.get_metric_history(evals.info.run_id, "kv_bytes_wand"))
    assert len({v for _, v in ours}) == 1
    slopes = {(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(full, full[1:])}
    assert len(slopes) == 1 and slopes.pop() == get_spec("cosyvoice2", "tiny").kv_bytes_per_token(torch.float32)
    assert evals.data.tags["wand.device"].startswith(("CPU", "NVIDIA"))
    metrics = evals.data.metrics
    for bucket in ("near", "mid", "far"):
        assert 0 <= metrics[f"top1_agreement_{bucket}"] <= 1 and metrics[f"kl_{bucket}"] >= 0
    parent = client.get_run(tracked["summary"]["parent_run_id"])
    assert parent.data.metrics["kv_reduction_60s"] == pytest.approx(metrics["kv_reduction_60s"])


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_no_secret_in_params_tags_or_artifacts(tracked, tmp_path):
    client = tracked["client"]
    for run in tracked["runs"]:
        text = json.dumps(run.data.params) + json.dumps(run.data.tags)
        text += json.dumps([[d.dataset.name, d.dataset.source]  # the Dataset column: corpus path included
                            for d in client.get_run(run.info.run_id).inputs.dataset_inputs])
        folder = client.download_artifacts(run.info.run_id, "", str(tmp_path / run.info.run_id))
        for directory, _, files in os.walk(folder):
            for name in files:
                with open(os.path.join(directory, name), "rb") as f:
                    text += f.read().decode("latin-1")
        for secret in SECRETS.values():
            assert secret not in text


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_compare_and_evaluate_entry_points(tracked, tmp_path, capsys):
    """Runs last in this module: jobs/evaluate.py replaces the eval child run."""
    import yaml

    sys.path.insert(0, str(ROOT))
    from jobs import compare, evaluate

    assert compare.main(["--tracking-uri", tracked["uri"], "--experiment-name", "wand-tts-test"]) == 0
    table = capsys.readouterr().out
    assert "| tracked-cosyvoice2 | cosyvoice2 |" in table and tracked["summary"]["parent_run_id"] in table
    config = tmp_path / "tracked.yaml"
    config.write_text(yaml.safe_dump(tracked["config"].model_dump(mode="json")))
    assert evaluate.main(["--config", str(config)]) == 0
    assert "logged to http://127.0.0.1" in capsys.readouterr().out
    from mlflow import MlflowClient

    client = MlflowClient(tracked["uri"])
    experiment = client.get_experiment_by_name("wand-tts-test")
    evals = client.search_runs([experiment.experiment_id], filter_string="tags.`wand.stage` = 'eval'")
    assert len(evals) == 1 and evals[0].info.status == "FINISHED"  # replaced, not duplicated
    assert client.get_run(tracked["summary"]["parent_run_id"]).info.status == "FINISHED"
