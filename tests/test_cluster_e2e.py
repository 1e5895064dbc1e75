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

import fake_cluster
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
S3_ARGS = ["--set", "corpus=s3://autoscale/corpus/train", "--set", "shards=s3://autoscale/topk/sparktts",
           "--set", "precompute.num_actors=2", "--set", "precompute.num_gpus_per_actor=1",
           "--set", "precompute.rows_per_shard=4"]
# The label selectors docs/cluster.md tells users to pass on a cluster started from aws.yaml.
SELECTORS = ["--set", "precompute.label_selector={wand-role: precompute}",
             "--set", "train.label_selector={wand-role: train}", "--set", "evaluate.label_selector={wand-role: precompute}"]
TRAIN_TYPES = {"gpu.a10g.4x.ondemand", "gpu.a100.8x.ondemand", "gpu.h100.8x.ondemand"}


def submit(head, args: list[str], env: dict, timeout: float) -> str:
    """``ray job submit --working-dir .`` from the repo root, as docs/cluster.md runs it; its output."""
    out = subprocess.run([f"{VENV_BIN}/ray", "job", "submit", "--address", head.dashboard_url, "--working-dir", ".",
                          "--", "python", "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **env, **head.client_env()})
    assert out.returncode == 0 and "succeeded" in out.stdout.lower(), out.stdout[-5000:] + out.stderr[-2000:]
    return out.stdout


def kill_node(node_id: str) -> int:
    """Kill every process of one fake node (its raylet, agents and workers: what a reclaimed machine
    loses), found by the node id the fake provider puts in their environment."""
    import psutil

    killed = 0
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("RAY_OVERRIDE_NODE_ID_FOR_TESTING") == node_id:
                proc.kill()
                killed += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return killed


def placed(dashboard_url: str, watch) -> tuple[dict[str, set[str]], dict[str, dict]]:
    """Node types each actor class and task name ran on, by the state API (dead ones too), and what
    each of those that ran on the head asked for."""
    where: dict[str, set[str]] = {}
    on_head: dict[str, dict] = {}
    assert watch.types, f"no worker node seen; last poll error: {watch.last_error!r}"
    for kind, name in (("actors", "class_name"), ("tasks", "name")):
        for item in fake_cluster.state(dashboard_url, ray_auth_headers(), kind):
            if not item.get("node_id") or item.get("type", "NORMAL_TASK") != "NORMAL_TASK":  # actors have no type
                continue
            node_type = "head" if item["node_id"] == watch.head_id else watch.types.get(item["node_id"], "unknown")
            where.setdefault(item[name], set()).add(node_type)
            if node_type == "head":
                on_head[item[name]] = item.get("required_resources") or {}
    return where, on_head


@pytest.mark.timeout(1200)
def test_autoscaler_v2_runs_each_stage_on_its_node_type_and_replaces_a_lost_worker(s3_server, tmp_path, ray_token):
    """A cluster of aws.yaml's node types (fake nodes) under autoscaler v2: the precompute (its own
    job, as `python -m jobs.precompute`) on two spot GPU nodes at once, then zero workers, then
    `python -m jobs.distill` with training on a training node type, that node killed mid-stage and
    replaced, the stage resumed from its checkpoint on S3, and the evals on a spot node."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint)
    s3.create_bucket(Bucket="autoscale")
    for name, rows, seed in (("train", 16, 0), ("heldout", 4, 1)):
        write_corpus(tmp_path / name, "sparktts", rows, seed)
        s3.upload_file(str(tmp_path / name / "corpus.parquet"), "autoscale", f"corpus/{name}/corpus.parquet")

    port = free_port()
    config_path = tmp_path / "autoscaling.json"
    config_path.write_text(json.dumps(fake_cluster.from_aws_yaml(port)))
    head = RayHead(ray_token, num_cpus=0, port=port, env={**head_env(), **s3_server.env(), **fake_cluster.head_env()},
                   extra_args=[f"--autoscaling-config={config_path}", "--num-gpus=0"])
    head.start(log_file=tmp_path / "head.log")
    common = ["--config", "jobs/configs/tiny.yaml", "--only", "sparktts", *TINY_RANDOM, *S3_ARGS, *SELECTORS,
              "--set", f"s3_endpoint={s3_server.endpoint}", "--set", "tracking.uri=null"]
    try:
        with fake_cluster.NodeWatch(head.address) as watch:
            # 1. The precompute alone: two teacher actors of one logical GPU each -> two spot GPU nodes.
            submit(head, ["jobs.precompute", *common], {}, 600)
            assert "topk/sparktts/manifest.json" in s3_keys(s3, "topk/sparktts/")
            where, _ = placed(head.dashboard_url, watch)
            assert ran_on(where, "TeacherTopK") == {"gpu.a10g.1x.spot"}, where
            spot = {n for n, t in watch.types.items() if t == "gpu.a10g.1x.spot"}
            assert len(spot) >= 2 and watch.most_at_once >= 2, (watch.types, watch.most_at_once)
            # 2. Idle nodes go: zero workers between the stages.
            watch.wait_workers(0, 120)

            # 3. Training + evals, as one more job; kill the training node once the stage has a whole
            # checkpoint: two checkpoint folders with a state.json (the first is then complete; killed
            # while the only one was still uploading, the stage rightly restarts from step 0, which this
            # test is not about). 12 epochs: many steps left after that, so the kill lands mid-stage.
            job = subprocess.Popen([f"{VENV_BIN}/ray", "job", "submit", "--address", head.dashboard_url,
                                    "--working-dir", ".", "--", "python", "-m", "jobs.distill", *common,
                                    "--set", "curriculum.stages=1", "--set", "curriculum.epochs=12.0",
                                    "--set", "train.checkpoint_every=2", "--set", "storage=s3://autoscale/runs",
                                    "--set", "evaluate.corpus=s3://autoscale/corpus/heldout", "--set", "evaluate.rows=2"],
                                   cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, **head.client_env()})
            deadline = time.monotonic() + 600
            while len({k.rsplit("/", 1)[0] for k in s3_keys(s3, "runs/tiny-sparktts-stage1/")
                       if k.endswith("/state.json")}) < 2:
                assert job.poll() is None and time.monotonic() < deadline, job.communicate()[0][-5000:]
                time.sleep(0.5)
            trained_on = {n for n in watch.alive if watch.types[n] in TRAIN_TYPES}
            assert len(trained_on) == 1, {n: watch.types[n] for n in watch.alive}
            killed = trained_on.pop()
            assert kill_node(killed) >= 2  # the raylet and at least one of its workers
            out = job.communicate(timeout=900)[0]
            assert job.returncode == 0 and "succeeded" in out.lower(), out[-5000:]
            where, on_head = placed(head.dashboard_url, watch)
            replaced = {n for n, t in watch.types.items() if t in TRAIN_TYPES} - {killed}
            assert replaced, watch.types  # a new training node came up for the resumed stage
            assert ran_on(where, "RayTrainWorker") <= TRAIN_TYPES, where
            assert ran_on(where, "_evaluate_pickled") == {"gpu.a10g.1x.spot"}, where
            # Only Ray's zero-resource coordinators (Ray Train's controller, Ray Data's helpers) may
            # sit on the head, next to the driver: nothing that asks for a CPU or a GPU.
            assert on_head and all(not any(on_head[n].get(r) for r in ("CPU", "GPU")) for n in on_head), on_head
            record = json.loads(s3.get_object(Bucket="autoscale", Key="runs/tiny-sparktts/stage-1.json")["Body"].read())
            assert record["starts"][0] == 0 and len(record["starts"]) == 2 and record["starts"][1] > 0, record["starts"]
            assert [m["step"] for m in record["metrics"]] == list(range(record["start"], record["end"]))
            # 4. Everything idle again: back to zero workers.
            watch.wait_workers(0, 120)
    finally:
        head.stop()
        kill_matching(str(config_path))


def ran_on(where: dict[str, set[str]], name: str) -> set[str]:
    """Node types of the actors or tasks whose name holds ``name`` (Ray Data names its actors
    ``MapWorker(MapBatches(<class>))``); none found is a failure, not an empty set."""
    found = set().union(*(types for key, types in where.items() if name in key))
    assert found, f"no actor or task named like {name!r} in {sorted(where)}"
    return found


def s3_keys(s3, prefix: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket="autoscale", Prefix=prefix).get("Contents", [])]
