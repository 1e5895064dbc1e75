"""A local Ray head and MLflow server on 127.0.0.1 for `make demo` (stopped by `make stop`).

    python jobs/local_cluster.py up          # Ray head (dashboard + job server :8265), mlflow server :5000
    python jobs/local_cluster.py env         # the runtime env JSON for `ray job submit --runtime-env-json`
    python jobs/local_cluster.py where       # URLs, and the comparison table from the MLflow server
    python jobs/local_cluster.py down

State (pids, ports, logs) lives in runs/local/. Both services bind to 127.0.0.1 only. The Ray head
runs with the project's venv first on PATH, so a submitted job's `python` is the project's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.services import MLflowServer, RayHead, stop_group, wait_http  # noqa: E402

STATE_DIR = REPO / "runs" / "local"
STATE = STATE_DIR / "state.json"


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.killpg(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _state() -> dict:
    return json.loads(STATE.read_text()) if STATE.exists() else {}


def up(args) -> int:
    state = _state()
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    if _alive(state.get("ray_pid")) and _alive(state.get("mlflow_pid")):
        print(f"already up: Ray {state['dashboard_url']}, MLflow {state['mlflow_uri']}")
        return 0
    down(args, quiet=True)
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
           # DeepSpeed's JIT-built CPU comm op is cached per venv; keep it in the repo's ignored cache.
           "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}
    try:
        import torch

        if not torch.cuda.is_available():
            env["DS_ACCELERATOR"] = "cpu"
    except ImportError:
        pass
    print(f"starting mlflow server on 127.0.0.1:{args.mlflow_port} (store: {STATE_DIR / 'mlflow'}) ...", flush=True)
    mlflow = MLflowServer(STATE_DIR / "mlflow", port=args.mlflow_port, log_file=STATE_DIR / "mlflow.log").start()
    print(f"starting Ray head on 127.0.0.1:{args.ray_port} (dashboard :{args.dashboard_port}, "
          f"{args.num_cpus} CPUs) ...", flush=True)
    try:
        head = RayHead(num_cpus=args.num_cpus, port=args.ray_port, dashboard_port=args.dashboard_port, env=env)
        head.start(log_file=STATE_DIR / "ray.log")
    except Exception:
        mlflow.stop()
        raise
    STATE.write_text(json.dumps({"ray_pid": head.pid, "mlflow_pid": mlflow.proc.pid, "ray_address": head.address,
                                 "dashboard_url": head.dashboard_url, "mlflow_uri": mlflow.uri}, indent=2))
    print(f"up: Ray {head.dashboard_url}, MLflow {mlflow.uri}")
    return 0


def runtime_env(args) -> int:
    state = _state()
    if not state:
        print("not up: run `python jobs/local_cluster.py up` first", file=sys.stderr)
        return 1
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    print(json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": state["mlflow_uri"], "WAND_GIT_COMMIT": commit or "unknown"}}))
    return 0


def where(args) -> int:
    state = _state()
    if not state:
        print("not up", file=sys.stderr)
        return 1
    print(f"\nMLflow UI:      {state['mlflow_uri']}   (experiment 'wand-tts': one parent run per model, "
          "a child per stage)")
    print(f"Ray dashboard:  {state['dashboard_url']}")
    print("Compare:        .venv/bin/python jobs/compare.py --tracking-uri " + state["mlflow_uri"])
    print("Stop:           make stop\n")
    from jobs.compare import rows_from_server
    from pipeline.report import results_table

    try:
        wait_http(f"{state['mlflow_uri']}/health", 10, what="mlflow server")
        rows = rows_from_server(state["mlflow_uri"], "wand-tts", args.match)
    except (RuntimeError, SystemExit) as err:
        print(f"(no comparison: {err})")
        return 0
    print(results_table(rows))
    return 0


def down(args, quiet: bool = False) -> int:
    state = _state()
    for key in ("ray_pid", "mlflow_pid"):
        if _alive(state.get(key)):
            stop_group(state[key], timeout=30)
            if not quiet:
                print(f"stopped {key.split('_')[0]} (process group {state[key]})")
    if STATE.exists():
        STATE.unlink()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("up", "down", "env", "where"))
    parser.add_argument("--ray-port", type=int, default=6379)
    parser.add_argument("--dashboard-port", type=int, default=8265)
    parser.add_argument("--mlflow-port", type=int, default=5000)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--match", default="tiny-", help="where: only experiments whose name contains this")
    args = parser.parse_args(argv)
    return {"up": up, "down": down, "env": runtime_env, "where": where}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
