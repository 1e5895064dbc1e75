"""WandCache: a constant-size KV cache (the whole prefix + a ring buffer of the last W tokens).

Layout per layer (K and V alike, ``[batch, kv_heads, slots, head_dim]``):

* prefix slots: every column in which at least one sample still reads its conditioning prefix;
  kept forever. With a left-padded prompt of length P_max this is P_max slots.
* ring slots: exactly W, written round-robin by the generated columns. Slot order is not time
  order; that is harmless because every slot carries its absolute position and the mask is
  computed from positions (``wand.masks.visibility``), never from slot indices.

Keys are cached after RoPE, at their true absolute positions (unlike StreamingLLM, nothing is
re-numbered), so a cached key never changes once written.

The cache needs the WAND-enabled forward (``wand.enable_wand``): before each forward the wrapper
calls :meth:`WandCache.plan`, which decides where this step's columns go and returns the key
layout the attention will see, so the mask matches the keys that ``update`` returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from .masks import validate_prefix_lengths, validate_window

__all__ = ["WandCache"]


@dataclass
class _StepPlan:
    """Where the columns of one forward go; shared by every layer of that forward."""

    prefix_columns: torch.Tensor  # LongTensor[n_prefix]: chunk columns appended to the prefix store
    ring_columns: torch.Tensor  # LongTensor[n_ring]: chunk columns written to the ring (last <= W)
    ring_slots: torch.Tensor  # LongTensor[n_ring]: their ring slots
    decode: bool  # True: write first, then return [prefix | ring] (one generated column)
    layers_done: int = 0


class _WandLayer:
    """K/V storage of one attention layer: one buffer ``[B, H, n_prefix + W, D]``.

    The prefix slots come first and the W ring slots last, in one tensor, so a decode step
    writes one slot in place and hands the buffer to attention with no copy.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.num_prefix = 0
        self.is_initialized = False

    def lazy_initialization(self, keys: torch.Tensor, window: int) -> None:
        batch, heads, _, head_dim = keys.shape
        # The ring is allocated whole up front: its size is the promise (constant memory).
        self.keys = torch.zeros(batch, heads, window, head_dim, dtype=keys.dtype, device=keys.device)
        self.values = torch.zeros_like(self.keys)
        self.is_initialized = True

    def update(self, keys: torch.Tensor, values: torch.Tensor, plan: _StepPlan):
        ring_slots = plan.ring_slots + self.num_prefix
        if plan.decode:
            self.keys[:, :, ring_slots] = keys
            self.values[:, :, ring_slots] = values
            return self.keys, self.values
        # Several columns (prefill, or a chunk): this step's queries need all of this step's keys,
        # so return them whole and only then keep what the cache must keep.
        out_keys = torch.cat([self.keys, keys], dim=-2)
        out_values = torch.cat([self.values, values], dim=-2)
        if plan.prefix_columns.numel():
            n = self.num_prefix
            cols = plan.prefix_columns
            self.keys = torch.cat([self.keys[:, :, :n], keys[:, :, cols], self.keys[:, :, n:]], dim=-2)
            self.values = torch.cat([self.values[:, :, :n], values[:, :, cols], self.values[:, :, n:]], dim=-2)
            self.num_prefix += cols.numel()
            ring_slots = plan.ring_slots + self.num_prefix
        if plan.ring_columns.numel():
            self.keys[:, :, ring_slots] = keys[:, :, plan.ring_columns]
            self.values[:, :, ring_slots] = values[:, :, plan.ring_columns]
        return out_keys, out_values

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return (self.keys.numel() + self.values.numel()) * self.keys.element_size()


class WandCache(Cache):
    """Prefix + sliding-window KV cache for WAND decoding.

    Args:
        prefix_lengths: LongTensor[B] (or list), the conditioning prefix length of each sample.
        window: W, the number of most recent generated tokens kept.

    Use it as ``past_key_values`` (or ``cache``) of a model patched with ``wand.enable_wand``,
    in a plain forward loop or in ``model.generate``. Batched prompts must be left-padded (as
    for any transformers ``generate``), with the usual 2-D ``attention_mask``.
    """

    is_compileable = False

    def __init__(self, prefix_lengths: torch.Tensor | list[int], window: int):
        super().__init__(layers=[])
        if validate_window(window) is None:
            raise ValueError("window must be an int >= 1 for a WandCache (full attention uses DynamicCache)")
        self.window = window
        self.prefix_lengths = validate_prefix_lengths(prefix_lengths)
        batch = self.prefix_lengths.shape[0]
        self._columns_seen = 0
        self._ring_columns_written = 0
        self._next_position = torch.zeros(batch, dtype=torch.long)
        self.prefix_positions = torch.zeros(batch, 0, dtype=torch.long)
        self.prefix_valid = torch.zeros(batch, 0, dtype=torch.bool)
        self.ring_positions = torch.zeros(batch, window, dtype=torch.long)
        self.ring_valid = torch.zeros(batch, window, dtype=torch.bool)
        self._plan: _StepPlan | None = None

    # ------------------------------------------------------------------ planning (once per forward)
    def plan(self, query_valid: torch.Tensor, prefix_lengths: torch.Tensor | None = None):
        """Place the next forward's columns; return (query_positions, key_positions, key_valid).

        ``query_valid`` is BoolTensor[B, T] (False for left padding in the first chunk).
        The returned key layout is exactly the order of the keys ``update`` will return.
        """
        batch, length = query_valid.shape
        device = query_valid.device
        if batch != self.prefix_lengths.shape[0]:
            raise ValueError(
                f"the batch has {batch} samples but this WandCache was built for {self.prefix_lengths.shape[0]}"
            )
        if prefix_lengths is not None and not torch.equal(prefix_lengths.cpu(), self.prefix_lengths):
            raise ValueError("prefix_lengths differ from the ones this WandCache was built with")
        self._move_state(device)

        query_valid = query_valid.bool()
        positions = (torch.cumsum(query_valid.long(), -1) - 1 + self._next_position.view(-1, 1)).clamp(min=0)
        prefix_of = query_valid & (positions < self.prefix_lengths.view(-1, 1))
        is_prefix_column = prefix_of.any(0)
        prefix_columns = torch.nonzero(is_prefix_column).flatten()
        ring_columns = torch.nonzero(~is_prefix_column).flatten()[-self.window :]
        n_ring_total = int((~is_prefix_column).sum())
        # Slots continue round-robin; columns dropped from the front of a long chunk still count.
        first = self._ring_columns_written + n_ring_total - ring_columns.numel()
        ring_slots = (torch.arange(ring_columns.numel(), device=device) + first) % self.window
        decode = length == 1 and ring_columns.numel() == 1

        if decode:
            self._write_ring_meta(ring_slots, positions[:, ring_columns], query_valid[:, ring_columns])
            key_positions = torch.cat([self.prefix_positions, self.ring_positions], -1)
            key_valid = torch.cat([self.prefix_valid, self.ring_valid], -1)
        else:
            key_positions = torch.cat([self.prefix_positions, self.ring_positions, positions], -1)
            key_valid = torch.cat([self.prefix_valid, self.ring_valid, query_valid], -1)
            self.prefix_positions = torch.cat([self.prefix_positions, positions[:, prefix_columns]], -1)
            self.prefix_valid = torch.cat([self.prefix_valid, query_valid[:, prefix_columns]], -1)
            self._write_ring_meta(ring_slots, positions[:, ring_columns], query_valid[:, ring_columns])

        self._plan = _StepPlan(prefix_columns, ring_columns, ring_slots, decode)
        self._columns_seen += length
        self._ring_columns_written += n_ring_total
        self._next_position = self._next_position + query_valid.long().sum(-1)
        return positions, key_positions, key_valid

    def _write_ring_meta(self, slots, positions, valid):
        if slots.numel():
            self.ring_positions[:, slots] = positions
            self.ring_valid[:, slots] = valid

    def _move_state(self, device):
        if self.prefix_positions.device != device:
            for name in ("prefix_lengths", "_next_position", "prefix_positions", "prefix_valid",
                         "ring_positions", "ring_valid"):
                setattr(self, name, getattr(self, name).to(device))

    # ------------------------------------------------------------------ transformers Cache API
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self._plan is None:
            raise RuntimeError(
                "WandCache.update was called by a forward that did not plan the step: the model must be "
                "patched with wand.enable_wand(model, window) (or use wand.generate)"
            )
        while len(self.layers) <= layer_idx:
            self.layers.append(_WandLayer())
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, self.window)
        self._plan.layers_done += 1
        return layer.update(key_states, value_states, self._plan)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of columns processed so far (what transformers uses to slice new input_ids)."""
        return self._columns_seen

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.prefix_positions.shape[1] + self.window + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("WandCache does not support beam search; use greedy or sampling")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("WandCache cannot be cropped (assisted decoding is not supported)")

    @property
    def batch_size(self) -> int:
        return int(self.prefix_lengths.shape[0])

    # ------------------------------------------------------------------ memory
    def nbytes(self) -> int:
        """Bytes of cached keys and values over all layers (bookkeeping of positions excluded)."""
        return sum(layer.nbytes() for layer in self.layers)

    @property
    def num_slots(self) -> int:
        """Slots per layer: prefix columns + W."""
        return int(self.prefix_positions.shape[1]) + self.window
