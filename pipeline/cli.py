"""Shared plumbing of the entry points: typed YAML configs with CLI overrides, Ray start-up."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

T = TypeVar("T", bound=BaseModel)


def config_from_args(model: type[T], parser: argparse.ArgumentParser, argv: list[str] | None = None) -> T:
    """``--config file.yaml`` plus ``--<field> value`` for every field of ``model``.

    Errors name the field and exit with status 2 before anything runs."""
    parser.add_argument("--config", type=Path, help="YAML file with the config fields")
    for name, field in model.model_fields.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None,
                            help=(field.description or "") + f" (default: {field.default!r})")
    args = parser.parse_args(argv)
    values: dict = {}
    if args.config is not None:
        if not args.config.exists():
            parser.error(f"--config: no such file: {args.config}")
        values = yaml.safe_load(args.config.read_text()) or {}
        if not isinstance(values, dict):
            parser.error(f"--config: {args.config} must hold a mapping of field: value")
    for name in model.model_fields:
        override = getattr(args, name)
        if override is not None:
            values[name] = yaml.safe_load(override)  # "32" -> 32, "null" -> None, "s3://..." stays a string
    try:
        return model.model_validate(values)
    except ValidationError as err:
        lines = [f"  {'.'.join(str(p) for p in e['loc']) or '(config)'}: {e['msg']}" for e in err.errors()]
        print(f"invalid config ({args.config or 'command line'}):\n" + "\n".join(lines), file=sys.stderr)
        raise SystemExit(2) from None


def init_ray() -> None:
    """Join the cluster this job was submitted to, or start a local instance."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True, log_to_driver=True)


def _set_path(values: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = values
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {dotted}: '{key}' is not a section")
    node[keys[-1]] = value


def load_config_with_overrides(model: type[T], parser: argparse.ArgumentParser, argv: list[str] | None = None,
                               return_args: bool = False):
    """``--config file.yaml`` plus ``--set path.to.field=value`` (repeatable) for nested configs."""
    parser.add_argument("--config", type=Path, required=True, help="YAML experiment config")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a field, e.g. --set train.stages=2 --set storage=s3://bucket/runs")
    args = parser.parse_args(argv)
    if not args.config.exists():
        parser.error(f"--config: no such file: {args.config}")
    values = yaml.safe_load(args.config.read_text()) or {}
    for item in args.set:
        if "=" not in item:
            parser.error(f"--set {item}: expected FIELD=VALUE")
        key, raw = item.split("=", 1)
        _set_path(values, key, yaml.safe_load(raw))
    try:
        config = model.model_validate(values)
    except ValidationError as err:
        lines = [f"  {'.'.join(str(p) for p in e['loc']) or '(config)'}: {e['msg']}" for e in err.errors()]
        print(f"invalid config ({args.config}):\n" + "\n".join(lines), file=sys.stderr)
        raise SystemExit(2) from None
    return (config, args) if return_args else config
