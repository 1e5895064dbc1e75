"""Batched autoregressive generation with a WandCache (or full attention for comparison)."""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import DynamicCache

from .cache import WandCache
from .masks import validate_prefix_lengths, validate_window
from .patch import enable_wand, is_enabled, original_forward
from .sampling import Sampling, sample_next_token
from .static import STATIC_MODES, StaticDecoder

__all__ = ["generate", "cache_kwarg_name", "sample_next_token"]


def cache_kwarg_name(model: torch.nn.Module) -> str:
    """transformers 5.x renames ``past_key_values`` to ``cache``; use whichever forward takes."""
    forward = original_forward(model)
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    prefix_lengths: torch.Tensor | list[int],
    window: int | None,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    return_cache: bool = False,
    prefill_kwargs: dict | None = None,
    compile: bool | str = False,
):
    """Generate ``max_new_tokens`` tokens per sample with a constant-size WandCache.

    Args:
        model: a supported decoder; patched with ``enable_wand(model, window)`` if it is not yet.
        input_ids: LongTensor[B, T], the prompts. Batches of different lengths must be
            left-padded, with ``attention_mask`` marking real tokens.
        prefix_lengths: LongTensor[B], conditioning prefix length per sample (<= its real length).
        window: W; ``None`` runs full attention with transformers' DynamicCache (the baseline).
        eos_token_id: stop id(s); finished samples are padded with ``pad_token_id``
            (default: the first eos id).
        prefill_kwargs: extra keyword arguments for the first forward only (the prompt), e.g.
            IndexTTS's ``conditioning_latents``.
        compile: the static decode path (``wand.static.StaticDecoder``): after an eager prefill,
            every step has one shape and no host-device synchronisation. ``True`` captures the
            step as a CUDA graph on CUDA and compiles it with ``torch.compile`` elsewhere; or name
            the mode (``"graph"``, ``"compile-graph"``, ``"compile"``, ``"eager"``). WAND only
            (``window`` set), dense attention. Same tokens as the default path.

    Returns:
        LongTensor[B, T + n]: prompt and generated tokens, as ``model.generate`` returns them
        (n <= max_new_tokens; fewer when every sample stopped). With ``return_cache=True``, a tuple
        (tokens, cache).
    """
    window = validate_window(window)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    batch, length = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
    if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
        raise ValueError("attention_mask must be left-padded for generation (padding first, then tokens)")
    prefix_lengths = validate_prefix_lengths(prefix_lengths, attention_mask.sum(-1), batch_size=batch)
    sample = Sampling(do_sample, temperature, top_k, top_p, generator)  # checked before anything is changed

    if not is_enabled(model):
        enable_wand(model, window)
    eos_ids = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else 0
    eos = torch.tensor(eos_ids, dtype=torch.long, device=input_ids.device)

    mode = _static_mode(compile, window, input_ids.device, model)
    cache = WandCache(prefix_lengths, window) if window is not None else DynamicCache()
    if mode is not None and max_new_tokens > 0:
        tokens = _generate_static(model, input_ids, attention_mask, prefix_lengths, window, max_new_tokens, cache,
                                  mode, sample, eos_ids, eos, pad_token_id, prefill_kwargs,
                                  # a returned cache must hold exactly the eager path's steps: no step past the stop
                                  check_every=1 if return_cache else STOP_CHECK_EVERY)
        return (tokens, cache) if return_cache else tokens
    cache_kw = cache_kwarg_name(model)
    tokens = input_ids
    mask = attention_mask
    step_input = input_ids
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    extra = dict(prefill_kwargs or {})
    for _ in range(max_new_tokens):
        out = model(
            input_ids=step_input,
            attention_mask=mask,
            prefix_lengths=prefix_lengths,
            window=window,
            use_cache=True,
            **{cache_kw: cache},
            **extra,
        )
        extra = {}
        next_token = sample(out.logits[:, -1])
        next_token = torch.where(finished, torch.full_like(next_token, pad_token_id), next_token)
        tokens = torch.cat([tokens, next_token[:, None]], dim=-1)
        if eos_ids:  # the one read-back per step, and only when there is a stop id to look for
            finished |= torch.isin(next_token, eos)
            if bool(finished.all()):
                break
        mask = torch.cat([mask, torch.ones_like(next_token[:, None])], dim=-1)
        step_input = next_token[:, None]
    return (tokens, cache) if return_cache else tokens


def _static_mode(compile: bool | str, window: int | None, device: torch.device, model) -> str | None:
    """The static path's mode, or a ValueError before the prefill takes any memory."""
    if compile is False:
        return None
    if window is None:
        raise ValueError("compile= is the static WAND decode path; full attention (window=None) decodes eagerly")
    impl = model.config._attn_implementation
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"compile=: the static decode step needs dense attention (sdpa or eager), the model has "
                         f"{impl!r}; decode with model.set_attn_implementation('sdpa')")
    if compile is True:
        return "graph" if device.type == "cuda" else "compile"
    if compile not in STATIC_MODES:
        raise ValueError(f"compile must be True, False or one of {', '.join(STATIC_MODES)}, got {compile!r}")
    return compile


# Steps between the checks for "every sample stopped" (each check waits for the device once).
STOP_CHECK_EVERY = 32


def _generate_static(model, input_ids, attention_mask, prefix_lengths, window, max_new_tokens, cache, mode,
                     sample, eos_ids, eos, pad_token_id, prefill_kwargs, check_every: int = STOP_CHECK_EVERY):
    """Eager prefill, then static steps that pick their tokens themselves (inside the CUDA graph), each
    continuing from the last. Tokens equal the default path's: the columns after the one that finished
    the last sample are found on the device and cut off at the end. The cache's bookkeeping is written
    back at the end (``StaticDecoder.sync_cache``)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, prefix_lengths=prefix_lengths, window=window,
                use_cache=True, **{cache_kwarg_name(model): cache}, **dict(prefill_kwargs or {}))
    decoder = StaticDecoder(model, cache, mode, sampling=sample, stop_ids=eos, pad_token_id=pad_token_id)
    columns = [decoder.pick(out.logits[:, -1]).clone()]  # the prompt's next token, picked eagerly
    for step in range(1, max_new_tokens):
        if eos_ids and step % check_every == 0 and bool(decoder.finished.all()):
            break
        columns.append(decoder.step().clone())  # the step's token buffer is written again by the next step
    decoder.sync_cache()
    generated = torch.stack(columns, -1)
    if eos_ids:
        generated = generated[:, :stopped_columns(generated, eos)]
    return torch.cat([input_ids, generated], -1)


def stopped_columns(generated: torch.Tensor, eos: torch.Tensor) -> int:
    """Columns of ``generated`` [B, n] up to the one where the last sample met a stop id (n if some
    sample never did): what the default path returns, which stops there."""
    done = torch.isin(generated, eos).cummax(-1).values.all(0)  # [n]: every sample has stopped by then
    first = torch.where(done, torch.arange(done.numel(), device=done.device), done.numel()).min()
    return min(int(first) + 1, generated.shape[1])
