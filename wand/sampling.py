"""Picking the next token from logits, without a host-device synchronisation.

``torch.multinomial`` checks its probabilities on the host (``(probs >= 0).all()`` read back) before
drawing, so it cannot run inside a CUDA graph and stalls an eager step once per token. Its draw for
one sample is ``argmax(probs / q)`` with ``q ~ Exp(1)`` (the exponential race): this module draws the
same way itself, from the same generator, so it takes the same tokens as ``torch.multinomial`` (checked
bit for bit on CPU in tests/method/test_sampling.py) and every op stays on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Sampling", "sample_next_token"]


@dataclass(frozen=True)
class Sampling:
    """How a token is picked: argmax (``do_sample=False``) or a draw with temperature / top-k / top-p.

    ``generator``: the draws' random stream (default: the device's default generator). A CUDA-graph
    step (``wand.static.StaticDecoder``) registers it with the graph, so each replay draws afresh."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None

    def __post_init__(self):
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when do_sample=True, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: no top-k), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return sample_next_token(logits, self.do_sample, self.temperature, self.top_k, self.top_p, self.generator)


def sample_next_token(
    logits: torch.Tensor,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row of ``logits`` [B, V]: argmax, or sampling with temperature/top-k/top-p."""
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when do_sample=True, got {temperature}")
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, -1) > top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, -1)
    # torch.multinomial(probs, 1)'s own draw, minus its host-side check of probs.
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / race).argmax(-1)
