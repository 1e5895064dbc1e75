"""KV-cache arithmetic: bytes per token and the analytic full-vs-WAND cache sizes.

KV bytes per token = 2 (K and V) x layers x kv_heads x head_dim x bytes per element.
Full attention caches P + G tokens after G generated; WAND caches P + min(G, W).
So the reduction 1 - (P + W) / (P + G) depends on the prefix against the generated length,
not on model size (../shared/WAND.md section 5).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["kv_bytes_per_token", "cache_bytes", "reduction", "attention_flops_per_token"]


def _first(config, *names):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    raise ValueError(f"{type(config).__name__} has none of {names}; cannot size its KV cache")


def _shape(config) -> tuple[int, int, int, int]:
    """(layers, query heads, KV heads, head dim) of a transformers decoder config."""
    layers = _first(config, "num_hidden_layers", "n_layer")
    heads = _first(config, "num_attention_heads", "n_head")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or _first(config, "hidden_size", "n_embd") // heads
    return layers, heads, kv_heads, head_dim


def kv_bytes_per_token(config, dtype: torch.dtype | None = None) -> int:
    """Bytes one token adds to a full-attention KV cache for a transformers decoder config, at
    ``dtype`` (default bf16)."""
    import torch

    layers, _, kv_heads, head_dim = _shape(config)
    element = torch.empty((), dtype=dtype or torch.bfloat16).element_size()
    return 2 * layers * kv_heads * head_dim * element


def cache_bytes(per_token: int, prefix_length: int, generated: int, window: int | None) -> int:
    """Analytic cache bytes after ``generated`` tokens (``window=None``: full attention)."""
    kept = generated if window is None else min(generated, window)
    return per_token * (prefix_length + kept)


def reduction(prefix_length: int, generated: int, window: int) -> float:
    """Fraction of the full-attention KV cache that WAND saves after ``generated`` tokens."""
    return 1.0 - cache_bytes(1, prefix_length, generated, window) / cache_bytes(1, prefix_length, generated, None)


def attention_flops_per_token(config, prefix_length: int, generated: int, window: int | None) -> float:
    """Mean attention FLOPs per generated token over an utterance of ``generated`` tokens (theoretical).

    Only the score and value products, which grow with the context: per layer, per query head and
    per visible key, q.k and p.v each take 2 x head_dim FLOPs. Generated token g (1-based) sees
    P + g keys with full attention and P + min(g, W) with WAND; the projections and MLP cost the
    same in both and are left out, so the ratio is an upper bound on the per-step speed-up.
    """
    if generated < 1:
        raise ValueError(f"generated must be >= 1, got {generated}")
    layers, heads, _, head_dim = _shape(config)
    per_key = 4 * layers * heads * head_dim
    if window is None or window >= generated:
        keys = generated * prefix_length + generated * (generated + 1) // 2
    else:
        keys = generated * prefix_length + window * (window + 1) // 2 + (generated - window) * window
    return per_key * keys / generated
