"""The demo's services as an attacker on the network would see them: `jobs/local_cluster.py up` (the
Ray head and MLflow server of `make demo`) in a temporary state folder, with free ports.

- the Ray head refuses jobs and API calls without its token, and with a wrong one;
- while a job runs, every listening socket of every process the cluster started is on 127.0.0.1;
- the token file is 0600 in a 0700 folder and reaches clients as a path, never as a value.
"""

import ipaddress
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from pipeline.services import free_port, read_token

pytestmark = [pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def local_cluster(state_dir: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.local_cluster", "--state-dir", str(state_dir), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("local")
    ports = ["--ray-port", str(free_port()), "--dashboard-port", str(free_port()), "--mlflow-port", str(free_port())]
    out = local_cluster(state_dir, "up", *ports, "--num-cpus", "2")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    state = json.loads((state_dir / "state.json").read_text())
    try:
        yield state_dir, state
    finally:
        local_cluster(state_dir, "down")
    assert not (state_dir / "ray_auth_token").exists()  # `down` deletes the dead cluster's token
    from ray._common.utils import get_ray_address_file

    pointer = Path(get_ray_address_file(None))  # and, as `ray stop` does, Ray's pointer to it
    assert not (pointer.exists() and pointer.read_text().strip() == state["ray_address"]), pointer.read_text()


def bare_env(home: Path) -> dict:
    """This process's environment with no Ray token anywhere: no auth variables, and a HOME without
    ~/.ray/auth_token (Ray's default path)."""
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    return {**env, "HOME": str(home)}


def client_env(state_dir: Path, home: Path) -> dict:
    """The environment `eval "$(local_cluster.py client-env)"` gives a shell."""
    out = local_cluster(state_dir, "client-env")
    assert out.returncode == 0, out.stderr
    env = bare_env(home)
    for line in out.stdout.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        env[name] = value.strip("'")
    return env


def submit(env: dict, dashboard_url: str, *entrypoint: str, wait: bool = True, timeout: float = 180):
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", dashboard_url, *([] if wait else ["--no-wait"]),
           "--", *entrypoint]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def http_status(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.timeout(600)
def test_the_token_is_private_and_travels_as_a_path(demo):
    state_dir, state = demo
    token_path = Path(state["token_path"])
    assert token_path.parent == state_dir and token_path.stat().st_mode & 0o777 == 0o600
    assert state_dir.stat().st_mode & 0o777 == 0o700
    token = read_token(token_path)
    assert len(token) == 64 and int(token, 16) >= 0
    exports = local_cluster(state_dir, "client-env").stdout
    runtime_env = local_cluster(state_dir, "env").stdout
    where = local_cluster(state_dir, "where", "--match", "none").stdout
    assert "RAY_AUTH_MODE=token" in exports and str(token_path) in exports
    for text in (exports, runtime_env, where, (state_dir / "state.json").read_text()):
        assert token not in text
    assert "RAY_AUTH" not in runtime_env  # the driver gets the path from the head's environment
    # A Ray token file under runs/ is never committed: git ignores the folder.
    assert subprocess.run(["git", "check-ignore", "-q", "runs/local/ray_auth_token"], cwd=ROOT).returncode == 0


@pytest.mark.timeout(600)
def test_the_head_refuses_clients_without_the_token(demo, tmp_path):
    state_dir, state = demo
    url = state["dashboard_url"]
    token = read_token(state["token_path"])
    (tmp_path / "wrong").write_text("0" * 64)
    os.chmod(tmp_path / "wrong", 0o600)

    # The demo's own job, as `make demo` submits it, without the token: refused before it is accepted.
    distill = ["python", "-m", "jobs.distill", "--config", "jobs/configs/tiny.yaml", "--only", "cosyvoice2"]
    no_token = submit(bare_env(tmp_path), url, *distill)
    assert no_token.returncode != 0 and "raysubmit_" not in no_token.stdout
    assert "Missing authentication token" in no_token.stdout + no_token.stderr
    wrong = submit({**bare_env(tmp_path), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "wrong")},
                   url, "echo", "ran-with-wrong-token")
    assert wrong.returncode != 0 and "Invalid authentication token" in wrong.stdout + wrong.stderr

    ok = submit(client_env(state_dir, tmp_path), url, "echo", "ran-with-token")
    assert ok.returncode == 0 and "ran-with-token" in ok.stdout and "succeeded" in ok.stdout, ok.stdout[-2000:]

    # The HTTP API itself, and the GCS (gRPC) through `ray status`.
    assert http_status(f"{url}/api/jobs/") == 401
    assert http_status(f"{url}/api/jobs/", {"Authorization": "Bearer " + "0" * 64}) == 403
    assert http_status(f"{url}/api/jobs/", {"Authorization": f"Bearer {token}"}) == 200
    status = [str(VENV_BIN / "ray"), "status", "--address", state["ray_address"]]
    refused = subprocess.run(status, capture_output=True, text=True, timeout=120, env=bare_env(tmp_path))
    assert refused.returncode != 0 and "auth" in (refused.stdout + refused.stderr).lower()
    allowed = subprocess.run(status, capture_output=True, text=True, timeout=120, env=client_env(state_dir, tmp_path))
    assert allowed.returncode == 0 and "Resources" in allowed.stdout, allowed.stderr[-2000:]


JOB = ("import ray, time; ray.init(); "
       "a = ray.remote(num_cpus=0.5)(type('A', (), {'f': lambda self: 1})).remote(); "
       "assert ray.get(a.f.remote()) == 1; print('job-ready', flush=True); time.sleep(120)")


def cluster_processes(state: dict) -> list[psutil.Process]:
    """Every process the demo's services started: the Ray head's and the MLflow server's process
    trees, plus any Ray process that names this cluster's GCS address (workers, the job's driver)."""
    procs = {}
    for pid in (state["ray_pid"], state["mlflow_pid"]):
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            procs[proc.pid] = proc
    for proc in psutil.process_iter(["cmdline"]):
        if state["ray_address"] in " ".join(proc.info["cmdline"] or []):
            procs[proc.pid] = proc
    return list(procs.values())


@pytest.mark.timeout(600)
def test_every_listening_socket_of_the_demo_is_on_loopback(demo, tmp_path):
    state_dir, state = demo
    env = client_env(state_dir, tmp_path)
    out = submit(env, state["dashboard_url"], sys.executable, "-c", JOB, wait=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", out.stdout + out.stderr).group(0)
    logs = [str(VENV_BIN / "ray"), "job", "logs", "--address", state["dashboard_url"], job_id]
    deadline = time.monotonic() + 180
    while "job-ready" not in subprocess.run(logs, capture_output=True, text=True, env=env, timeout=60).stdout:
        assert time.monotonic() < deadline, "the job never started its actor"
        time.sleep(2)

    listening = []
    for proc in cluster_processes(state):
        try:
            conns = proc.net_connections(kind="inet")
            name = proc.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        listening += [(name, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    subprocess.run([str(VENV_BIN / "ray"), "job", "stop", "--address", state["dashboard_url"], job_id],
                   capture_output=True, env=env, timeout=120)

    ports = {port for _, _, port in listening}
    gcs_port = int(state["ray_address"].rsplit(":", 1)[1])
    dashboard_port = int(state["dashboard_url"].rsplit(":", 1)[1])
    mlflow_port = int(state["mlflow_uri"].rsplit(":", 1)[1])
    # The listing saw the cluster: the GCS, dashboard, MLflow, the raylet and the job's workers.
    assert {gcs_port, dashboard_port, mlflow_port} <= ports and len(listening) >= 8, listening
    names = {name for name, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names, names

    def loopback(ip: str) -> bool:
        address = ipaddress.ip_address(ip)
        mapped = getattr(address, "ipv4_mapped", None)
        return (mapped or address).is_loopback

    exposed = [(name, ip, port) for name, ip, port in listening if not loopback(ip)]
    assert exposed == [], f"listening beyond 127.0.0.1: {exposed}"
