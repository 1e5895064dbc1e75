"""The one YAML loader of configs and ``--set`` values: YAML 1.2's core schema, nothing more.

PyYAML's ``safe_load`` is YAML 1.1: ``010`` reads as 8, ``1:30`` as 90, ``yes``/``on`` as True, a
duplicate key silently keeps the last value, and a second document is an error deep in a
traceback. Here: integers are decimal (``0o``/``0x`` explicit), booleans are ``true``/``false``,
a duplicate key, any tag (``!!python/object``: never constructed) and a second document are
errors that name the line. ``ConfigFileError`` carries one line for the user.
"""

from __future__ import annotations

import re

import yaml

__all__ = ["load", "ConfigFileError"]


class ConfigFileError(ValueError):
    """A config file or value that is not the YAML a config is written in (one line, no value echoed)."""


class _Loader(yaml.SafeLoader):
    pass


# YAML 1.2 core schema resolvers (https://yaml.org/spec/1.2.2/#1032-tag-resolution), replacing 1.1's.
_Loader.yaml_implicit_resolvers = {}
_CORE = [
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("tag:yaml.org,2002:int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
    ("tag:yaml.org,2002:float",
     r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
     "-+0123456789."),
    ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
]
for _tag, _pattern, _first in _CORE:
    _Loader.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))


def _int(loader: _Loader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    if text.startswith("0o"):
        return int(text[2:], 8)
    if text.startswith("0x"):
        return int(text[2:], 16)
    return int(text, 10)  # "010" is ten, as YAML 1.2 reads it


def _float(loader: _Loader, node: yaml.ScalarNode) -> float:
    text = loader.construct_scalar(node).lower()
    if text.endswith(".inf"):
        return float("-inf") if text.startswith("-") else float("inf")
    if text.endswith(".nan"):
        return float("nan")
    return float(text)


def _mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigFileError(f"line {key_node.start_mark.line + 1}: duplicate key '{key}' "
                                  f"(first at line {seen[key] + 1})")
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


def _refuse_tag(loader: _Loader, suffix: str, node: yaml.Node):
    tag = node.tag.replace("tag:yaml.org,2002:", "!!")
    raise ConfigFileError(f"line {node.start_mark.line + 1}: the tag '{tag}' is not allowed in a config "
                          "(plain values, lists and mappings only)")


_Loader.add_constructor("tag:yaml.org,2002:int", _int)
_Loader.add_constructor("tag:yaml.org,2002:float", _float)
_Loader.add_constructor("tag:yaml.org,2002:map", _mapping)
_Loader.add_multi_constructor("", _refuse_tag)
# Explicit tags that SafeLoader would construct (timestamps, sets, binary, ...): refused as well.
for _name in ("timestamp", "binary", "set", "omap", "pairs"):
    _Loader.add_constructor(f"tag:yaml.org,2002:{_name}", lambda loader, node: _refuse_tag(loader, "", node))


def load(text: str | bytes, what: str):
    """The one YAML document in ``text``; ``ConfigFileError`` naming ``what`` and the line otherwise."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ConfigFileError(f"{what}: not UTF-8 text (byte {err.start})") from None
    try:
        documents = list(yaml.load_all(text, Loader=_Loader))
    except ConfigFileError as err:
        raise ConfigFileError(f"{what}: {err}") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigFileError(f"{what}: not valid YAML: {where}{err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise ConfigFileError(f"{what}: not valid YAML: {type(err).__name__}") from None
    except RecursionError:
        raise ConfigFileError(f"{what}: nested too deeply") from None
    if len(documents) > 1:
        raise ConfigFileError(f"{what}: holds {len(documents)} YAML documents ('---'); a config is one")
    return documents[0] if documents else None
