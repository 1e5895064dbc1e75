"""`ray job submit` end to end on a real `ray start --head`, and an autoscaling cluster of fake nodes.

Both start their own Ray cluster as separate processes (not the in-process ``ray_local``) and
stop exactly that cluster afterwards (process group + processes naming its GCS port).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import corpus_rows, ray_auth_headers, ray_session_dirs, token_leaks
from pipeline.services import RayHead, free_port, kill_matching, read_token
from wand.models import get_spec

pytestmark = [pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)


def head_env() -> dict:
    return {"PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}", "DS_ACCELERATOR": "cpu",
            "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions")}


TINY_RANDOM = ["--set", "model_size=tiny", "--set", "teacher_source=null", "--set", "curriculum.window_start=16",
               "--set", "curriculum.window_target=4"]


def write_corpus(folder: Path, model: str, rows: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(corpus_rows(get_spec(model, "tiny"), rows, seed=seed, min_gen=20, max_gen=40)),
                   folder / "corpus.parquet")


def wait_job(client, job_id: str, statuses: set, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        if status in statuses:
            return status
        time.sleep(2)
    raise TimeoutError(f"job {job_id} not in {statuses} after {timeout} s; logs:\n{client.get_job_logs(job_id)[-3000:]}")


@pytest.fixture()
def ray_head(ray_token):
    head = RayHead(ray_token, num_cpus=2, env=head_env())
    head.start()
    yield head
    head.stop()


@pytest.mark.timeout(1200)
def test_ray_job_submit_killed_driver_resubmitted_resumes(ray_head, mlflow_server, tmp_path, ray_token):
    from mlflow import MlflowClient
    from ray.job_submission import JobSubmissionClient

    write_corpus(tmp_path / "runs/corpus/tiny-cosyvoice2", "cosyvoice2", 32, 0)
    write_corpus(tmp_path / "runs/corpus/tiny-cosyvoice2-heldout", "cosyvoice2", 4, 1)
    # The embedded default's experiment on the tiny random-weight preset and random tokens: this test
    # is about jobs surviving their driver, not about quality, and the tiny preset is 10x faster.
    args = ["--config", "jobs/configs/tiny.yaml", "--only", "cosyvoice2", "--root", str(tmp_path), *TINY_RANDOM,
            "--set", "corpus=runs/corpus/tiny-cosyvoice2", "--set", "shards=runs/topk/tiny-cosyvoice2",
            "--set", "evaluate.corpus=runs/corpus/tiny-cosyvoice2-heldout",
            "--set", "curriculum.epochs=6.0", "--set", "train.checkpoint_every=2", "--set", "tracking.experiment_name=e2e"]
    entrypoint = "python -m jobs.distill " + " ".join(args)
    runtime_env = {"working_dir": str(ROOT), "env_vars": {"MLFLOW_TRACKING_URI": mlflow_server.uri}}
    client = JobSubmissionClient(ray_head.dashboard_url)

    # 1. Submit, and kill the driver once stage 1 has a checkpoint on storage.
    first = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    stage_dir = tmp_path / "runs/checkpoints/tiny-cosyvoice2-stage1"
    deadline = time.monotonic() + 600
    while not list(stage_dir.glob("checkpoint_*/state.json")):
        assert time.monotonic() < deadline, client.get_job_logs(first)[-3000:]
        assert str(client.get_job_status(first)).split(".")[-1] in {"PENDING", "RUNNING"}, client.get_job_logs(first)[-3000:]
        time.sleep(0.5)
    client.stop_job(first)
    assert wait_job(client, first, {"STOPPED", "FAILED"}, 120) == "STOPPED"
    assert not (tmp_path / "runs/checkpoints/tiny-cosyvoice2/stage-1.json").exists()  # stage 1 was cut short

    # 2. The same command again, through the `ray job submit` CLI as users run it: it resumes.
    out = subprocess.run([f"{VENV_BIN}/ray", "job", "submit", "--address", ray_head.dashboard_url,
                          "--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"env_vars": runtime_env["env_vars"]}),
                          "--", *entrypoint.split()],
                         capture_output=True, text=True, timeout=900, env={**os.environ, **ray_head.client_env()})
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "succeeded" in out.stdout.lower()
    assert "matching shards found" in out.stdout  # precompute reused, not redone
    assert "| tiny-cosyvoice2 | cosyvoice2 |" in out.stdout  # the results table
    record = json.loads((tmp_path / "runs/checkpoints/tiny-cosyvoice2/stage-1.json").read_text())
    assert record["starts"][0] == 0 and len(record["starts"]) == 2 and record["starts"][1] > 0  # resumed
    assert [m["step"] for m in record["metrics"]] == list(range(record["start"], record["end"]))

    # 3. The MLflow server holds one parent with its four children, all finished.
    mlflow = MlflowClient(mlflow_server.uri)
    experiment = mlflow.get_experiment_by_name("e2e")
    runs = mlflow.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("wand.role") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["wand.stage"] for r in children) == ["eval", "precompute", "stage-1", "stage-2"]
    steps = [m.step for m in mlflow.get_metric_history(
        next(r for r in children if r.data.tags["wand.stage"] == "stage-1").info.run_id, "loss")]
    assert sorted(steps) == list(range(record["start"], record["end"]))  # no step twice after the kill

    # 4. The cluster's token went nowhere: not into the run's files, MLflow, the job logs or Ray's logs.
    token = read_token(ray_token)
    leaks = token_leaks(token, tmp_path / "runs", mlflow, experiment.experiment_id,
                        [client.get_job_logs(first), out.stdout, out.stderr], ray_session_dirs(ray_head.port))
    assert leaks["files"] >= 20 and leaks["mlflow"] > 20 and leaks["ray logs"] > 10, leaks  # it looked (counts vary run to run)
    assert leaks["found"] == [], leaks["found"]


# ----------------------------------------------------------------------------- autoscaling
def autoscaling_config(gcs_port: int) -> dict:
    """Ray's fake multi-node provider (worker "nodes" are extra raylets on this machine), loaded as
    an external provider: the ray wheel does not ship the provider's default YAML."""
    return {
        "cluster_name": "wand-autoscaling-test",
        "max_workers": 2,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.25,
        "provider": {"type": "external",
                     "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                     "gcs_address": f"127.0.0.1:{gcs_port}", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu.worker": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default",
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def alive_nodes(dashboard_url: str) -> int:
    """ALIVE nodes by Ray's state API (the dashboard lists the head a second or two after start)."""
    import urllib.request

    request = urllib.request.Request(f"{dashboard_url}/api/v0/nodes?detail=false&limit=100", headers=ray_auth_headers())
    with urllib.request.urlopen(request, timeout=10) as response:
        nodes = json.load(response)["data"]["result"]["result"]
    return sum(1 for node in nodes if node["state"] == "ALIVE")


def wait_nodes(dashboard_url: str, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while alive_nodes(dashboard_url) != count:
        assert time.monotonic() < deadline, f"expected {count} alive nodes within {timeout} s"
        time.sleep(1)


@pytest.mark.timeout(1200)
def test_autoscaler_adds_workers_for_the_stages_and_releases_them(s3_server, tmp_path, ray_token):
    import boto3
    from ray.job_submission import JobSubmissionClient

    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint)
    s3.create_bucket(Bucket="autoscale")
    write_corpus(tmp_path / "corpus", "sparktts", 16, 0)
    s3.upload_file(str(tmp_path / "corpus/corpus.parquet"), "autoscale", "corpus/sparktts/corpus.parquet")

    port = free_port()
    config_path = tmp_path / "autoscaling.json"
    config_path.write_text(json.dumps(autoscaling_config(port)))
    # The head has no CPUs: the precompute actors and the training workers only fit on worker nodes.
    head = RayHead(ray_token, num_cpus=0, port=port, env={**head_env(), **s3_server.env(), "RAY_FAKE_CLUSTER": "1",
                                               "AUTOSCALER_UPDATE_INTERVAL_S": "1"},
                   extra_args=[f"--autoscaling-config={config_path}"])
    head.start(log_file=tmp_path / "head.log")
    try:
        wait_nodes(head.dashboard_url, 1, 30)  # the head alone: zero workers
        client = JobSubmissionClient(head.dashboard_url)
        # No working_dir upload: the fake nodes share this machine's disk and one session folder, and
        # a node scaled down removes the unpacked working dir under the others' workers. The package
        # is installed in the venv (editable), so absolute paths are enough.
        entrypoint = (f"cd {ROOT} && python -m jobs.distill --config {ROOT}/jobs/configs/tiny.yaml --only sparktts "
                      "--set corpus=s3://autoscale/corpus/sparktts --set shards=s3://autoscale/topk/sparktts "
                      "--set storage=s3://autoscale/runs --set curriculum.stages=1 --set evaluate.enabled=false "
                      f"{' '.join(TINY_RANDOM)} "
                      f"--set s3_endpoint={s3_server.endpoint} --set tracking.uri=null")
        job = client.submit_job(entrypoint=entrypoint)
        most = 1
        deadline = time.monotonic() + 900
        while (status := str(client.get_job_status(job)).split(".")[-1]) not in {"SUCCEEDED", "FAILED", "STOPPED"}:
            assert time.monotonic() < deadline, client.get_job_logs(job)[-3000:]
            most = max(most, alive_nodes(head.dashboard_url))
            time.sleep(2)
        logs = client.get_job_logs(job)
        assert status == "SUCCEEDED", logs[-4000:]
        assert most >= 2, "the autoscaler never added a worker node"
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="autoscale", Prefix="runs/")["Contents"]]
        assert "runs/tiny-sparktts/stage-1.json" in keys and any(k.startswith("runs/tiny-sparktts/student/") for k in keys)
        # Idle worker nodes are released after idle_timeout_minutes (15 s) plus the update interval.
        deadline = time.monotonic() + 180
        while alive_nodes(head.dashboard_url) > 1:
            assert time.monotonic() < deadline, "idle worker nodes were not released"
            time.sleep(2)
    finally:
        head.stop()
        kill_matching(str(config_path))
