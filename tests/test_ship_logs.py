"""`python -m jobs.ship_logs`, run as the cluster configs run it (a process of its own, a clean
environment, S3 on moto): Ray's logs reach storage while the node runs and once more when it is
stopped, so they outlive the node."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def node_env(s3_server, tmp_path: Path) -> dict[str, str]:
    return {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8",
            **s3_server.env()}


def s3_objects(s3, bucket: str, prefix: str) -> dict[str, bytes]:
    """The objects under ``prefix`` (not the empty folder markers pyarrow's S3 writes)."""
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
            if not o["Key"].endswith("/")]
    return {k[len(prefix):]: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.2)
    return value


def test_logs_reach_s3_while_running_and_the_last_lines_on_sigterm(s3_server, tmp_path):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint)
    s3.create_bucket(Bucket="logs")
    ray_tmp = tmp_path / "ray"
    session = ray_tmp / "session_2026-11-30_10-00-00_000000_1"
    proc = subprocess.Popen([sys.executable, "-m", "jobs.ship_logs", "--to", "s3://logs/cluster",
                             "--source", str(ray_tmp / "session_latest"), "--every", "0.5", "--node", "worker-7"],
                            cwd=ROOT, env=node_env(s3_server, tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(1.5)  # started before Ray made the session: it waits, and ships nothing yet
        assert proc.poll() is None and s3_objects(s3, "logs", "cluster/") == {}
        (session / "logs" / "old").mkdir(parents=True)
        (ray_tmp / "session_latest").symlink_to(session)
        (session / "logs" / "raylet.out").write_text("raylet started\n")
        (session / "logs" / "old" / "worker-1.err").write_text("worker 1\n")
        prefix = f"cluster/worker-7/{session.name}/"
        wait_for(lambda: len(s3_objects(s3, "logs", prefix)) == 2, 30, "both files on S3")
        with open(session / "logs" / "raylet.out", "a") as f:
            f.write("node idle, terminating\n")  # the last line before teardown
        (session / "logs" / "python-core-worker-2.log").write_text("worker 2\n")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    shipped = s3_objects(s3, "logs", prefix)
    local = {p.relative_to(session / "logs").as_posix(): p.read_bytes()
             for p in (session / "logs").rglob("*") if p.is_file()}
    assert shipped == local and len(local) == 3  # every file, each as the node last wrote it
    assert "testing" not in out  # the (fake) credentials are not printed


@pytest.mark.parametrize("args, needle", [
    (["--to", "s3://logs/x", "--every", "0"], "--every 0.0: must be > 0"),
    (["--to", "s3://logs/x", "--node", "a/b"], "--node 'a/b'"),
    (["--source", "/tmp"], "the following arguments are required: --to"),
])
def test_bad_arguments_are_refused_naming_them(args, needle, tmp_path):
    out = subprocess.run([sys.executable, "-m", "jobs.ship_logs", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={"PATH": os.environ["PATH"], "HOME": str(tmp_path),
                                          "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"})
    assert out.returncode == 2 and needle in out.stderr, out.stderr
