"""Where a full-attention model puts its attention: the prefix, the last W generated tokens, the rest.

The window chooser: before training, measure on the teacher and the user's data how much of each
generated query's attention mass falls on the conditioning prefix and on the last W generated
tokens, for several W. ``1 - prefix - window`` is the mass WAND takes away at that W.

The probe is an attention function registered with transformers' ``AttentionInterface`` as
``wand_probe``: eager attention that also reports the probabilities, so it works for every
backbone (and the TTS wrappers around them) without touching model code.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = ["AttentionMass", "attention_mass", "record_attention", "mass_shares", "layer_shares"]

_RECORDS: list[list[torch.Tensor]] = []


def probe_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention ([B, H, T, D] inputs) that appends its probabilities to the active recording."""
    if key.shape[1] != query.shape[1]:  # grouped-query attention: expand KV heads
        groups = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if scaling is None:  # GPT-2 passes no scaling: 1/sqrt(d) unless its config turns scaling off
        scale_on = getattr(getattr(module, "config", None), "scale_attn_weights", True)
        scaling = query.shape[-1] ** -0.5 if scale_on else 1.0
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask[..., : key.shape[-2]], float("-inf"))
        else:
            scores = scores + attention_mask[..., : key.shape[-2]].float()
    probs = torch.softmax(scores, dim=-1)
    if _RECORDS:
        _RECORDS[-1].append(probs.detach())
    out = torch.matmul(probs.to(value.dtype), value)
    return out.transpose(1, 2).contiguous(), probs


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register("wand_probe", probe_attention_forward)


_register()


def _configs(model: torch.nn.Module):
    return [m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")]


@contextmanager
def record_attention(model: torch.nn.Module):
    """Inside the block, every forward of ``model`` records one [B, H, T, S] tensor per layer."""
    configs = _configs(model)
    saved = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation = "wand_probe"
    _RECORDS.append([])
    try:
        yield _RECORDS[-1]
    finally:
        _RECORDS.pop()
        for c, impl in zip(configs, saved):
            c._attn_implementation = impl


@dataclass(frozen=True)
class AttentionMass:
    window: int
    prefix: float  # mean share of attention mass on the prefix
    window_share: float  # on the last W generated tokens (the query itself included)
    queries: int  # generated query positions averaged over (those farther than W from the prefix)
    layers: tuple[float, ...] = ()  # kept share (prefix + window) per layer, first layer first

    @property
    def kept(self) -> float:
        return self.prefix + self.window_share

    @property
    def dropped(self) -> float:
        return 1.0 - self.kept


def mass_shares(probs: torch.Tensor, prefix_length: int, length: int, window: int) -> tuple[float, float, int]:
    """Sums of (prefix share, window share) over layers x heads x queries, and the query count.

    ``probs``: [L, H, T, T] probabilities of one unpadded sequence of ``length`` tokens. Queries are
    the positions q >= prefix_length + window (the window then truncates the generated history)."""
    prefix, window_share, count = layer_shares(probs, prefix_length, length, window)
    return float(prefix.sum()), float(window_share.sum()), count * probs.shape[0]


def layer_shares(probs: torch.Tensor, prefix_length: int, length: int,
                 window: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per layer: sums of the prefix share and of the window share over heads x queries ([L] each),
    and the count of (head, query) pairs per layer. Same queries as :func:`mass_shares`."""
    first = prefix_length + window
    layers = probs.shape[0]
    if first >= length:
        return torch.zeros(layers), torch.zeros(layers), 0
    rows = probs[:, :, first:length, :length]  # [L, H, Q, T]
    prefix = rows[..., :prefix_length].sum(-1)
    q = torch.arange(first, length, device=probs.device)
    keys = torch.arange(length, device=probs.device)
    in_window = (keys[None, :] > q[:, None] - window) & (keys[None, :] <= q[:, None])
    window_share = (rows * in_window).sum(-1)
    return prefix.sum((1, 2)).double().cpu(), window_share.sum((1, 2)).double().cpu(), rows.shape[1] * rows.shape[2]


@torch.no_grad()
def attention_mass(model: torch.nn.Module, sequences: list[dict], windows: list[int]) -> list[AttentionMass]:
    """Mean attention shares over ``sequences`` (each a dict with ``input_ids`` [1, T] of one unpadded
    sequence, its ``prefix_length`` and any extra forward kwargs), for each W in ``windows``.

    The model runs with full attention through the WAND wrapper (``window=None``): the wrapper
    passes an explicit causal mask, which the probe needs (it has no mask function of its own).
    """
    from .patch import enable_wand, is_enabled

    if not is_enabled(model):
        enable_wand(model, max(windows))
    totals = {w: [0.0, 0.0, 0] for w in windows}  # per W: [L] prefix sums, [L] window sums, pairs per layer
    for sequence in sequences:
        kwargs = dict(sequence)
        prefix_length = int(kwargs.pop("prefix_length"))
        length = int(kwargs["input_ids"].shape[1])
        kwargs.update(prefix_lengths=torch.tensor([prefix_length], device=kwargs["input_ids"].device), window=None)
        with record_attention(model) as layers:
            model(**kwargs)
        probs = torch.cat([p[:1] for p in layers])  # [L, H, T, T]
        for w in windows:
            prefix, window_share, count = layer_shares(probs, prefix_length, length, w)
            totals[w][0] = totals[w][0] + prefix
            totals[w][1] = totals[w][1] + window_share
            totals[w][2] += count
    out = []
    for w, (prefix, window_share, count) in totals.items():
        if not count:
            out.append(AttentionMass(w, float("nan"), float("nan"), 0))
            continue
        layers_kept = tuple(float(x) for x in (prefix + window_share) / count)
        out.append(AttentionMass(w, float(prefix.sum()) / (count * len(prefix)),
                                 float(window_share.sum()) / (count * len(prefix)), count * len(prefix), layers_kept))
    return out
