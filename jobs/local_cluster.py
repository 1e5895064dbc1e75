"""A local Ray head and MLflow server on 127.0.0.1 for `make demo` (stopped by `make stop`).

    python -m jobs.local_cluster up          # Ray head (dashboard + job server :8265), mlflow server :5000
    eval "$(python -m jobs.local_cluster client-env)"   # this shell's `ray job submit` / `ray status` get the token
    python -m jobs.local_cluster env         # the runtime env JSON for `ray job submit --runtime-env-json`
    python -m jobs.local_cluster where       # URLs, the submit command, and the comparison table
    python -m jobs.local_cluster down

State (pids, ports, logs) lives in runs/local/ (or --state-dir). Every port of both services is on
127.0.0.1, and the Ray head runs with Ray's token auth: `up` writes a new random token to
runs/local/ray_auth_token (mode 0600) for each cluster it starts and `down` deletes it. Clients get
the token's path through RAY_AUTH_TOKEN_PATH (`client-env`); the head passes the same two variables
to every job's driver through its own environment, so the runtime env (and with it job records,
logs and MLflow params) never holds the token. The Ray head runs with the project's venv first on
PATH, so a submitted job's `python` is the project's.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from pipeline.services import MLflowServer, RayHead, forget_cluster, ray_auth_env, stop_group, wait_http, write_token

DEFAULT_STATE_DIR = REPO / "runs" / "local"
TOKEN_NAME = "ray_auth_token"


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.killpg(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _state_file(args) -> Path:
    return args.state_dir / "state.json"


def _state(args) -> dict:
    path = _state_file(args)
    return json.loads(path.read_text()) if path.exists() else {}


def up(args) -> int:
    state = _state(args)
    state_dir = args.state_dir
    if _alive(state.get("ray_pid")) and _alive(state.get("mlflow_pid")):
        print(f"already up: Ray {state['dashboard_url']}, MLflow {state['mlflow_uri']}")
        return 0
    down(args, quiet=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)  # logs and the token: this user's only
    token = write_token(state_dir / TOKEN_NAME)  # a new token per cluster
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
           # DeepSpeed's JIT-built CPU comm op is cached per venv; keep it in the repo's ignored cache.
           "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}
    try:
        import torch

        if not torch.cuda.is_available():
            env["DS_ACCELERATOR"] = "cpu"
    except ImportError:
        pass
    print(f"starting mlflow server on 127.0.0.1:{args.mlflow_port} (store: {state_dir / 'mlflow'}) ...", flush=True)
    mlflow = MLflowServer(state_dir / "mlflow", port=args.mlflow_port, log_file=state_dir / "mlflow.log").start()
    print(f"starting Ray head on 127.0.0.1:{args.ray_port} (dashboard :{args.dashboard_port}, "
          f"{args.num_cpus} CPUs, token auth: {token}) ...", flush=True)
    try:
        head = RayHead(token, num_cpus=args.num_cpus, port=args.ray_port, dashboard_port=args.dashboard_port, env=env)
        head.start(log_file=state_dir / "ray.log")
    except Exception:
        mlflow.stop()
        token.unlink(missing_ok=True)
        raise
    _state_file(args).write_text(json.dumps(
        {"ray_pid": head.pid, "mlflow_pid": mlflow.proc.pid, "ray_address": head.address,
         "dashboard_url": head.dashboard_url, "mlflow_uri": mlflow.uri, "token_path": str(token)}, indent=2))
    print(f"up: Ray {head.dashboard_url}, MLflow {mlflow.uri}")
    return 0


def client_env(args) -> int:
    """Shell lines that give this shell's Ray clients the token (its path, not its value)."""
    state = _state(args)
    if not state:
        print("not up: run `python -m jobs.local_cluster up` first", file=sys.stderr)
        return 1
    for name, value in ray_auth_env(state["token_path"]).items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


def runtime_env(args) -> int:
    state = _state(args)
    if not state:
        print("not up: run `python -m jobs.local_cluster up` first", file=sys.stderr)
        return 1
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    print(json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": state["mlflow_uri"], "WAND_GIT_COMMIT": commit or "unknown"}}))
    return 0


def where(args) -> int:
    state = _state(args)
    if not state:
        print("not up", file=sys.stderr)
        return 1
    me = f".venv/bin/python -m jobs.local_cluster{'' if args.state_dir == DEFAULT_STATE_DIR else f' --state-dir {args.state_dir}'}"
    print(f"\nMLflow UI:      {state['mlflow_uri']}   (experiment 'wand-tts': one parent run per model, "
          "a child per stage)")
    print(f"Ray dashboard:  {state['dashboard_url']}   (asks for the token: the contents of {state['token_path']})")
    print(f"Submit a job:   eval \"$({me} client-env)\" && .venv/bin/ray job submit --address "
          f"{state['dashboard_url']} --working-dir . --runtime-env-json \"$({me} env)\" -- python -m jobs.distill ...")
    print("Compare:        .venv/bin/python -m jobs.compare --tracking-uri " + state["mlflow_uri"])
    print("Stop:           make stop\n")
    from pipeline.evals.report import registry_lines, results_table, rows_from_server, ui_lines

    try:
        wait_http(f"{state['mlflow_uri']}/health", 10, what="mlflow server")
        rows = rows_from_server(state["mlflow_uri"], "wand-tts", args.match)
    except (RuntimeError, SystemExit) as err:
        print(f"(no comparison: {err})")
        return 0
    print(results_table(rows))
    print(ui_lines(rows))
    print(registry_lines(rows))
    return 0


def down(args, quiet: bool = False) -> int:
    state = _state(args)
    for key in ("ray_pid", "mlflow_pid"):
        if _alive(state.get(key)):
            stop_group(state[key], timeout=30)
            if not quiet:
                print(f"stopped {key.split('_')[0]} (process group {state[key]})")
    if state.get("ray_address"):  # as `ray stop` does: else Ray's tools keep looking for the dead cluster
        forget_cluster(int(state["ray_address"].rsplit(":", 1)[1]))
    _state_file(args).unlink(missing_ok=True)
    (args.state_dir / TOKEN_NAME).unlink(missing_ok=True)  # the token dies with its cluster
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("up", "down", "env", "client-env", "where"))
    parser.add_argument("--state-dir", type=lambda p: Path(p).resolve(), default=DEFAULT_STATE_DIR,
                        help="pids, ports, logs, the MLflow store and the Ray token (default: runs/local)")
    parser.add_argument("--ray-port", type=int, default=6379)
    parser.add_argument("--dashboard-port", type=int, default=8265)
    parser.add_argument("--mlflow-port", type=int, default=5000)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--match", default="tiny-", help="where: only experiments whose name contains this")
    args = parser.parse_args(argv)
    return {"up": up, "down": down, "env": runtime_env, "client-env": client_env, "where": where}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
