"""Enable WAND attention on a transformers decoder without copying model code.

``enable_wand(model, window)`` wraps the instance's ``forward`` so it accepts
``prefix_lengths=`` (and ``tau=`` for the soft curriculum mask). The wrapper turns them into a
4-D mask and passes it as ``attention_mask``: transformers' ``masking_utils`` returns a 4-D mask
unchanged (its documented extension point for custom masks), so the model's own attention code
runs untouched for every backend:

* ``eager`` / ``sdpa``: an additive float mask (hard, or ``-tau`` on out-of-window keys);
* ``flex_attention``: a ``BlockMask`` built from :func:`wand.masks.wand_mask_mod`, and for the
  soft form the ``wand_flex`` attention function registered below (FlexAttention with a
  ``score_mod``), because transformers' own flex path only adds dense score masks.

Positions are always passed explicitly, computed from the 2-D padding mask, so left-padded
batches keep absolute positions (RoPE / learned position embeddings at the true position).
"""

from __future__ import annotations

import copy
import functools
import inspect
import os
import types
from typing import Any

import torch

from .blocks import wand_tile_block_mask
from .cache import WandCache
from .masks import (additive_mask, sparse_tau, validate_prefix_lengths, validate_window, visibility,
                    wand_score_mod)

# Model classes whose attention takes the 4-D mask path (checked by tests). Keys are class names
# so the list can be printed in errors without importing every architecture.
SUPPORTED_MODEL_CLASSES = (
    "Qwen2ForCausalLM",
    "Qwen2Model",
    "LlamaForCausalLM",
    "LlamaModel",
    "GPT2LMHeadModel",
    "GPT2Model",
    "CosyVoice2LM",  # wand.models.cosyvoice2: Qwen2 backbone with CosyVoice's own embeddings/head
    "IndexTTSGPT",  # wand.models.indextts: GPT-2 backbone with IndexTTS's embeddings/head
)
DENSE_ATTENTION = ("eager", "sdpa")
FLEX_ATTENTION = ("flex_attention", "wand_flex")
_UNSET: Any = object()


def _check_supported(model: torch.nn.Module) -> None:
    name = type(model).__name__
    if name not in SUPPORTED_MODEL_CLASSES:
        raise ValueError(
            f"enable_wand: unsupported model class {name}; supported: {', '.join(SUPPORTED_MODEL_CLASSES)} "
            "(WAND model specs in wand.models wrap the TTS-specific ones)"
        )
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in DENSE_ATTENTION + FLEX_ATTENTION:
        raise ValueError(
            f"enable_wand: attn_implementation={impl!r} cannot take a custom mask; load the model with "
            f"attn_implementation one of {DENSE_ATTENTION + ('flex_attention',)}"
        )


def enable_wand(model: torch.nn.Module, window: int | None, backend: str | None = None) -> torch.nn.Module:
    """Make ``model(input_ids=..., prefix_lengths=..., tau=None)`` use the WAND mask.

    Args:
        model: a supported transformers decoder (see ``SUPPORTED_MODEL_CLASSES``).
        window: W, the number of most recent generated tokens each token sees (besides the
            whole prefix). ``None`` keeps full causal attention (useful for a teacher that should
            share the same calling convention).
        backend: ``None`` keeps the model's ``attn_implementation`` (``flex_attention`` is routed to
            ``wand_flex``); ``"flex"`` switches to FlexAttention (the GPU training path; on CPU it
            runs unfused and forward-only); ``"sdpa"`` or ``"eager"`` switch to the dense mask.

    Returns the same model object (patched in place). Calling it again only changes the window.
    Per call, ``window=`` overrides the model's window (the curriculum shrinks it while training),
    and ``model_prefix_lengths=`` tells models that number positions from the prefix (IndexTTS) the
    true prefix when the mask keeps another one (a StreamingLLM-style mask's 4 sink tokens).
    """
    if backend is not None:
        if backend not in ("flex",) + DENSE_ATTENTION:
            raise ValueError(f"backend must be None, 'flex', 'sdpa' or 'eager', got {backend!r}")
        model.set_attn_implementation("wand_flex" if backend == "flex" else backend)
    _check_supported(model)
    model.wand_window = validate_window(window)
    if model.config._attn_implementation == "flex_attention":
        # Our FlexAttention function also takes the soft-mask score_mod (see module docstring).
        model.set_attn_implementation("wand_flex")
    if getattr(model, "_wand_original_forward", None) is not None:
        return model

    original_forward = model.forward
    model._wand_original_forward = original_forward
    parameters = inspect.signature(original_forward).parameters
    accepts_position_ids = "position_ids" in parameters
    # TTS wrappers with segment-relative positions (IndexTTS) also need the prefix lengths.
    accepts_prefix_lengths = "prefix_lengths" in parameters

    # A method bound to the model (not a closure over it), reaching the original forward through
    # ``self``: copy.deepcopy rebinds both to the copy, so a deep-copied student runs its own weights.
    @functools.wraps(original_forward)
    def wand_forward(self, *args, prefix_lengths=None, tau=None, window=_UNSET, model_prefix_lengths=None, **kwargs):
        if args:
            raise ValueError("a WAND-enabled model takes keyword arguments only (input_ids=..., prefix_lengths=...)")
        window = self.wand_window if window is _UNSET else validate_window(window)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if isinstance(cache, WandCache):
            if prefix_lengths is None:
                prefix_lengths = cache.prefix_lengths
            if tau is not None:
                raise ValueError(
                    "tau (the soft curriculum mask) is a training-time form; a WandCache keeps only the "
                    "window, so decode with the hard mask (tau=None)"
                )
            if window != cache.window:
                raise ValueError(f"window={window} differs from the WandCache's window={cache.window}")
        if prefix_lengths is None:
            raise ValueError(
                "a WAND-enabled model needs prefix_lengths= (LongTensor[batch], length of each sample's "
                "conditioning prefix), or a WandCache as past_key_values"
            )
        mask, position_ids, prefix_lengths = build_wand_inputs(self, kwargs, cache, prefix_lengths, window, tau)
        kwargs["attention_mask"] = mask
        if accepts_position_ids and kwargs.get("position_ids") is None:
            kwargs["position_ids"] = position_ids
        if accepts_prefix_lengths:
            # The model's own prefix (IndexTTS numbers text and mel positions from it) is the mask's
            # unless told otherwise: a StreamingLLM-style mask keeps 4 sinks, not the prefix.
            own = prefix_lengths if model_prefix_lengths is None else model_prefix_lengths
            kwargs["prefix_lengths"] = torch.as_tensor(own, device=position_ids.device)
        return self._wand_original_forward(**kwargs)

    model.forward = types.MethodType(wand_forward, model)
    return model


def is_enabled(model: torch.nn.Module) -> bool:
    """Whether :func:`enable_wand` has patched ``model``."""
    return getattr(model, "_wand_original_forward", None) is not None


def original_forward(model: torch.nn.Module):
    """The model's own forward (before :func:`enable_wand`), or its forward if it is not patched."""
    return getattr(model, "_wand_original_forward", model.forward)


def disable_wand(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`enable_wand` (restores the original forward)."""
    original = getattr(model, "_wand_original_forward", None)
    if original is not None:
        model.forward = original
        del model._wand_original_forward
        del model.wand_window
    return model


def _input_shape(kwargs: dict) -> tuple[int, int, torch.device]:
    if kwargs.get("input_ids") is not None:
        ids = kwargs["input_ids"]
        return ids.shape[0], ids.shape[1], ids.device
    if kwargs.get("inputs_embeds") is not None:
        emb = kwargs["inputs_embeds"]
        return emb.shape[0], emb.shape[1], emb.device
    raise ValueError("pass input_ids or inputs_embeds")


def positions_from_padding(valid: torch.Tensor, start: torch.Tensor | int = 0) -> torch.Tensor:
    """Absolute positions of tokens given a [B, T] validity mask (left or right padding).

    Padding gets the position of its neighbour (clamped at 0); it is masked out as a key anyway.
    """
    positions = torch.cumsum(valid.long(), dim=-1) - 1
    if isinstance(start, torch.Tensor):
        positions = positions + start.view(-1, 1)
    else:
        positions = positions + start
    return positions.clamp(min=0)


def build_wand_inputs(
    model: torch.nn.Module,
    kwargs: dict,
    cache: Any,
    prefix_lengths: torch.Tensor | list[int],
    window: int | None,
    tau: float | torch.Tensor | None,
):
    """Return (attention_mask for the model, query position_ids [B, T], prefix_lengths on the device).

    With a WandCache, a decode step reads nothing back from the device: the cache checked its
    prefix lengths once and holds them on the device, and plans the step with host integers."""
    batch, length, device = _input_shape(kwargs)
    padding = kwargs.get("attention_mask")
    if padding is not None and padding.dim() != 2:
        raise ValueError(
            "a WAND-enabled model builds its own 4-D mask; pass the usual 2-D attention_mask (1 = token, 0 = padding)"
        )

    if isinstance(cache, WandCache):
        q_valid = torch.ones(batch, length, dtype=torch.bool, device=device)
        if padding is not None:
            q_valid = padding[:, -length:].bool().to(device)
        query_positions, key_positions, key_valid = cache.plan(q_valid, prefix_lengths)
        prefix_lengths = cache.prefix_lengths
    else:
        prefix_lengths = validate_prefix_lengths(prefix_lengths, batch_size=batch).to(device)
        past = cache.get_seq_length() if cache is not None else 0
        if padding is not None:
            if padding.shape[1] != past + length:
                raise ValueError(
                    f"attention_mask has {padding.shape[1]} columns; expected cached {past} + new {length}"
                )
            key_valid = padding.bool().to(device)
        else:
            key_valid = torch.ones(batch, past + length, dtype=torch.bool, device=device)
        key_positions = positions_from_padding(key_valid)
        query_positions = key_positions[:, past:]
        if past == 0:
            validate_prefix_lengths(prefix_lengths, key_valid.sum(-1))

    impl = model.config._attn_implementation
    if impl in FLEX_ATTENTION:
        mask = _flex_mask(model, cache, prefix_lengths, length, window, tau, key_valid, device)
    else:
        visible, outside = visibility(query_positions, key_positions, prefix_lengths, window, key_valid)
        mask = additive_mask(visible, outside, _model_dtype(model), tau)
    return mask, query_positions, prefix_lengths


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _flex_mask(model, cache, prefix_lengths, length, window, tau, key_valid, device):
    """BlockMask for a training forward (no cache) on the FlexAttention backend."""
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError("the FlexAttention path is for training forwards; decode with sdpa/eager and a WandCache")
    if not bool(key_valid.all()):
        # Right padding needs no key mask (padding comes after every real token), left padding does.
        if bool((key_valid[:, :-1] < key_valid[:, 1:]).any()):
            raise ValueError("FlexAttention training batches must be right-padded")
    tau = sparse_tau(tau)  # from HARD_TAU on the soft form is the hard mask: its blocks are skipped
    hard_window = window if tau is None else None
    # The mask covers the length rounded up to a whole block (the attention pads q/k/v to it): a
    # compiled kernel then sees one shape per bucket, not one per batch length. Built from tiles and
    # cached (wand.blocks); a shallow copy carries this forward's attributes, never the cached one.
    block_mask = copy.copy(wand_tile_block_mask(prefix_lengths, hard_window, flex_bucket(length), device))
    # GPT-2's forward reads attention_mask.ndim before masking_utils sees it; a BlockMask has
    # .shape but no .ndim, so give it one (4, as its shape says).
    if not hasattr(block_mask, "ndim"):
        block_mask.ndim = len(block_mask.shape)
    if tau is not None:
        block_mask.wand_score_mod = wand_score_mod(prefix_lengths, window, tau)
    return block_mask


def wand_flex_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """FlexAttention with the soft WAND score_mod attached to the BlockMask (see ``_flex_mask``)."""
    from torch.nn.attention.flex_attention import flex_attention

    score_mod = getattr(attention_mask, "wand_score_mod", None)
    length = query.shape[2]
    padded = attention_mask.seq_lengths[0]
    if padded != length:  # to the mask's bucket; the padded keys come after every real query (causal)
        query, key, value = (torch.nn.functional.pad(t, (0, 0, 0, padded - length)) for t in (query, key, value))
    groups = query.shape[1] // key.shape[1]
    if groups > 1 and flex_gqa() == "repeat":  # each query head its own K/V copy (see flex_gqa)
        key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    args = dict(score_mod=score_mod, block_mask=attention_mask, scale=scaling,
                enable_gqa=key.shape[1] != query.shape[1])  # grouped-query KV heads, not expanded
    if _compile_flex(query.device):
        out = _fused_flex(query, key, value, args)
    else:
        out = flex_attention(query, key, value, **args)
    return out[:, :, :length].transpose(1, 2).contiguous(), None


FLEX_GQA_MODES = ("native", "repeat")


def flex_gqa() -> str:
    """How FlexAttention takes grouped-query K/V heads (WAND_FLEX_GQA): ``native`` (default) passes
    them as they are (``enable_gqa``); ``repeat`` repeats each K/V head for its query heads first.
    Why the choice: in Flex's backward one program per K/V block loops over every query block that
    sees it, times the query heads of its group, and the prefix blocks are seen by every query, so
    at 8K their programs run ~7 x 64 iterations in series (Qwen2.5-0.5B: 14 heads on 2 K/V heads)
    where a window block runs a few; repeated K/V splits that work over 7x more programs, at the cost
    of the copies and their gradients' sum. The same output either way (tested); which is faster is
    for a GPU to say (``benchmarks/train_step.py --gqa``)."""
    setting = os.environ.get("WAND_FLEX_GQA", "native")
    if setting not in FLEX_GQA_MODES:
        raise ValueError(f"WAND_FLEX_GQA must be one of {', '.join(FLEX_GQA_MODES)}, got {setting!r}")
    return setting


def flex_recompile_limit() -> int:
    """How many compiled FlexAttention variants a process may hold: one per (length bucket, batch
    size, hard or soft mask). WAND_FLEX_RECOMPILE_LIMIT, default 64; never below torch's own limit."""
    import torch._dynamo.config as dynamo_config

    setting = os.environ.get("WAND_FLEX_RECOMPILE_LIMIT", "64")
    if not setting.isdigit() or int(setting) < 1:
        raise ValueError(f"WAND_FLEX_RECOMPILE_LIMIT must be an int >= 1, got {setting!r}")
    return max(int(setting), dynamo_config.recompile_limit)


def _fused_flex(query, key, value, args: dict) -> torch.Tensor:
    """Compiled FlexAttention that stays fused or fails loudly. Past torch's recompile limit (8 by
    default) dynamo would run each new (bucket, batch, hard/soft) variant eagerly, unfused, building
    the whole score matrix with no warning: here the limit is raised to ``flex_recompile_limit()``
    and hitting it is an error that names the setting."""
    import torch._dynamo.config as dynamo_config
    from torch._dynamo.exc import FailOnRecompileLimitHit

    limit = flex_recompile_limit()
    try:
        with dynamo_config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True):
            return _compiled_flex_attention()(query, key, value, **args)
    except FailOnRecompileLimitHit as err:
        raise RuntimeError(
            f"compiled FlexAttention reached its recompile limit ({limit} variants: one per length bucket, "
            "batch size and hard/soft mask); rather than run unfused (the full score matrix), this stops. "
            "Raise WAND_FLEX_RECOMPILE_LIMIT, or use fewer batch sizes / length buckets") from err


FLEX_BLOCK = 128  # FlexAttention's block size: sequence lengths are padded to a multiple of it


def flex_bucket(length: int) -> int:
    """The padded length FlexAttention runs at: one compiled kernel per bucket of 128 positions."""
    return -(-length // FLEX_BLOCK) * FLEX_BLOCK


def _compile_flex(device: torch.device) -> bool:
    """Compiled FlexAttention on CUDA (the fused kernel); eager elsewhere, unless WAND_FLEX_COMPILE=1
    (CPU tests of the compiled path) or 0 (debugging)."""
    setting = os.environ.get("WAND_FLEX_COMPILE", "auto")
    if setting not in ("auto", "0", "1"):
        raise ValueError(f"WAND_FLEX_COMPILE must be auto, 0 or 1, got {setting!r}")
    return setting == "1" or (setting == "auto" and device.type == "cuda")


@functools.lru_cache(maxsize=1)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # Static shapes: lengths are bucketed (flex_bucket) and W / tau reach the mods as tensors, so
    # this compiles once per (bucket, batch size) for a whole curriculum.
    return torch.compile(flex_attention, dynamic=False)


def _register_flex() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register("wand_flex", wand_flex_attention_forward)


_register_flex()
