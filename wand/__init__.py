"""WAND: windowed attention + knowledge distillation for autoregressive TTS (plain torch + transformers).

This package never imports ray or mlflow: it is the method; ``pipeline/`` runs it at scale.
Its names load on first use: ``import wand.models`` alone (a spec's token layout and limits, what
a corpus builder's data workers need) imports neither torch nor transformers.
"""

from __future__ import annotations

import importlib

__all__ = ["WandCache", "disable_wand", "enable_wand", "fuse_norms", "fuse_projections", "generate", "is_enabled", "wand_mask"]
__version__ = "0.1.0"

_HOME = {"WandCache": "cache", "generate": "generation", "wand_mask": "masks", "disable_wand": "patch",
         "enable_wand": "patch", "is_enabled": "patch", "fuse_projections": "fuse",
         "fuse_norms": "fuse"}


def __getattr__(name: str):
    if name in _HOME:
        value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
        globals()[name] = value  # once: later lookups do not come back here
        return value
    raise AttributeError(f"module 'wand' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
