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

import functools

import torch
from transformers.cache_utils import Cache

from .masks import validate_prefix_lengths, validate_window

__all__ = ["WandCache"]


class _StepPlan:
    """Where the columns of one forward go; shared by every layer of that forward.

    A decode step (one generated column, every prefix already cached) is planned with host integers
    only: ``ring_slot`` is a Python int, so the per-step path never waits for the device.
    """

    __slots__ = ("decode", "ring_slot", "prefix_columns", "ring_columns", "ring_slots")

    def __init__(self, decode: bool, ring_slot: int = 0, prefix_columns=None, ring_columns=None, ring_slots=None):
        self.decode = decode
        self.ring_slot = ring_slot  # decode: the ring slot (0..W-1) of the one column
        self.prefix_columns = prefix_columns  # chunk: LongTensor, columns appended to the prefix store
        self.ring_columns = ring_columns  # chunk: LongTensor, columns written to the ring (the last <= W)
        self.ring_slots = ring_slots  # chunk: LongTensor, their ring slots (0..W-1)


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
        if plan.decode:
            slot = self.num_prefix + plan.ring_slot  # a host int: an in-place copy, no sync
            self.keys[:, :, slot] = keys[:, :, 0]
            self.values[:, :, slot] = values[:, :, 0]
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
        if plan.ring_columns.numel():
            slots = plan.ring_slots + self.num_prefix
            self.keys[:, :, slots] = keys[:, :, plan.ring_columns]
            self.values[:, :, slots] = values[:, :, plan.ring_columns]
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

    Device: the cache follows its inputs. Its bookkeeping moves to the device of the first forward
    (prefix lengths given on the CPU are fine with CUDA inputs), and the K/V buffers are made on
    the device of the keys. A decode step reads nothing back from the device (see ``_StepPlan``);
    a prefill reads the column layout back once.
    """

    is_compileable = False

    def __init__(self, prefix_lengths: torch.Tensor | list[int], window: int):
        super().__init__(layers=[])
        if validate_window(window) is None:
            raise ValueError("window must be an int >= 1 for a WandCache (full attention uses DynamicCache)")
        self.window = window
        self.prefix_lengths = validate_prefix_lengths(prefix_lengths)
        self._prefix_host = self.prefix_lengths.tolist()  # read once: later checks compare on the host
        self._checked: object = prefix_lengths  # the object last found equal (a per-step check costs nothing)
        batch = self.prefix_lengths.shape[0]
        device = self.prefix_lengths.device
        self._columns_seen = 0
        self._ring_columns_written = 0
        self._prefix_complete = False  # host flag: every sample is past its prefix (decode = ring only)
        self.num_prefix = 0
        self._next_position = torch.zeros(batch, dtype=torch.long, device=device)
        # Position and validity of every slot, in the K/V buffers' order: [prefix slots | W ring slots].
        self.key_positions = torch.zeros(batch, window, dtype=torch.long, device=device)
        self.key_valid = torch.zeros(batch, window, dtype=torch.bool, device=device)
        self._plan: _StepPlan | None = None

    @property
    def prefix_positions(self) -> torch.Tensor:
        return self.key_positions[:, : self.num_prefix]

    @property
    def ring_positions(self) -> torch.Tensor:
        return self.key_positions[:, self.num_prefix :]

    # ------------------------------------------------------------------ planning (once per forward)
    def plan(self, query_valid: torch.Tensor, prefix_lengths: torch.Tensor | list[int] | None = None):
        """Place the next forward's columns; return (query_positions, key_positions, key_valid).

        ``query_valid`` is BoolTensor[B, T] (False for left padding in the first chunk).
        The returned key layout is exactly the order of the keys ``update`` will return.
        """
        batch, length = query_valid.shape
        if batch != len(self._prefix_host):
            raise ValueError(
                f"the batch has {batch} samples but this WandCache was built for {len(self._prefix_host)}"
            )
        if prefix_lengths is not None and prefix_lengths is not self._checked:
            given = prefix_lengths.tolist() if isinstance(prefix_lengths, torch.Tensor) else list(prefix_lengths)
            if given != self._prefix_host:
                raise ValueError(
                    f"prefix_lengths {given} differ from the ones this WandCache was built with {self._prefix_host}"
                )
            self._checked = prefix_lengths
        self._move_state(query_valid.device)
        query_valid = query_valid.bool()
        if length == 1 and self._prefix_complete:
            return self._plan_decode(query_valid)
        return self._plan_chunk(query_valid)

    def _plan_decode(self, query_valid: torch.Tensor):
        """One generated column: it goes to ring slot (columns written so far) mod W. Host ints only."""
        ring_slot = self._ring_columns_written % self.window
        valid = query_valid[:, 0]
        positions = (self._next_position + valid.long() - 1).clamp(min=0)
        slot = self.num_prefix + ring_slot
        self.key_positions[:, slot] = positions
        self.key_valid[:, slot] = valid
        self._plan = _StepPlan(decode=True, ring_slot=ring_slot)
        self._columns_seen += 1
        self._ring_columns_written += 1
        self._next_position.add_(valid.long())
        return positions.view(-1, 1), self.key_positions, self.key_valid

    def _plan_chunk(self, query_valid: torch.Tensor):
        """Several columns (a prefill, or a chunk of one): reads the column layout back once."""
        device = query_valid.device
        positions = (torch.cumsum(query_valid.long(), -1) - 1 + self._next_position.view(-1, 1)).clamp(min=0)
        prefix_of = query_valid & (positions < self.prefix_lengths.view(-1, 1))
        is_prefix = prefix_of.any(0).tolist()
        prefix_cols = [c for c, p in enumerate(is_prefix) if p]
        ring_all = [c for c, p in enumerate(is_prefix) if not p]
        ring_cols = ring_all[-self.window :] if ring_all else []
        # Slots continue round-robin; columns dropped from the front of a long chunk still count.
        first = self._ring_columns_written + len(ring_all) - len(ring_cols)
        as_tensor = functools.partial(torch.tensor, dtype=torch.long, device=device)
        plan = _StepPlan(decode=False, prefix_columns=as_tensor(prefix_cols), ring_columns=as_tensor(ring_cols),
                         ring_slots=as_tensor([(first + i) % self.window for i in range(len(ring_cols))]))

        key_positions = torch.cat([self.key_positions, positions], -1)
        key_valid = torch.cat([self.key_valid, query_valid], -1)
        if prefix_cols:
            n, cols = self.num_prefix, plan.prefix_columns
            self.key_positions = torch.cat([self.key_positions[:, :n], positions[:, cols], self.key_positions[:, n:]], -1)
            self.key_valid = torch.cat([self.key_valid[:, :n], query_valid[:, cols], self.key_valid[:, n:]], -1)
            self.num_prefix += len(prefix_cols)
        if ring_cols:
            slots = plan.ring_slots + self.num_prefix
            self.key_positions[:, slots] = positions[:, plan.ring_columns]
            self.key_valid[:, slots] = query_valid[:, plan.ring_columns]

        self._plan = plan
        self._columns_seen += query_valid.shape[1]
        self._ring_columns_written += len(ring_all)
        self._next_position = self._next_position + query_valid.long().sum(-1)
        self._prefix_complete = bool((self._next_position >= self.prefix_lengths).all())
        return positions, key_positions, key_valid

    def _move_state(self, device: torch.device) -> None:
        if self.key_positions.device != device:
            for name in ("prefix_lengths", "_next_position", "key_positions", "key_valid"):
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
        return layer.update(key_states, value_states, self._plan)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of columns processed so far (what transformers uses to slice new input_ids)."""
        return self._columns_seen

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.num_prefix + self.window + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("WandCache does not support beam search; use greedy or sampling")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("WandCache cannot be cropped (assisted decoding is not supported)")

    @property
    def batch_size(self) -> int:
        return len(self._prefix_host)

    # ------------------------------------------------------------------ memory
    def nbytes(self) -> int:
        """Bytes of cached keys and values over all layers (bookkeeping of positions excluded)."""
        return sum(layer.nbytes() for layer in self.layers)

    @property
    def num_slots(self) -> int:
        """Slots per layer: prefix columns + W."""
        return self.num_prefix + self.window
