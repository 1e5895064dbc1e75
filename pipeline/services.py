"""Local services on 127.0.0.1: an MLflow tracking server (sqlite + local artifacts) and a Ray head
with token auth.

Used by ``make demo`` (through ``jobs/local_cluster.py``) and by the tests. Started the way that
works on a small machine (../shared/STACK-NOTES.md): one worker, no job consumers, its own process
group so stopping it leaves no orphans.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

__all__ = ["free_port", "MLflowServer", "RayHead", "wait_http", "stop_group", "kill_matching", "write_token",
           "ray_auth_env", "LOOPBACK_ENV", "own_state_api", "forget_cluster"]

# Ray rewrites a node IP of 127.0.0.1 to the machine's address (ray._private.services.
# resolve_ip_for_localhost), so `--node-ip-address 127.0.0.1` still leaves the GCS, the raylet, the
# Ray Client server and three Prometheus metrics endpoints (no auth at all) on a reachable address.
# This switch (meant for single-machine clusters on macOS/Windows) makes Ray use loopback as the
# node IP: measured with `ss -ltnp`, every port of a head started with it is on 127.0.0.1. Only for
# clusters that live on one machine: other nodes could not reach a loopback GCS.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@contextlib.contextmanager
def own_state_api():
    """``ray.init`` arguments (within this block) for an in-process local cluster whose state API is its own.

    Ray's state API (``ray.util.state``; Ray Train's placement-group cleaner asks it, at the end of
    every ``fit()``, whether the controller still lives) finds its cluster through the pointer that
    the last ``ray start`` left in /tmp/ray/ray_current_cluster, never the in-process one. When that
    cluster is gone (stopped without ``ray stop``), each query waits 40 s for a dead GCS and every
    fit ended 10-12 s late with "Failed to stop PlacementGroupCleaner gracefully" (measured). The
    address is in the environment only while ``ray.init`` starts the raylet, which every worker
    inherits it from; not after: it overrides the ``--address`` of any later ``ray job submit`` or
    JobSubmissionClient of this process and its children."""
    port = free_port()
    key, before = "RAY_API_SERVER_ADDRESS", os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ[key] = f"http://127.0.0.1:{port}"
    try:
        yield {"dashboard_host": "127.0.0.1", "dashboard_port": port}
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def write_token(path: str | Path) -> Path:
    """A fresh random Ray auth token in ``path``, created with mode 0600 (never readable by others,
    not even for an instant) and moved into place whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32))
    os.replace(tmp, path)
    return path


def ray_auth_env(token_path: str | Path) -> dict[str, str]:
    """What a Ray process (head, `ray job submit`, a driver) needs to use the token in ``token_path``:
    the path, never the token itself, so it cannot land in a runtime env, a job record or a log."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(Path(token_path).resolve())}


def read_token(token_path: str | Path) -> str:
    return Path(token_path).read_text().strip()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, what: str = "service",
              headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited at start-up (status {proc.returncode})")
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not answer at {url} within {timeout:.0f} s")


class MLflowServer:
    """``mlflow server`` on 127.0.0.1 with its store under ``root`` (mlflow.db + artifacts/)."""

    def __init__(self, root: str | Path, port: int | None = None, log_file: str | Path | None = None):
        self.root = Path(root).resolve()
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log_file = Path(log_file) if log_file else self.root / "server.log"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        mlflow = Path(sys.executable).with_name("mlflow")
        return [str(mlflow) if mlflow.exists() else "mlflow", "server",
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination", str(self.root / "artifacts")]

    def start(self, timeout: float = 90) -> "MLflowServer":
        self.root.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)  # own process group: stop() takes all of it
        try:
            wait_http(f"{self.uri}/health", timeout, self.proc, f"mlflow server (log: {self.log_file})")
        except RuntimeError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_group(self.proc.pid)
        self.proc = None

    def __enter__(self) -> "MLflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_group(pid: int, timeout: float = 15) -> None:
    """SIGTERM the process group led by ``pid``; SIGKILL what is left after ``timeout``."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        try:  # reap it if it is our child
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class RayHead:
    """``ray start --head`` on 127.0.0.1 with Ray's token auth (dashboard and job server on
    ``dashboard_port``).

    The token is read from ``token_path`` (written there with mode 0600 if the file is missing);
    every process of the head, and so every job's driver and workers, gets ``RAY_AUTH_MODE=token``
    and the token's *path* through the environment, never the token in a runtime env. Clients
    (``ray job submit``, ``JobSubmissionClient``) need ``client_env()`` in their environment.
    ``loopback=True`` (one-machine clusters) binds every Ray port to 127.0.0.1 (see LOOPBACK_ENV).
    The head's processes get ``env`` too (e.g. PATH with the venv first, so a job's ``python`` is
    the project's)."""

    def __init__(self, token_path: str | Path, num_cpus: int = 2, port: int | None = None,
                 dashboard_port: int | None = None, env: dict[str, str] | None = None, resources: dict | None = None,
                 system_config: dict | None = None, extra_args: list[str] | None = None, loopback: bool = True):
        self.token_path = Path(token_path).resolve()
        self.num_cpus = num_cpus
        self.port = port or free_port()
        self.dashboard_port = dashboard_port or free_port()
        # The dashboard agent (which runs submitted jobs) defaults to port 52365 for every cluster on
        # the machine: a second cluster's agent (an in-process ray.init, another head) cannot bind it,
        # and job submissions then fail with "No available agent". Each head gets its own.
        self.agent_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {}), **ray_auth_env(self.token_path),
                    **(LOOPBACK_ENV if loopback else {})}
        self.env.pop("RAY_AUTH_TOKEN", None)  # it would win over the path (Ray's precedence)
        self.resources = resources
        self.system_config = system_config
        self.extra_args = list(extra_args or [])

    def client_env(self) -> dict[str, str]:
        """Environment for a client of this head: ``{**os.environ, **head.client_env()}``."""
        return ray_auth_env(self.token_path)

    def command(self) -> list[str]:
        ray = Path(sys.executable).with_name("ray")
        cmd = [str(ray) if ray.exists() else "ray", "start", "--head", "--node-ip-address", "127.0.0.1",
               "--port", str(self.port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
               "--num-cpus", str(self.num_cpus), "--include-dashboard", "true", "--disable-usage-stats",
               "--dashboard-agent-listen-port", str(self.agent_port)]
        if self.resources:
            cmd += ["--resources", json.dumps(self.resources)]
        if self.system_config:
            cmd += ["--system-config", json.dumps(self.system_config)]
        return cmd + self.extra_args

    def start(self, timeout: float = 120, log_file: str | Path | None = None) -> "RayHead":
        """Start the head in the foreground (``--block``) in its own process group, so ``stop``
        takes down exactly this cluster (``ray stop`` would stop every Ray on the machine)."""
        if not self.token_path.exists():
            write_token(self.token_path)
        log = open(log_file, "ab") if log_file else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.command() + ["--block"], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        if log_file:
            log.close()
        try:  # the job server answers 401 without the token: ready means it accepts ours
            wait_http(f"{self.dashboard_url}/api/version", timeout, self.proc, "Ray head (dashboard / job server)",
                      headers={"Authorization": f"Bearer {read_token(self.token_path)}"})
            # Jobs are run by the head's dashboard agent, which comes up after the dashboard.
            wait_http(f"http://127.0.0.1:{self.agent_port}/api/healthz", timeout, self.proc,
                      "Ray head (dashboard agent, which runs submitted jobs)")
        except RuntimeError:
            self.stop()
            raise
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if getattr(self, "proc", None) is not None else None

    def stop(self) -> None:
        if self.pid is not None:
            stop_group(self.pid, timeout=30)
            self.proc = None
        kill_matching(f"127.0.0.1:{self.port}")  # raylets of extra nodes, workers that left the group
        forget_cluster(self.port)

    def __enter__(self) -> "RayHead":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def forget_cluster(port: int) -> None:
    """Remove Ray's pointer to the last `ray start` cluster if it is this one (``ray stop`` does the
    same): a later ``ray.init()`` would otherwise try to join the dead cluster."""
    try:
        from ray._common.utils import get_ray_address_file  # where `ray start` records it

        pointer = Path(get_ray_address_file(None))
    except ImportError:  # another Ray layout: the documented default
        pointer = Path("/tmp/ray/ray_current_cluster")
    try:
        if pointer.read_text().strip().endswith(f":{port}"):
            pointer.unlink()
    except OSError:
        pass


def kill_matching(needle: str) -> int:
    """Kill processes (not this one) whose command line mentions ``needle``; returns how many.
    Ray processes carry their cluster's GCS address, so ``127.0.0.1:<port>`` picks one cluster only,
    where ``ray stop`` would stop every Ray instance on the machine."""
    import psutil

    victims = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid != os.getpid() and needle in " ".join(proc.info["cmdline"] or []):
                victims.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for proc in victims:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=10)
    return len(victims)
