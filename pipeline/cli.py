"""Shared plumbing of the entry points: the experiment YAML with ``--set`` overrides, Ray start-up."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

T = TypeVar("T", bound=BaseModel)


def init_ray() -> None:
    """Join the cluster this job was submitted to (``ray job submit`` sets RAY_ADDRESS), else start
    a local instance of our own. Not Ray's default of joining whatever ``ray start`` cluster this
    machine last ran, which hangs when that cluster is gone; set RAY_ADDRESS=auto to join one."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        _local_cluster_settings()
    ray.init(address=address or "local", ignore_reinit_error=True, log_to_driver=True)


def _local_cluster_settings() -> None:
    """A local Ray of our own: token auth (Ray's default for ``ray.init``, made explicit here; the
    token comes from RAY_AUTH_TOKEN(_PATH), else Ray's own ~/.ray/auth_token) and every port on
    127.0.0.1 (pipeline.services.LOOPBACK_ENV; Ray read the switch at import, so set it there too)."""
    import ray._private.ray_constants as ray_constants

    from pipeline.services import LOOPBACK_ENV

    mode = os.environ.setdefault("RAY_AUTH_MODE", "token")
    if mode != "token":
        print(f"warning: RAY_AUTH_MODE={mode}: this job's local Ray cluster runs without token auth",
              file=sys.stderr)
    os.environ.update(LOOPBACK_ENV)
    ray_constants.ENABLE_RAY_CLUSTER = False


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


def load_experiments(model: type[T], parser: argparse.ArgumentParser, argv: list[str] | None = None):
    """``--config file.yaml`` (one experiment, or ``defaults:`` + ``experiments:`` for several),
    ``--set path.to.field=value`` (repeatable, applied to every experiment), ``--only`` and ``--root``.

    Returns (list of validated configs, parsed args). Errors name the experiment and the field and
    exit with status 2 before anything runs."""
    parser.add_argument("--config", type=Path, required=True, help="YAML experiment config")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a field, e.g. --set train.stages=2 --set storage=s3://bucket/runs")
    parser.add_argument("--only", default=None, metavar="NAMES",
                        help="comma-separated experiment or model names: run only these of a multi-experiment config")
    parser.add_argument("--root", type=Path, default=os.environ.get("WAND_ROOT"),
                        help="folder that relative local paths in the config are under (default: $WAND_ROOT or the "
                             "current directory; a `ray job submit --working-dir .` job runs in a copy of the repo "
                             "without the ignored runs/ folder, so `make demo` passes the repo's absolute path)")
    args = parser.parse_args(argv)
    if not args.config.exists():
        parser.error(f"--config: no such file: {args.config}")
    raw = yaml.safe_load(args.config.read_text()) or {}
    if not isinstance(raw, dict):
        parser.error(f"--config: {args.config} must hold a mapping of field: value")
    overrides: dict = {}
    for item in args.set:
        if "=" not in item:
            parser.error(f"--set {item}: expected FIELD=VALUE")
        key, value = item.split("=", 1)
        try:
            _set_path(overrides, key, yaml.safe_load(value))
        except ValueError as err:
            parser.error(str(err))
    if "experiments" in raw:
        extra = set(raw) - {"defaults", "experiments"}
        if extra:
            parser.error(f"--config: a multi-experiment config holds only 'defaults' and 'experiments', not {sorted(extra)}")
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
        if args.root is not None:
            values = _rooted(values, args.root.resolve())
        try:
            configs.append(model.model_validate(values))
        except (ValidationError, ValueError) as err:
            name = values.get("experiment", "(unnamed)")
            detail = "\n".join(f"  {line}" for line in describe_errors(err))
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
