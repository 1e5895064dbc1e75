"""The WAND attention mask: the whole conditioning prefix plus the last W generated tokens.

Rule (0-based, per sample b, on absolute token positions):

    visible(i, j) = j <= i and (j < P[b] or i - j < W)

``W = None`` means plain causal attention. A query therefore sees at most P + W keys,
which is why a decode step needs a KV cache of exactly P + W entries.

Three backends share that one rule:

* dense boolean / additive masks for SDPA and eager attention (CPU, tests, decode);
* FlexAttention ``mask_mod`` / ``score_mod`` / ``BlockMask`` for GPU training;
* the soft curriculum form ``scores - tau * M`` where M marks keys that are causal but
  outside both the prefix and the window. ``tau = 0`` is full causal attention,
  ``tau -> inf`` the hard WAND mask.

All functions work on absolute positions, so left padding (shifted positions) and a
ring-buffer cache (keys out of order) use the same code as a plain training batch.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = [
    "validate_window",
    "validate_prefix_lengths",
    "visibility",
    "wand_mask",
    "outside_window",
    "additive_mask",
    "wand_additive_mask",
    "wand_mask_mod",
    "wand_score_mod",
    "wand_block_mask",
    "HARD_TAU",
    "sparse_tau",
]

# From this tau on the soft form is the hard mask in float32, so the FlexAttention path builds the
# hard, sparse BlockMask instead of running a score_mod on every causal element (issue 29: the soft
# path skipped no block). An out-of-window key's weight is exp(s - tau - m), m the row's largest
# in-window score: exactly 0 in float32 (below 2**-149 = exp(-103.3)) whenever s - m < tau - 104,
# about 900 at 1e3, and its gradient is then 0 too; scores 900 apart do not occur in a model that
# trains. The curriculum's tau (0.5 -> 1e4 on a log scale) passes it after 68% of its schedule.
HARD_TAU = 1e3


def validate_window(window: int | None) -> int | None:
    """Return ``window`` unchanged, or raise ``ValueError`` naming the argument."""
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int):
        raise ValueError(f"window must be a positive int or None (full attention), got {window!r}")
    if window < 1:
        raise ValueError(f"window must be >= 1 (or None for full attention), got {window}")
    return window


def validate_prefix_lengths(
    prefix_lengths: torch.Tensor | list[int],
    seq_len: int | torch.Tensor | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Check per-sample prefix lengths and return them as a LongTensor[B].

    ``seq_len`` may be one int (all samples) or a LongTensor[B] of per-sample true lengths.
    """
    if not isinstance(prefix_lengths, torch.Tensor):
        prefix_lengths = torch.as_tensor(prefix_lengths)
    if prefix_lengths.dim() != 1:
        raise ValueError(
            f"prefix_lengths must be a 1-D tensor of shape [batch], got shape {tuple(prefix_lengths.shape)}"
        )
    if prefix_lengths.dtype.is_floating_point or prefix_lengths.dtype == torch.bool:
        raise ValueError(f"prefix_lengths must hold integers, got dtype {prefix_lengths.dtype}")
    prefix_lengths = prefix_lengths.long()
    if batch_size is not None and prefix_lengths.shape[0] != batch_size:
        raise ValueError(
            f"prefix_lengths has {prefix_lengths.shape[0]} entries but the batch has {batch_size} samples"
        )
    if (prefix_lengths < 0).any():
        bad = int(torch.nonzero(prefix_lengths < 0)[0])
        raise ValueError(
            f"prefix_lengths must be >= 0, got {int(prefix_lengths[bad])} for sample {bad}"
        )
    if seq_len is not None:
        limit = torch.as_tensor(seq_len, device=prefix_lengths.device).long().expand_as(prefix_lengths)
        over = prefix_lengths > limit
        if over.any():
            bad = int(torch.nonzero(over)[0])
            raise ValueError(
                f"prefix_lengths[{bad}] = {int(prefix_lengths[bad])} exceeds the sequence length "
                f"{int(limit[bad])} of sample {bad}"
            )
    return prefix_lengths


def visibility(
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    prefix_lengths: torch.Tensor,
    window: int | None,
    key_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Core of every backend, on absolute positions.

    Args:
        query_positions: LongTensor[B, Tq] absolute position of each query.
        key_positions: LongTensor[B, Tk] absolute position of each key (any order).
        prefix_lengths: LongTensor[B].
        window: W, or None for full causal attention.
        key_valid: optional BoolTensor[B, Tk]; False for padding or empty cache slots.

    Returns:
        (visible, outside): BoolTensor[B, Tq, Tk] each. ``visible`` is the hard WAND mask;
        ``outside`` marks keys that are causal (and valid) but hidden by the window, i.e. the
        M of the soft form. ``visible | outside`` is plain causal attention.
    """
    q = query_positions.unsqueeze(-1)  # [B, Tq, 1]
    k = key_positions.unsqueeze(-2)  # [B, 1, Tk]
    causal = k <= q
    if key_valid is not None:
        causal = causal & key_valid.unsqueeze(-2)
    if window is None:
        return causal, torch.zeros_like(causal)
    in_prefix = k < prefix_lengths.view(-1, 1, 1)
    in_window = (q - k) < window
    visible = causal & (in_prefix | in_window)
    return visible, causal & ~visible


def wand_mask(prefix_lengths: torch.Tensor, seq_len: int, window: int | None) -> torch.Tensor:
    """BoolTensor[B, T, T], True where query i may attend to key j (positions 0..T-1)."""
    window = validate_window(window)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    prefix_lengths = validate_prefix_lengths(prefix_lengths, seq_len)
    positions = torch.arange(seq_len, device=prefix_lengths.device).expand(prefix_lengths.shape[0], -1)
    visible, _ = visibility(positions, positions, prefix_lengths, window)
    return visible


def outside_window(prefix_lengths: torch.Tensor, seq_len: int, window: int | None) -> torch.Tensor:
    """BoolTensor[B, T, T]: M of the soft form (causal, not in the prefix, not in the window)."""
    window = validate_window(window)
    prefix_lengths = validate_prefix_lengths(prefix_lengths, seq_len)
    positions = torch.arange(seq_len, device=prefix_lengths.device).expand(prefix_lengths.shape[0], -1)
    return visibility(positions, positions, prefix_lengths, window)[1]


def additive_mask(
    visible: torch.Tensor,
    outside: torch.Tensor | None,
    dtype: torch.dtype,
    tau: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Turn (visible, outside) into an additive float mask [B, 1, Tq, Tk] for SDPA/eager.

    Hidden keys get the dtype's most negative value (not -inf: a fully hidden row, e.g. a
    padding query, must not turn into NaN). With ``tau`` the soft form is used: keys in
    ``outside`` get ``-tau`` instead of being hidden.
    """
    min_value = torch.finfo(dtype).min
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    if tau is None or outside is None:
        mask.masked_fill_(~visible, min_value)
    else:
        tau_t = torch.as_tensor(tau, dtype=torch.float32, device=visible.device)
        if (tau_t < 0).any() or not torch.isfinite(tau_t).all():
            raise ValueError(f"tau must be finite and >= 0, got {tau}")
        hidden = ~(visible | outside)
        # Clamp so a huge tau stays representable in fp16/bf16 and equals the hard mask.
        penalty = (-tau_t).clamp(min=min_value).to(dtype)
        mask = torch.where(outside, penalty, mask)
        mask.masked_fill_(hidden, min_value)
    return mask.unsqueeze(1)


def wand_additive_mask(
    prefix_lengths: torch.Tensor,
    seq_len: int,
    window: int | None,
    dtype: torch.dtype = torch.float32,
    tau: float | None = None,
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Additive mask [B, 1, T, T] for a training batch starting at position 0.

    ``padding_mask`` is the usual 2-D ``attention_mask`` (1 = token, 0 = padding); padded keys
    are hidden. Right padding needs nothing else; use :func:`visibility` with explicit
    positions for left padding.
    """
    window = validate_window(window)
    prefix_lengths = validate_prefix_lengths(prefix_lengths, seq_len)
    positions = torch.arange(seq_len, device=prefix_lengths.device).expand(prefix_lengths.shape[0], -1)
    key_valid = None if padding_mask is None else padding_mask.bool()
    visible, outside = visibility(positions, positions, prefix_lengths, window, key_valid)
    return additive_mask(visible, outside, dtype, tau)


# --------------------------------------------------------------------------- FlexAttention
# These build closures over per-sample tensors; FlexAttention calls them with scalar index
# tensors (b, h, q_idx, kv_idx), so they must use only tensor ops (no Python branching on values).
# The window (and tau) are closed over as 0-d tensors, never as Python numbers: torch.compile guards
# on the value of a captured Python int and would recompile FlexAttention for every W of the
# curriculum, while a captured tensor is guarded only by its dtype, shape and device.


def _flex_parts(prefix_lengths: torch.Tensor, window: int | None, query_offset: int = 0):
    window_t = None if window is None else torch.tensor(window, dtype=torch.long, device=prefix_lengths.device)

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + query_offset

    def in_prefix(b, h, q_idx, kv_idx):
        return kv_idx < prefix_lengths[b]

    def in_window(b, h, q_idx, kv_idx):
        return (q_idx + query_offset - kv_idx) < window_t

    return causal, in_prefix, in_window


def wand_mask_mod(prefix_lengths: torch.Tensor, window: int | None, query_offset: int = 0) -> Callable:
    """FlexAttention mask_mod for the WAND rule: ``and_masks(causal, or_masks(prefix, window))``.

    ``query_offset`` shifts query indices (queries at positions offset..offset+Tq-1 against keys
    0..Tk-1), as in chunked prefill.
    """
    from torch.nn.attention.flex_attention import and_masks, or_masks

    window = validate_window(window)
    prefix_lengths = validate_prefix_lengths(prefix_lengths)
    causal, in_prefix, in_window = _flex_parts(prefix_lengths, window, query_offset)
    if window is None:
        return causal
    return and_masks(causal, or_masks(in_prefix, in_window))


def wand_score_mod(prefix_lengths: torch.Tensor, window: int | None, tau: float | torch.Tensor) -> Callable:
    """FlexAttention score_mod for the soft form: ``score - tau * M``.

    Use it together with a causal block mask (``wand_block_mask(..., window=None)``): M is only
    meaningful on causal pairs. ``tau`` may be a 0-d tensor so a changing curriculum value does
    not force a recompile.
    """
    window = validate_window(window)
    prefix_lengths = validate_prefix_lengths(prefix_lengths)
    tau_t = torch.as_tensor(tau, dtype=torch.float32, device=prefix_lengths.device)
    if window is None:
        return lambda score, b, h, q_idx, kv_idx: score
    window_t = torch.tensor(window, dtype=torch.long, device=prefix_lengths.device)

    def score_mod(score, b, h, q_idx, kv_idx):
        outside = (kv_idx >= prefix_lengths[b]) & ((q_idx - kv_idx) >= window_t)
        return score - tau_t * outside.to(score.dtype)

    return score_mod


def sparse_tau(tau: float | torch.Tensor | None) -> float | torch.Tensor | None:
    """``tau`` as the FlexAttention path uses it: None (the hard mask) from ``HARD_TAU`` on. A tensor
    is read once on the host (the curriculum passes Python floats)."""
    if tau is None:
        return None
    return None if float(tau) >= HARD_TAU else tau


def wand_block_mask(
    prefix_lengths: torch.Tensor,
    seq_len: int,
    window: int | None,
    num_heads: int | None = None,
    device: str | torch.device | None = None,
    block_size: int = 128,
):
    """FlexAttention ``BlockMask`` for a training batch (keys and queries 0..seq_len-1).

    Blocks entirely outside the prefix and the window are skipped by the kernel, which is where
    the training-time speedup at long sequence lengths comes from.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    prefix_lengths = validate_prefix_lengths(prefix_lengths, seq_len)
    device = device if device is not None else prefix_lengths.device
    prefix_lengths = prefix_lengths.to(device)
    return create_block_mask(
        wand_mask_mod(prefix_lengths, window),
        B=prefix_lengths.shape[0],
        H=num_heads,
        Q_LEN=seq_len,
        KV_LEN=seq_len,
        device=device,
        BLOCK_SIZE=block_size,
    )
