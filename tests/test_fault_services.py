"""Services killed from outside with signals while the pipeline runs on them: a Ray Train worker,
the MLflow server, the object store (behind a TCP forwarder, so its data survives the outage) and
the precompute's driver. Goal for each: the run completes (or fails naming the cause, and resumes
when resubmitted) and nothing is lost or counted twice. Rows of the fault table in docs/faults-and-bad-input.md."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from helpers import corpus_rows, precomputed_tiny_corpus
from tcp_proxy import start as start_proxy
from pipeline import storage
from pipeline.train import checkpoints
from pipeline.chain import track_stage
from pipeline.config import CURRICULUM, DistillConfig
from pipeline.services import MLflowServer, free_port
from pipeline.config import PrecomputeConfig
from pipeline.data.precompute import run_precompute
from pipeline.data.shards import load_manifest
from pipeline.tracking import Tracker, TrackingUnavailable
from pipeline.train.driver import plan_stages, run_stage, stage_record
from wand.models import get_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(ray_local, tmp_path_factory):
    return precomputed_tiny_corpus(tmp_path_factory.mktemp("faults"), seed=23)


@pytest.fixture(scope="module")
def reference(shards):
    """The stage run once without faults: what every faulted run must end equal to."""
    return run_stage(stage_config(shards, "reference"), 1)


def stage_config(root: Path, experiment: str, **changes):
    curriculum = {"stages": 1, "window_start": 16, "window_target": 4, "lr": 1e-2, "epochs": 3.0}
    train = {"batch_size": 2, "num_workers": 2, "checkpoint_every": 4, "max_failures": 1}
    for key, value in changes.items():
        (curriculum if key in CURRICULUM else train)[key] = value
    return DistillConfig(experiment=experiment, model="cosyvoice2", model_size="tiny", corpus=str(root / "corpus"),
                         shards=str(root / "topk"), storage=str(root / "ckpt"), precompute={"k": 8, "rows_per_shard": 16},
                         curriculum=curriculum, train=train, evaluate={"enabled": False}).train_config()


def when(condition, then, timeout: float = 600) -> threading.Thread:
    """Run ``then()`` in a thread as soon as ``condition()`` holds (polled every 0.1 s)."""
    def watch():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                then()
                return
            time.sleep(0.1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def has_checkpoint(train) -> bool:
    fs, root = storage.resolve(train.storage)
    return checkpoints.latest_good(fs, storage.join(root, train.run_name(1)), train.num_workers) is not None


def logged_steps(uri: str, run_id: str) -> list[int]:
    from mlflow import MlflowClient

    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, "loss"))


def test_a_ray_train_worker_sigkilled_from_outside_resumes_with_nothing_lost(shards, reference, mlflow_server):
    train = stage_config(shards, "sigkill")
    killed = []

    def kill_a_worker():
        workers = [p for p in psutil.process_iter(["pid", "cmdline"])
                   if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
        victim = max(workers, key=lambda p: p.pid)
        os.kill(victim.pid, signal.SIGKILL)
        killed.append(victim.pid)

    watcher = when(lambda: has_checkpoint(train), kill_a_worker)
    tracker = Tracker(mlflow_server.uri, "wand-faults")
    parent = tracker.parent_run("sigkill", {})
    record = track_stage(tracker, parent, train, 1)
    watcher.join(timeout=5)
    assert killed, "no Ray Train worker was found to kill"
    assert len(record["starts"]) == 2 and record["starts"][1] > 0, record["starts"]  # resumed, not restarted
    stage = plan_stages(train)[0]
    assert [m["step"] for m in record["metrics"]] == list(range(stage.start, stage.end))
    # Every step's loss reached MLflow exactly once, and the weights are an uninterrupted run's.
    assert logged_steps(mlflow_server.uri, tracker.find_child(parent, "stage-1").info.run_id) == list(range(stage.end))
    assert record["param_checksum"] == reference["param_checksum"]


def test_a_corrupt_newest_checkpoint_is_skipped_by_the_resubmission_with_a_warning(shards, reference, tmp_path,
                                                                                  caplog):
    from pipeline.train.worker import FAULT_ENV

    train = stage_config(shards, "corrupt-checkpoint", max_failures=0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(FAULT_ENV, f"9:{tmp_path / 'died'}")  # a worker dies after the step-4 and step-8 checkpoints
        with pytest.raises(Exception):
            run_stage(train, 1)
    fs, root = storage.resolve(train.storage)
    run_dir = Path(root) / train.run_name(1)
    newest = Path(checkpoints.latest_good(fs, str(run_dir), train.num_workers))
    assert storage.read_json(fs, str(newest / "state.json"))["next_step"] == 8
    optim = sorted((newest / "ds").glob("zero_pp_rank_*_optim_states.pt"))[0]
    data = bytearray(optim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # storage flipped a byte of the newest checkpoint
    optim.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="pipeline.train.checkpoints"):
        record = run_stage(train, 1)  # the resubmission
    assert f"checkpoint {newest} is unusable: ds/{optim.name} does not match its checksum" in caplog.text
    assert record["starts"] == [0, 4]  # from the previous good checkpoint, not the corrupt one
    stage = plan_stages(train)[0]
    assert [m["step"] for m in record["metrics"]] == list(range(stage.start, stage.end))
    assert record["param_checksum"] == reference["param_checksum"]


def test_the_mlflow_server_killed_mid_stage_and_restarted_loses_no_step(shards, tmp_path):
    store, port = tmp_path / "mlflow", free_port()
    server = MLflowServer(store, port).start()
    train = stage_config(shards, "mlflow-restart")
    events = {}

    def outage():
        os.killpg(server.proc.pid, signal.SIGKILL)
        events["killed"] = time.monotonic()
        time.sleep(15)
        events["server"] = MLflowServer(store, port).start()  # the same store, the same address
        events["restarted"] = time.monotonic()

    tracker = Tracker(server.uri, "wand-faults", grace_s=300)
    parent = tracker.parent_run("mlflow-restart", {})
    watcher = when(lambda: has_checkpoint(train), outage)
    try:
        record = track_stage(tracker, parent, train, 1)
        watcher.join(timeout=120)
        assert "restarted" in events, events
        assert record["starts"] == [0]  # training itself never stopped
        stage = plan_stages(train)[0]
        assert logged_steps(server.uri, tracker.find_child(parent, "stage-1").info.run_id) == list(range(stage.end))
    finally:
        events.get("server", server).stop()


def test_an_mlflow_server_down_past_the_grace_period_fails_the_job_and_the_resubmission_resumes(shards, tmp_path):
    store, port = tmp_path / "mlflow", free_port()
    server = MLflowServer(store, port).start()
    train = stage_config(shards, "mlflow-down")
    tracker = Tracker(server.uri, "wand-faults", grace_s=5)
    parent = tracker.parent_run("mlflow-down", {})
    watcher = when(lambda: has_checkpoint(train), lambda: os.killpg(server.proc.pid, signal.SIGKILL))
    with pytest.raises(TrackingUnavailable, match=f"MLflow server at {server.uri} did not answer"):
        track_stage(tracker, parent, train, 1)
    watcher.join(timeout=5)
    record = stage_record(train, 1)
    assert record is not None  # the stage's result and checkpoint are kept
    with MLflowServer(store, port) as again:
        tracker = Tracker(again.uri, "wand-faults")
        resumed = track_stage(tracker, tracker.parent_run("mlflow-down", {}), train, 1)  # the resubmission
        assert resumed["checkpoint"] == record["checkpoint"]  # nothing retrained
        stage = plan_stages(train)[0]
        assert logged_steps(again.uri, tracker.find_child(parent, "stage-1").info.run_id) == list(range(stage.end))


def shard_ids(fs, root: str, manifest: dict) -> list[str]:
    ids = []
    for shard in manifest["shards"]:
        path = storage.join(root, shard["file"])
        assert storage.sha256_file(fs, path) == shard["sha256"]  # the manifest describes the files
        ids += pq.read_table(path, filesystem=fs, columns=["id"]).column("id").to_pylist()
    return ids


def test_the_object_store_killed_mid_precompute_and_restarted(ray_local, s3_server, tmp_path):
    import s3fs

    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint}).mkdir("faults-s3")
    direct, _ = storage.resolve("s3://faults-s3", s3_server.endpoint)
    port = free_port()
    proxy = {"proc": start_proxy(port, s3_server.port)}
    spec = get_spec("cosyvoice2", "tiny")
    rows = corpus_rows(spec, 48, seed=29, min_gen=10, max_gen=24)
    (tmp_path / "corpus").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "corpus" / "c.parquet")
    config = PrecomputeConfig(model="cosyvoice2", model_size="tiny", corpus=str(tmp_path / "corpus"),
                              shards="s3://faults-s3/topk", s3_endpoint=f"http://127.0.0.1:{port}", k=8,
                              rows_per_shard=4)
    events = {}

    def written() -> int:
        return len([i for i in direct.get_file_info(pafs.FileSelector("faults-s3/topk"))
                    if i.path.endswith(".json") and "shard-" in i.path])

    def outage():  # as soon as the run has started writing to the store
        os.killpg(proxy["proc"].pid, signal.SIGKILL)
        events["killed"], events["shards_at_kill"] = time.monotonic(), written()
        time.sleep(8)
        proxy["proc"] = start_proxy(port, s3_server.port)
        events["restarted"] = time.monotonic()

    watcher = when(lambda: storage.exists(direct, "faults-s3/topk/_run.json"), outage)
    try:
        manifest = run_precompute(config)
        watcher.join(timeout=30)
    finally:
        os.killpg(proxy["proc"].pid, signal.SIGKILL)
    assert "restarted" in events
    assert events["shards_at_kill"] < len(manifest["shards"]) == 12  # shards were still to write when it went
    ids = shard_ids(direct, "faults-s3/topk", manifest)
    assert sorted(ids) == sorted(r["id"] for r in rows)  # every row once


def test_the_driver_killed_during_the_precompute_resumes_with_the_finished_shards(ray_local, tmp_path):
    spec = get_spec("cosyvoice2", "tiny")
    rows = corpus_rows(spec, 160, seed=31, min_gen=40, max_gen=80)
    (tmp_path / "corpus").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "corpus" / "c.parquet")
    config = tmp_path / "exp.yaml"
    config.write_text(f"experiment: kill-driver\nmodel: cosyvoice2\nmodel_size: tiny\ncorpus: {tmp_path / 'corpus'}\n"
                      f"shards: {tmp_path / 'topk'}\nstorage: {tmp_path / 'ckpt'}\n"
                      "precompute: {k: 8, rows_per_shard: 4, num_actors: 1}\nevaluate: {enabled: false}\n")
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "jobs.precompute", "--config", str(config)]
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        first = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    topk = tmp_path / "topk"
    deadline = time.monotonic() + 300
    while not list(topk.glob("shard-*.json")) and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.05)
    assert first.poll() is None, f"the precompute ended before it could be killed:\n{log.read_text()[-3000:]}"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()

    def finished_shards() -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in topk.glob("shard-*.parquet") if p.with_suffix(".json").exists()}

    # The teacher actor lives in the cluster, not in the driver's process group: Ray reaps it
    # only after it notices the driver is gone, and it may finish a shard or two meanwhile.
    # Count once nothing has changed for 5 s (a shard here takes well under a second).
    finished, quiet_since, limit = finished_shards(), time.monotonic(), time.monotonic() + 120
    while time.monotonic() - quiet_since < 5:
        assert time.monotonic() < limit, "the killed driver's teacher actor kept writing shards for 2 minutes"
        time.sleep(0.2)
        if (now := finished_shards()) != finished:
            finished, quiet_since = now, time.monotonic()
    assert 0 < len(finished) < 40, f"the kill was meant to land mid-run: {len(finished)} of 40 shards done"
    assert not (topk / "manifest.json").exists()

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(finished)} done, {40 - len(finished)} to compute" in again.stderr + again.stdout
    for name, mtime in finished.items():  # reused, not recomputed
        assert (topk / name).stat().st_mtime_ns == mtime
    fs, root = storage.resolve(str(topk))
    manifest = load_manifest(str(topk))
    assert sorted(shard_ids(fs, root, manifest)) == sorted(r["id"] for r in rows)  # every row once


def test_a_shard_corrupted_on_storage_is_recomputed_by_the_next_precompute(ray_local, tmp_path):
    spec = get_spec("cosyvoice2", "tiny")
    (tmp_path / "corpus").mkdir()
    rows = corpus_rows(spec, 24, seed=37, min_gen=10, max_gen=24)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "corpus" / "c.parquet")
    config = PrecomputeConfig(model="cosyvoice2", model_size="tiny", corpus=str(tmp_path / "corpus"),
                              shards=str(tmp_path / "topk"), k=8, rows_per_shard=8)
    manifest = run_precompute(config)
    topk = tmp_path / "topk"
    flipped, truncated, intact = (topk / s["file"] for s in manifest["shards"])
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x10
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:-50])
    intact_mtime = intact.stat().st_mtime_ns
    again = run_precompute(config)
    assert again["shards"] == manifest["shards"]  # the same bytes again (a deterministic teacher)
    assert intact.stat().st_mtime_ns == intact_mtime
    fs, root = storage.resolve(str(topk))
    assert sorted(shard_ids(fs, root, again)) == sorted(r["id"] for r in rows)
