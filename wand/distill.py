"""One distillation step: the WAND-masked student forward and the loss on a batch.

The Ray Train worker (pipeline/train/driver.py), the results table's harness (pipeline/evals/ablation.py) and,
with no teacher (CE only), the teacher trainer (pipeline/synthetic/teachers.py) all compute their loss here;
their loops (optimizer, schedule, data) are theirs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .batch import Batch
from .losses import LossOutput, wand_loss

__all__ = ["SparseTeacher", "distill_loss", "length_groups", "backward_in_parts"]


@dataclass
class SparseTeacher:
    """The teacher at a batch's N target positions (``wand.topk.sparse_teacher_targets``)."""

    values: torch.Tensor  # [N, k] log-probabilities
    ids: torch.Tensor  # [N, k] head ids
    rest: torch.Tensor  # [N] log of the mass outside the k

    def to(self, device) -> "SparseTeacher":
        return SparseTeacher(self.values.to(device), self.ids.to(device), self.rest.to(device))

    @classmethod
    def cat(cls, parts: list["SparseTeacher"]) -> "SparseTeacher":
        return cls(torch.cat([p.values for p in parts]), torch.cat([p.ids for p in parts]),
                   torch.cat([p.rest for p in parts]))


def distill_loss(spec, model: torch.nn.Module, batch: Batch, window: int | None, tau: float | None = None,
                 teacher: SparseTeacher | None = None, *, forward=None, kind: str = "skew_fkl",
                 kd_weight: float = 1.0, temperature: float = 1.0, skew_alpha: float = 0.1,
                 chunk_size: int = 1024, ce_over: torch.Tensor | None = None) -> LossOutput:
    """CE + kd_weight x KD at the batch's generated positions under the WAND mask (``window`` None:
    full attention; ``tau``: the soft mask's temperature, None for the hard mask).

    ``forward``: what runs the model (a DeepSpeed engine), default ``model`` itself. ``teacher``
    None: CE only. ``ce_over``: head ids the CE is restricted to (the teacher trainer's target
    vocabulary); targets must be among them."""
    hidden, head = spec.hidden_and_head(forward or model, model, **batch.model_inputs(), window=window, tau=tau)
    hidden = hidden[batch.batch_index, batch.positions]
    targets = batch.targets
    if ce_over is not None:
        ce_over = ce_over.to(targets.device)
        index = torch.full((int(ce_over.max()) + 1,), -1, dtype=torch.long, device=targets.device)
        index[ce_over] = torch.arange(len(ce_over), device=targets.device)
        targets = index[targets]
        if bool((targets < 0).any()):
            raise ValueError("distill_loss: a target is outside ce_over")
        full_head = head
        head = lambda h: full_head(h)[:, ce_over]  # noqa: E731
    if teacher is None:
        return wand_loss(hidden, head, targets, None, None, None, kind=kind, kd_weight=0.0,
                         temperature=temperature, skew_alpha=skew_alpha, chunk_size=chunk_size)
    return wand_loss(hidden, head, targets, teacher.values, teacher.ids, teacher.rest, kind=kind,
                     kd_weight=kd_weight, temperature=temperature, skew_alpha=skew_alpha, chunk_size=chunk_size)


def length_groups(rows: list, groups: int, length=lambda row: len(row["input_ids"])) -> list[list]:
    """``rows`` in ``groups`` parts of neighbouring lengths (sorted by ``length``, contiguous, sizes
    differing by at most one): each part is padded only to its own longest row (padding is about a
    quarter of a batch of 8 random utterances of the synthetic corpus; with two parts a CPU step is
    12-19% shorter, benchmarks/length_groups.py). ``groups`` 1: the rows as given, unsorted (exactly
    the single-batch step)."""
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if groups == 1:
        return [list(rows)]
    ordered = sorted(rows, key=length)
    size, extra = divmod(len(ordered), groups)
    parts, start = [], 0
    for g in range(groups):
        end = start + size + (g < extra)
        if end > start:
            parts.append(ordered[start:end])
        start = end
    return parts


def backward_in_parts(spec, model: torch.nn.Module, parts: list[tuple[Batch, SparseTeacher | None]],
                      window: int | None, tau: float | None = None, **loss_kwargs) -> LossOutput:
    """``distill_loss`` over the parts' rows as one batch, run part by part: each part's loss is
    weighted by its share of the target positions and back-propagated at once (only one part's
    activations are held), so the accumulated gradient is that of the whole batch's token mean (up to
    float rounding). Returns the whole batch's LossOutput, its loss detached. Zero the gradients
    before, step after."""
    total = sum(int(batch.targets.numel()) for batch, _ in parts)
    if total == 0:
        raise ValueError("backward_in_parts: no target positions in any part")
    loss = ce = kd = 0.0
    for batch, teacher in parts:
        out = distill_loss(spec, model, batch, window, tau, teacher, **loss_kwargs)
        share = out.positions / total
        (out.loss * share).backward()
        loss, ce, kd = loss + out.loss.detach() * share, ce + out.ce * share, kd + out.kd * share
    return LossOutput(loss, ce, kd, total)
