"""Shared plumbing of the entry points: the experiment YAML with ``--set`` overrides, Ray start-up."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from pipeline import yaml_strict
from pipeline.checks import env_seconds
from pipeline.redaction import redact
from pipeline.yaml_strict import ConfigFileError

T = TypeVar("T", bound=BaseModel)


def prepare(configs: list, steps: tuple[str, ...] = ("precompute", "train", "evaluate")) -> None:
    """What every entry point does between reading its configs and its first real step: logging
    (redacted), the inputs each config names checked (pipeline.preflight), Ray started or joined,
    then the resources the configs ask for checked against that cluster. Problems are printed one
    per line, naming the experiment and the field, and exit with status 2 before anything is written."""
    from pipeline.preflight import check_inputs, check_resources

    setup_logging()
    _exit_on_problems({c.experiment: check_inputs(c, steps) for c in configs}, "invalid input")
    local = init_ray()
    _exit_on_problems({c.experiment: check_resources(c, steps, local) for c in configs},
                      "impossible resource request")


def _exit_on_problems(problems: dict[str, list[str]], what: str) -> None:
    if not any(problems.values()):
        return
    for experiment, lines in problems.items():
        if lines:
            print(f"{what} (experiment {experiment}):", file=sys.stderr)
            for line in lines:
                print(f"  {redact(line)}", file=sys.stderr)
    raise SystemExit(2)


def init_ray() -> bool:
    """Join the cluster this job was submitted to (``ray job submit`` sets RAY_ADDRESS), else start
    a local instance of our own. Not Ray's default of joining whatever ``ray start`` cluster this
    machine last ran, which hangs when that cluster is gone; set RAY_ADDRESS=auto to join one.

    Everything Ray reads at import (its auth mode, the token's path, the loopback switch) is set
    before the first ``import ray`` of this process; an address that does not answer fails within
    WAND_RAY_CONNECT_S seconds naming it (Ray itself would wait forever). Returns whether the
    cluster is this job's own (local) one."""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return not address  # this process already runs Ray (a caller of main(), a test): used as it is
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        _check_reachable(address, env_seconds(CONNECT_ENV, 30.0, minimum=1.0))
    else:
        _local_cluster_settings()
    import ray
    import ray._private.ray_constants as ray_constants

    if address:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=True)
    else:
        ray_constants.ENABLE_RAY_CLUSTER = False  # the loopback switch, in case ray was imported before
        from pipeline.services import own_state_api

        with own_state_api() as own:  # not whatever cluster /tmp/ray/ray_current_cluster names
            ray.init(address="local", ignore_reinit_error=True, log_to_driver=True, **own)
    return not address or address == "local"


CONNECT_ENV = "WAND_RAY_CONNECT_S"


def _check_reachable(address: str, seconds: float) -> None:
    """A ``host:port`` (or ``ray://host:port``) address must accept a TCP connection within ``seconds``."""
    import socket
    import time
    from urllib.parse import urlsplit

    if address in ("auto", "local"):
        return
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise SystemExit(f"RAY_ADDRESS={redact(address)}: expected host:port (or ray://host:port, or auto)")
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, seconds)):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise SystemExit(f"RAY_ADDRESS={redact(address)}: no Ray cluster answered at {host}:{port} within "
                                 f"{seconds:.0f} s ({err.strerror or err}); is the head up? Unset RAY_ADDRESS to "
                                 f"start a local Ray, or raise {CONNECT_ENV}") from None
            time.sleep(1.0)


def _local_cluster_settings() -> None:
    """A local Ray of our own: token auth with a token of its own (a fresh random one, mode 0600, in
    a private folder removed at exit; only its path is in the environment, so it is never logged)
    and every port on 127.0.0.1 (pipeline.services.LOOPBACK_ENV). Ray reads these when it is
    imported, so they are set before the first ``import ray``; if something imported Ray earlier in
    this process, Ray's auth state is reloaded from them."""
    import atexit
    import shutil
    import tempfile

    from pipeline.services import LOOPBACK_ENV, write_token

    mode = os.environ.setdefault("RAY_AUTH_MODE", "token")
    if mode == "token":
        folder = Path(tempfile.mkdtemp(prefix="wand-ray-auth-"))  # mode 0700: this user only
        token = write_token(folder / "token")
        os.environ.pop("RAY_AUTH_TOKEN", None)  # it would win over the path (Ray's precedence)
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)

        def _cleanup() -> None:  # after Ray's own shutdown: its threads read the token until then
            try:
                import ray

                ray.shutdown()
            except Exception:
                pass
            shutil.rmtree(folder, ignore_errors=True)

        atexit.register(_cleanup)
    else:
        print(f"warning: RAY_AUTH_MODE={mode}: this job's local Ray cluster runs without token auth",
              file=sys.stderr)
    os.environ.update(LOOPBACK_ENV)
    if "ray" in sys.modules:
        _reload_ray_auth()


def _reload_ray_auth() -> None:
    """Ray caches its auth mode and token at import: make an already-imported Ray read them again
    (the same two calls Ray's own tests use to switch auth settings in one process)."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def setup_logging() -> None:
    """The entry points' log format, with every line redacted (pipeline.redaction)."""
    import logging

    from pipeline.redaction import install_log_redaction

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    install_log_redaction()


def _set_path(values: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = values
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {dotted}: '{key}' is not a section")
    node[keys[-1]] = value


PATH_FIELDS = (("corpus",), ("shards",), ("storage",), ("evaluate", "corpus"))


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _rooted(values: dict, root: Path) -> dict:
    """Relative local paths of an experiment made absolute under ``root``."""
    for path in PATH_FIELDS:
        node = values
        for key in path[:-1]:
            node = node.get(key) if isinstance(node.get(key), dict) else {}
        value = node.get(path[-1])
        # An empty path stays empty (the config then refuses it): rooted, it would name the root itself.
        if isinstance(value, str) and value and "://" not in value and not Path(value).is_absolute():
            node[path[-1]] = str(root / value)
    # A teacher may also be a Hugging Face id ("org/name"): rooted only where that folder exists.
    teacher = values.get("teacher_source")
    if isinstance(teacher, str) and "://" not in teacher and not Path(teacher).is_absolute() and (root / teacher).exists():
        values["teacher_source"] = str(root / teacher)
    return values


def describe_errors(err: Exception) -> list[str]:
    """One line per problem, ``field: what is wrong`` (cross-field checks name their field in the
    message itself); never the value that was given, which may hold a secret."""
    if not isinstance(err, ValidationError):
        return [str(err)]
    lines = []
    for error in err.errors():
        where = ".".join(str(p) for p in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {message}" if where else message)
    return lines


# Environment variables the project reads, checked before anything starts: name -> (check, what it takes).
def _choice(*values: str):
    def check(name: str, raw: str) -> None:
        if raw not in values:
            raise ValueError(f"{name}: must be one of {', '.join(values)}, got {raw[:40]!r}")
    return check


def _seconds(minimum: float):
    def check(name: str, raw: str) -> None:
        env_seconds(name, 0.0, minimum)
    return check


def _folder(name: str, raw: str) -> None:
    if not Path(raw).is_dir():
        raise ValueError(f"{name}: no such folder: {raw}")


ENVIRONMENT = {
    "WAND_STORAGE_RETRY_S": _seconds(0.0),
    "WAND_RAY_CONNECT_S": _seconds(1.0),
    "WAND_FLEX_COMPILE": _choice("auto", "0", "1"),
    "WAND_TRUST_CHECKPOINTS": _choice("0", "1"),
    "WAND_ROOT": _folder,
    "RAY_AUTH_MODE": _choice("token", "disabled"),
}


def check_environment() -> list[str]:
    """One line per environment variable of ours that is set to something unusable."""
    problems = []
    for name, check in ENVIRONMENT.items():
        raw = os.environ.get(name)
        if raw is None or raw == "":
            continue
        try:
            check(name, raw)
        except ValueError as err:
            problems.append(str(err))
    return problems


def read_config_file(path: Path) -> dict:
    """The experiment YAML at ``path`` (strict YAML 1.2, pipeline.yaml_strict); ``ConfigFileError``
    naming the file and the line otherwise."""
    if path.is_dir():
        raise ConfigFileError(f"--config {path}: is a folder, not a YAML file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigFileError(f"--config {path}: cannot be read ({err.strerror or err})") from None
    raw = yaml_strict.load(data, f"--config {path}")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigFileError(f"--config {path}: must hold a mapping of field: value, not a {type(raw).__name__}")
    if "experiments" in raw:
        extra = set(raw) - {"defaults", "experiments"}
        if extra:
            raise ConfigFileError(f"--config {path}: a multi-experiment config holds only 'defaults' and "
                                  f"'experiments', not {sorted(map(str, extra))}")
        if not isinstance(raw["experiments"], list) or not raw["experiments"]:
            raise ConfigFileError(f"--config {path}: experiments: must be a non-empty list of experiments")
        for number, entry in enumerate(raw["experiments"]):
            if not isinstance(entry, dict):
                raise ConfigFileError(f"--config {path}: experiments[{number}]: must be a mapping of field: value")
        if not isinstance(raw.get("defaults") or {}, dict):
            raise ConfigFileError(f"--config {path}: defaults: must be a mapping of field: value")
    return raw


def load_experiments(model: type[T], parser: argparse.ArgumentParser, argv: list[str] | None = None):
    """``--config file.yaml`` (one experiment, or ``defaults:`` + ``experiments:`` for several),
    ``--set path.to.field=value`` (repeatable, applied to every experiment), ``--only`` and ``--root``.

    Returns (list of validated configs, parsed args). Errors (the file, a value, the environment)
    name the experiment and the field and exit with status 2 before anything runs."""
    parser.add_argument("--config", type=Path, required=True, help="YAML experiment config")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a field, e.g. --set curriculum.stages=2 --set storage=s3://bucket/runs")
    parser.add_argument("--only", default=None, metavar="NAMES",
                        help="comma-separated experiment or model names: run only these of a multi-experiment config")
    parser.add_argument("--root", type=Path, default=os.environ.get("WAND_ROOT") or None,
                        help="folder that relative local paths in the config are under (default: $WAND_ROOT or the "
                             "current directory; a `ray job submit --working-dir .` job runs in a copy of the repo "
                             "without the ignored runs/ folder, so `make demo` passes the repo's absolute path)")
    args = parser.parse_args(argv)
    problems = check_environment()
    if problems:
        parser.error("; ".join(problems))
    if not args.config.exists():
        parser.error(f"--config: no such file: {args.config}")
    if args.root is not None and not args.root.is_dir():
        parser.error(f"--root: no such folder: {args.root}")
    try:
        raw = read_config_file(args.config)
        overrides: dict = {}
        for item in args.set:
            if "=" not in item:
                raise ConfigFileError(f"--set {item}: expected FIELD=VALUE")
            key, value = item.split("=", 1)
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
                raise ConfigFileError(f"--set {key[:60]}: expected a dotted field name such as curriculum.stages")
            _set_path(overrides, key, yaml_strict.load(value, f"--set {key}"))
    except ConfigFileError as err:
        parser.error(redact(str(err)))
    except ValueError as err:  # _set_path: a field under a value
        parser.error(redact(str(err)))
    if "experiments" in raw:
        entries = [_merge(raw.get("defaults") or {}, e) for e in raw["experiments"]]
    else:
        entries = [raw]
    if args.only:
        wanted = set(args.only.split(","))
        entries = [e for e in entries if e.get("experiment") in wanted or e.get("model") in wanted]
        if not entries:
            parser.error(f"--only {args.only}: no experiment or model of that name in {args.config}")
    configs = []
    for entry in entries:
        values = _merge(entry, overrides)
        # Always rooted: Ray Train runs its workers in a folder of its own (the run's artifacts), where
        # a relative path such as teachers/cosyvoice2 names nothing.
        values = _rooted(values, (args.root or Path.cwd()).resolve())
        try:
            configs.append(model.model_validate(values))
        except (ValidationError, ValueError) as err:
            name = values.get("experiment", "(unnamed)")
            name = name if isinstance(name, str) and re.fullmatch(r"[\w.-]{1,80}", name) else "(unnamed)"
            detail = "\n".join(f"  {redact(line)}" for line in describe_errors(err))
            print(f"invalid config ({args.config}, experiment {name}):\n{detail}", file=sys.stderr)
            raise SystemExit(2) from None
    return configs, args


def load_config_with_overrides(model: type[T], parser: argparse.ArgumentParser, argv: list[str] | None = None,
                               return_args: bool = False):
    """Like ``load_experiments`` for entry points that take one experiment (pick it with ``--only``)."""
    configs, args = load_experiments(model, parser, argv)
    if len(configs) != 1:
        names = ", ".join(getattr(c, "experiment", "?") for c in configs)
        parser.error(f"--config holds {len(configs)} experiments ({names}); pick one with --only")
    return (configs[0], args) if return_args else configs[0]
