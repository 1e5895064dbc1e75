"""WAND-ready model specs of the target AR-TTS models.

    from wand.models import get_spec
    spec = get_spec("cosyvoice2", size="tiny")     # or size="real" (published architecture)
    model = spec.build()                           # random weights, no download
    model = spec.load("/path/to/CosyVoice2-0.5B")  # released weights: folder, s3://..., or HF id
"""

from __future__ import annotations

import functools
import importlib

from .causal_lm import CausalLMSpec
from .cosyvoice2 import CosyVoice2Spec
from .indextts import IndexTTSSpec
from .presets import BUILDERS, shrink, widen
from .sparktts import SparkTTSSpec
from .spec import ModelSpec
from .weights import WeightsNotFound

__all__ = [
    "MODEL_NAMES", "get_spec", "spec_for", "kv_bytes_per_token", "ModelSpec", "CausalLMSpec", "CosyVoice2Spec",
    "CosyVoice2LM", "IndexTTSSpec", "IndexTTSGPT", "SparkTTSSpec", "WeightsNotFound",
]

MODEL_NAMES = tuple(BUILDERS)
# The torch modules of the families with their own (not a transformers class), loaded on first use.
_MODULES = {"CosyVoice2LM": "cosyvoice2_lm", "IndexTTSGPT": "indextts_gpt"}


def __getattr__(name: str):
    if name in _MODULES:
        return getattr(importlib.import_module(f".{_MODULES[name]}", __name__), name)
    raise AttributeError(f"module 'wand.models' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


SIZES = ("real", "small", "mini", "tiny")


def get_spec(name: str, size: str = "real") -> ModelSpec:
    """The spec of a target model: one of MODEL_NAMES, at size "real", "small", "mini" or "tiny".

    real: the published architecture. small: the real vocabularies and token layout on a small
    backbone (4 layers, 256 wide), for CPU benchmarks of the pipeline. tiny: small vocabularies
    with the same layout shape, for tests. mini: tiny's vocabularies on a 3-layer, 96-wide
    backbone, the size of the embedded default's trained teachers (teachers/)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(MODEL_NAMES)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} for {name}; known: {', '.join(SIZES)}")
    if size == "small":
        return shrink(BUILDERS[name]("real"))
    if size == "mini":
        return widen(BUILDERS[name]("tiny"))
    return BUILDERS[name](size)


@functools.lru_cache(maxsize=16)
def spec_for(name: str, size: str = "real", source: str | None = None) -> ModelSpec:
    """``get_spec(name, size)``, with the token ids that only the checkpoint's tokenizer knows read
    from it (SparkTTS at real size: its special tokens and BiCodec codes live in ``LLM/tokenizer.json``).
    ``source``: the released checkpoint (a local folder or s3://; ``weights.s3_endpoint`` applies)."""
    spec = get_spec(name, size)
    if spec.speech_range[0] >= 0:
        return spec
    if source is None:
        raise ValueError(f"{name} ({size}): its token ids come from the checkpoint's tokenizer; give the "
                         "checkpoint (teacher_source: a folder with LLM/tokenizer.json, or s3://)")
    from transformers import AutoTokenizer

    from .weights import resolve_source

    path = resolve_source(source, name, spec.source)
    folder = path / "LLM" if (path / "LLM").is_dir() else path
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as err:
        raise ValueError(f"{name}: no usable tokenizer under {folder} ({err}); teacher_source must be the "
                         "released checkpoint folder (it holds LLM/tokenizer.json)") from None
    return spec.with_tokenizer(tokenizer)


def kv_bytes_per_token(spec: ModelSpec, dtype=None) -> int:
    """2 x layers x kv_heads x head_dim x bytes per element (bf16 by default)."""
    import torch

    return spec.kv_bytes_per_token(dtype or torch.bfloat16)
