"""WAND's training loss: CE on ground-truth speech tokens + lambda x KD against a sparse top-k teacher.

Only generated (non-prefix) positions contribute. The teacher is stored as its top-k
log-probabilities plus ``rest`` = log of its mass outside those k (``wand.topk``).

**Treatment of the mass outside the teacher's top-k.** Both distributions are compared on k + 1
bins: the teacher's k tokens, and one "rest" bin holding everything else. The student's rest bin
is its exact probability of all other tokens (a logsumexp over them), not a renormalisation. So
the divergence is computed between the two *coarse-grained* distributions: it is exact when
k covers the vocabulary, zero when student = teacher, and otherwise a lower bound of the full
divergence (coarse-graining never increases an f-divergence). The student is pulled to put the
teacher's mass on the teacher's top-k and the teacher's tail mass (not less, not more) elsewhere.

Divergences (p = teacher, q = student, both over the k + 1 bins, at temperature T):
``fkl`` KL(p||q); ``rkl`` KL(q||p); ``skew_fkl`` KL(p || a p + (1-a) q) and ``skew_rkl``
KL(q || a q + (1-a) p) (DistiLLM, Ko et al. 2024; a = ``skew_alpha``, 0.1 there, the paper's
choice); ``jsd`` 0.5 KL(p||m) + 0.5 KL(q||m), m = (p+q)/2. The KD term is multiplied by T^2
(Hinton) so its gradient scale does not shrink with T.

**Chunking.** The head is applied to ``chunk_size`` positions at a time under activation
checkpointing, so the (positions x vocab) logits are never all alive at once, in the forward or
the backward pass: peak extra memory is one chunk of logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["KD_KINDS", "LossOutput", "divergence", "wand_loss"]

KD_KINDS = ("fkl", "rkl", "skew_fkl", "skew_rkl", "jsd")


@dataclass
class LossOutput:
    loss: torch.Tensor  # ce + kd_weight * kd, averaged over positions
    ce: torch.Tensor
    kd: torch.Tensor
    positions: int


_LOG_FLOOR = -1e4  # exp() of it is 0 in float32: an empty bin contributes 0, never 0 * inf = NaN


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) over the last dim from log-probabilities; empty bins of a contribute 0."""
    log_a, log_b = log_a.clamp(min=_LOG_FLOOR), log_b.clamp(min=_LOG_FLOOR)
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w a + (1 - w) b), stably."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def divergence(log_p: torch.Tensor, log_q: torch.Tensor, kind: str, skew_alpha: float = 0.1) -> torch.Tensor:
    """Per-position divergence between teacher log_p and student log_q (same bins, last dim)."""
    if kind == "fkl":
        return _kl(log_p, log_q)
    if kind == "rkl":
        return _kl(log_q, log_p)
    if kind == "skew_fkl":
        return _kl(log_p, _log_mix(log_p, log_q, skew_alpha))
    if kind == "skew_rkl":
        return _kl(log_q, _log_mix(log_q, log_p, skew_alpha))
    if kind == "jsd":
        log_m = _log_mix(log_p, log_q, 0.5)
        return 0.5 * _kl(log_p, log_m) + 0.5 * _kl(log_q, log_m)
    raise ValueError(f"unknown KD kind {kind!r}; known: {', '.join(KD_KINDS)}")


def _chunk_loss(hidden, targets, teacher_values, teacher_ids, teacher_rest, head, kind, temperature, skew_alpha):
    logits = head(hidden).float()
    ce = F.cross_entropy(logits, targets, reduction="sum")
    if teacher_values is None:  # CE only
        return ce, ce.new_zeros(())
    log_q_full = torch.log_softmax(logits / temperature, dim=-1)
    log_q_top = log_q_full.gather(-1, teacher_ids)
    log_q_rest = torch.logsumexp(log_q_full.scatter(-1, teacher_ids, float("-inf")), dim=-1)
    log_q = torch.cat([log_q_top, log_q_rest[:, None]], dim=-1)
    log_p = torch.cat([teacher_values.float(), teacher_rest.float()[:, None]], dim=-1)
    kd = divergence(log_p, log_q, kind, skew_alpha).sum()
    return ce, kd


def wand_loss(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    targets: torch.Tensor,
    teacher_values: torch.Tensor | None,
    teacher_ids: torch.Tensor | None,
    teacher_rest: torch.Tensor | None,
    kind: str = "skew_fkl",
    kd_weight: float = 1.0,
    temperature: float = 1.0,
    skew_alpha: float = 0.1,
    chunk_size: int = 1024,
) -> LossOutput:
    """CE + kd_weight x KD over N generated positions.

    Args:
        hidden: [N, D] the student's final hidden states at the positions that predict the targets.
        head: maps [n, D] hidden states to [n, V] logits (the model's output head).
        targets: [N] ground-truth head ids.
        teacher_values / teacher_rest: [N, k] / [N] teacher log-probs (top-k and outside mass).
        teacher_ids: [N, k] head ids of the teacher's top-k.
        The three teacher tensors may all be None: CE only (kd is 0).
    """
    if kind not in KD_KINDS:
        raise ValueError(f"unknown KD kind {kind!r}; known: {', '.join(KD_KINDS)}")
    if not 0.0 < skew_alpha < 1.0:
        raise ValueError(f"skew_alpha must be in (0, 1), got {skew_alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = hidden.shape[0]
    if n == 0:
        zero = hidden.sum() * 0.0
        return LossOutput(zero, zero, zero, 0)
    ce_total = hidden.new_zeros((), dtype=torch.float32)
    kd_total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_size):
        part = slice(start, start + chunk_size)
        teacher = (None, None, None) if teacher_values is None else (
            teacher_values[part], teacher_ids[part], teacher_rest[part])
        args = (hidden[part], targets[part], *teacher)
        if torch.is_grad_enabled() and hidden.requires_grad:
            ce, kd = checkpoint(_chunk_loss, *args, head, kind, temperature, skew_alpha, use_reentrant=False)
        else:
            ce, kd = _chunk_loss(*args, head, kind, temperature, skew_alpha)
        ce_total = ce_total + ce
        kd_total = kd_total + kd
    ce_mean = ce_total / n
    kd_mean = kd_total / n * temperature**2
    return LossOutput(ce_mean + kd_weight * kd_mean, ce_mean.detach(), kd_mean.detach(), n)
