"""Sparse teacher targets: top-k log-probabilities over the speech (target) vocabulary.

The teacher's distribution at a generated position is kept as its k most likely target tokens
(log-probabilities under the teacher's full softmax at temperature T) plus ``rest``, the log of
all the probability mass outside those k (every other token of the head, speech or not). So
``exp(values).sum() + exp(rest) == 1`` exactly, and a KD loss can account for the tail.
"""

from __future__ import annotations

import torch

from .batch import target_positions  # noqa: F401 - the shift lives in wand.batch; kept importable here

__all__ = ["sparse_teacher_targets", "target_positions"]


@torch.no_grad()
def sparse_teacher_targets(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of ``log_softmax(logits / T)`` restricted to ``target_ids``.

    Args:
        logits: [N, V] teacher logits at N positions (full head vocabulary).
        target_ids: LongTensor[Vt], the head ids that are valid targets (speech codes and stop ids).
        k: how many to keep (<= Vt).
        temperature: softmax temperature (a recorded setting of the shard set).
        chunk: positions per step, so [N, V] float32 work stays bounded for long sequences.

    Returns:
        values [N, k] float32 log-probs (descending), indices [N, k] int64 into ``target_ids``
        (compact target-vocabulary indices), rest [N] float32 = log of the mass outside the k.
    """
    if not 1 <= k <= target_ids.numel():
        raise ValueError(f"k must be in [1, {target_ids.numel()}] (the target vocabulary), got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    target_ids = target_ids.to(logits.device)
    values, indices, rests = [], [], []
    for start in range(0, logits.shape[0], chunk):
        logprobs = torch.log_softmax(logits[start : start + chunk].float() / temperature, dim=-1)
        top_values, top_index = torch.topk(logprobs[:, target_ids], k, dim=-1)
        # The tail is every head entry except the k kept: mask them out and logsumexp the rest.
        masked = logprobs.scatter(-1, target_ids[top_index], float("-inf"))
        values.append(top_values)
        indices.append(top_index)
        rests.append(torch.logsumexp(masked, dim=-1))
    return torch.cat(values), torch.cat(indices), torch.cat(rests)
