"""One batch of corpus rows, the way every training and scoring loop feeds it to a model.

A corpus row is ``{"id", "input_ids", "prefix_length", ...}`` with the model's own columns (the
spec's ``row_columns``, e.g. IndexTTS's conditioning latents). The targets are the generated tokens:
the token at position j in [prefix_length, length) is predicted by the logits at j - 1. That shift
is written here once (``target_positions``); the Ray Train worker, the precompute, the teacher
trainer, the evals and the results table's harness all collate through ``collate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

__all__ = ["Batch", "collate", "target_positions"]


def target_positions(prefix_length: int, length: int) -> torch.Tensor:
    """Logit positions that predict the generated tokens: token j in [P, L) comes from logits[j - 1]."""
    return torch.arange(prefix_length - 1, length - 1)


@dataclass
class Batch:
    """Right-padded rows and the positions that predict their generated tokens (N of them in all)."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T], 1 on real tokens
    prefix_lengths: torch.Tensor  # [B]
    lengths: torch.Tensor  # [B]
    batch_index: torch.Tensor  # [N] the sample of each generated token
    positions: torch.Tensor  # [N] the logit position that predicts it
    targets: torch.Tensor  # [N] the generated token (input_ids[batch_index, positions + 1])
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # the spec's extra forward inputs
    # [B] the first tokens the mask keeps besides the window, where they are not the conditioning
    # prefix (a StreamingLLM-style mask keeps a few attention sinks); None: the prefix (WAND).
    kept_prefix_lengths: torch.Tensor | None = None

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of a WAND-enabled forward (window and tau are the caller's)."""
        if self.kept_prefix_lengths is None:
            return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                    "prefix_lengths": self.prefix_lengths, **self.inputs}
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "prefix_lengths": self.kept_prefix_lengths, "model_prefix_lengths": self.prefix_lengths, **self.inputs}

    def distance(self) -> torch.Tensor:
        """[N] how many generated tokens precede each target (0 for the first one)."""
        return self.positions - (self.prefix_lengths[self.batch_index] - 1)

    def per_sample(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Split [N, ...] per-target values into one tensor per sample (in batch order)."""
        counts = (self.lengths - self.prefix_lengths).tolist()
        return list(torch.split(values, counts))

    def to(self, device: torch.device | str) -> "Batch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        moved = {k: ({n: t.to(device) for n, t in v.items()} if isinstance(v, dict) else
                     None if v is None else v.to(device)) for k, v in moved.items()}
        return Batch(**moved)


def collate(spec, rows: list[dict], device: torch.device | str | None = None) -> Batch:
    """Rows -> one right-padded Batch (pad id: the spec's first target id, masked out)."""
    if not rows:
        raise ValueError("collate: no rows")
    lengths = [len(r["input_ids"]) for r in rows]
    prefixes = [int(r["prefix_length"]) for r in rows]
    for r, p, n in zip(rows, prefixes, lengths):
        if not 1 <= p < n:
            raise ValueError(f"row {r.get('id')!r}: prefix_length {p} must be in [1, {n}) "
                             "(a prefix and at least one generated token)")
    ids = torch.full((len(rows), max(lengths)), int(spec.target_ids()[0]), dtype=torch.long)
    mask = torch.zeros_like(ids)
    batch_index, positions = [], []
    for b, (r, p, n) in enumerate(zip(rows, prefixes, lengths)):
        ids[b, :n] = torch.as_tensor(r["input_ids"], dtype=torch.long)
        mask[b, :n] = 1
        span = target_positions(p, n)
        positions.append(span)
        batch_index.append(torch.full_like(span, b))
    batch_index, positions = torch.cat(batch_index), torch.cat(positions)
    batch = Batch(ids, mask, torch.tensor(prefixes), torch.tensor(lengths), batch_index, positions,
                  ids[batch_index, positions + 1], spec.row_inputs(rows))
    return batch if device is None else batch.to(device)


def forward_inputs(spec, row: dict, device: torch.device) -> dict:
    """Forward kwargs of one unpadded row (plus its prefix length under ``prefix_length``)."""
    ids = torch.tensor([row["input_ids"]], dtype=torch.long, device=device)
    spec.check_token_ids(ids)
    prefix = int(row["prefix_length"])
    if not 0 < prefix < ids.shape[1]:
        raise ValueError(f"row {row['id']}: prefix_length {prefix} must be in [1, {ids.shape[1]})")
    return {"input_ids": ids, "prefix_length": prefix, **spec.row_inputs([row], device)}
