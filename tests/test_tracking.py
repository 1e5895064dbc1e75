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
from helpers import corpus_rows, wand_speech
from pipeline.chain import run_chain
from pipeline.config import DistillConfig
from pipeline.config import TrackingConfig
from pipeline.redaction import redact
from pipeline.registry.pyfunc import prompt_of
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


def prompts(tracked, n: int = 2) -> list[dict]:
    spec = get_spec("cosyvoice2", "tiny")
    rows = pq.read_table(Path(tracked["config"].corpus) / "c.parquet").to_pylist()
    return [prompt_of(spec, r) for r in rows[:n]]


def expected_speech(tracked, rows: list[dict], steps: int) -> list[list[int]]:
    """wand.generate on the exported student folder (the family's loader, not MLflow)."""
    spec = get_spec("cosyvoice2", "tiny")
    model = wand.enable_wand(spec.load(tracked["summary"]["student"]).eval(), 4)
    return [wand_speech(spec, model, 4, row, steps) for row in rows]


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_student_is_a_registered_model_linked_to_its_run_and_eval_metrics(tracked, tmp_path):
    import mlflow

    client, parent = tracked["client"], tracked["summary"]["parent_run_id"]
    registration = tracked["summary"]["registration"]
    assert registration.name == "wand-cosyvoice2"
    # Three submissions, one student: one version (the resubmission found it).
    assert tracked["again"]["registration"].version == registration.version
    versions = client.search_model_versions(f"name = 'wand-cosyvoice2' and run_id = '{parent}'")
    assert [v.version for v in versions] == [registration.version]
    # The logged model: an output of the parent run (the runs table's Models column), with the run's
    # params and the evals' figures linked to it.
    model = client.get_logged_model(registration.model_id)
    run = client.get_run(parent)
    assert model.source_run_id == parent and [o.model_id for o in run.outputs.model_outputs] == [model.model_id]
    linked = {m.key: m.value for m in model.metrics}
    assert linked["kv_reduction_60s"] == pytest.approx(run.data.metrics["kv_reduction_60s"])
    assert model.params["model"] == "cosyvoice2" and model.params["curriculum.window_target"] == "4"
    # Promotion follows the gates, recomputed here from the eval run's own metrics.
    evals = next(r for r in tracked["runs"] if r.data.tags.get("wand.stage") == "eval").data.metrics
    gates_pass = evals["kv_reduction_60s"] >= 0.5 and evals["latency_wand_ratio_late_early"] <= 1.25
    assert registration.champion == gates_pass == (linked["gates_passed"] == 1.0)
    version = client.get_model_version("wand-cosyvoice2", registration.version)
    assert version.tags["wand.gates"] == ("passed" if gates_pass else "failed")
    assert run.data.tags["wand.registered_model"] == f"models:/wand-cosyvoice2/{registration.version}"
    # It needs the library alone.
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{model.model_id}", tracking_uri=tracked["uri"],
                                                     dst_path=str(tmp_path)))
    requirements = (local / "requirements.txt").read_text().split()
    assert "wand-tts==0.1.0" in requirements
    assert not [r for r in requirements if r.split("=")[0] in ("ray", "deepspeed", "s3fs")]
    # The family's own loader works on the weights it carries (the checksum of the last stage).
    student = load_logged_student(f"models:/wand-cosyvoice2/{registration.version}", tracking_uri=tracked["uri"])
    assert wand.models.weights.fingerprint(student.state_dict()) == tracked["summary"]["stages"][-1]["param_checksum"]


FRESH_LOAD = """
import json, sys
class Blocked:  # the model must need the wand-tts library alone: none of the pipeline's cluster stack
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "deepspeed", "s3fs"):
            raise ImportError(f"blocked import of {name}")
sys.meta_path.insert(0, Blocked())
import mlflow
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(json.loads(sys.argv[2]), params={"max_new_tokens": 30})
print("PREDICTIONS " + json.dumps([r["speech_ids"] for r in out.to_dict(orient="records")]))
"""


def clean_env(tracked, tmp_path) -> dict:
    # The venv's bin first, as in an activated environment (mlflow models serve runs its uvicorn).
    return {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HOME": str(tmp_path), "TMPDIR": str(tmp_path),
            "MLFLOW_TRACKING_URI": tracked["uri"], "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_champion_loads_in_a_fresh_process_and_says_what_wand_generate_says(tracked, tmp_path):
    import subprocess

    registration = tracked["summary"]["registration"]
    assert registration.champion, f"the tiny student missed a gate: {registration.missed}"
    rows = prompts(tracked)
    out = subprocess.run([sys.executable, "-c", FRESH_LOAD, "models:/wand-cosyvoice2@champion", json.dumps(rows)],
                         cwd=tmp_path, env=clean_env(tracked, tmp_path), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    said = json.loads(out.stdout.split("PREDICTIONS ", 1)[1])
    assert said == expected_speech(tracked, rows, 30)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_mlflow_models_serve_answers_a_request(tracked, tmp_path):
    import subprocess
    import urllib.request

    from pipeline.services import free_port, stop_group, wait_http

    version = tracked["summary"]["registration"].version
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
                               f"models:/wand-cosyvoice2/{version}", "--env-manager", "local", "-h", "127.0.0.1",
                               "-p", str(port)], cwd=tmp_path, env=clean_env(tracked, tmp_path),
                              stdout=open(tmp_path / "serve.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", 300, server, what="mlflow models serve")
        rows = prompts(tracked)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", method="POST", headers={"Content-Type": "application/json"},
            data=json.dumps({"dataframe_records": rows, "params": {"max_new_tokens": 30}}).encode())
        with urllib.request.urlopen(request, timeout=300) as response:
            answer = json.loads(response.read())
    finally:
        stop_group(server.pid)
    assert [p["speech_ids"] for p in answer["predictions"]] == expected_speech(tracked, rows, 30)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_version_that_misses_a_gate_is_registered_without_the_alias(tracked):
    from pipeline.registry.register import register_student
    from pipeline.tracking import Tracker

    client, first = tracked["client"], tracked["summary"]["registration"]
    tracker = Tracker(tracked["uri"], "wand-tts-registry-miss")
    parent = tracker.parent_run("registry-miss", {"wand.model": "cosyvoice2"})
    metrics = {**tracked["summary"]["evals"], "latency_wand_ratio_late_early": 2.0}
    row = pq.read_table(Path(tracked["config"].corpus) / "c.parquet").to_pylist()[0]
    missed = register_student(tracker, parent, tracked["config"], tracked["summary"]["student"], "other-student",
                              metrics, row)
    tracker.finish(parent)
    assert int(missed.version) > int(first.version) and not missed.champion
    assert missed.uri == f"models:/wand-cosyvoice2/{missed.version}"
    version = client.get_model_version("wand-cosyvoice2", missed.version)
    assert version.tags["wand.gates"] == "failed" and version.tags["wand.missed"].startswith("latency_flat 2.000")
    holder = client.get_model_version_by_alias("wand-cosyvoice2", "champion").version
    assert holder == first.version  # the alias stayed where it was


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
        for output in client.get_run(run.info.run_id).outputs.model_outputs:  # the logged student model
            import mlflow

            model = mlflow.artifacts.download_artifacts(f"models:/{output.model_id}", tracking_uri=tracked["uri"],
                                                        dst_path=str(tmp_path / output.model_id))
            text += json.dumps(client.get_logged_model(output.model_id).params)
            for directory, _, files in os.walk(model):
                for name in files:
                    text += Path(directory, name).read_bytes().decode("latin-1")
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
    printed = capsys.readouterr().out
    assert "logged to http://127.0.0.1" in printed and "registered as models:/wand-cosyvoice2" in printed
    from mlflow import MlflowClient

    client = MlflowClient(tracked["uri"])
    experiment = client.get_experiment_by_name("wand-tts-test")
    evals = client.search_runs([experiment.experiment_id], filter_string="tags.`wand.stage` = 'eval'")
    assert len(evals) == 1 and evals[0].info.status == "FINISHED"  # replaced, not duplicated
    # The registered version's verdict follows the new evals (and the alias with it).
    version = client.get_model_version("wand-cosyvoice2", tracked["summary"]["registration"].version)
    assert version.tags["wand.gates"] == ("passed" if evals[0].data.metrics["gates_passed"] == 1.0 else "failed")
    assert client.get_run(tracked["summary"]["parent_run_id"]).info.status == "FINISHED"
