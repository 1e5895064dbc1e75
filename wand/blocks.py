"""FlexAttention ``BlockMask`` for the WAND rule, built from block bounds instead of a dense mask.

``create_block_mask`` evaluates the mask_mod on every (query, key) pair: a dense B x T x T pass
(about 1 ms at 8K on a GPU) with host syncs, on every training forward. The WAND rule (key ``k``
visible to query ``q`` iff ``k <= q`` and (``k < P`` or ``q - k < W``)) is simple enough to decide
per 128 x 128 tile from the tile's corners, so this builds the same BlockMask from B x (T/128)^2
tile tests, and caches it per (prefix lengths, window, length, block size, device): a batch seen
again (the curriculum's repeated shapes, a benchmark's steps) reuses it.

Tiles, for queries ``q0..q1`` and keys ``k0..k1``:

* some pair visible: ``k0 <= q1`` (some key is causal) and (``k0 < P`` or ``max(0, q0 - k1) < W``);
* every pair visible (a *full* tile, where the kernel skips the mask_mod): ``k1 <= q0`` and
  (``k1 < P`` or ``q1 - max(k0, P) < W``);
* the rest of the visible tiles are *partial*: the kernel applies the mask_mod inside them.
"""

from __future__ import annotations

import collections

import torch

from .masks import validate_prefix_lengths, validate_window, wand_mask_mod

BLOCK_MASK_CACHE_SIZE = 16  # masks kept per process: each is a few KB of block indices
_cache: collections.OrderedDict = collections.OrderedDict()


def wand_tiles(prefix_lengths: torch.Tensor, window: int | None, length: int,
               block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) int8 tiles [B, 1, n, n] of the WAND rule for ``length`` (a multiple of ``block``)."""
    if length % block:
        raise ValueError(f"length {length} must be a multiple of the block size {block}")
    device = prefix_lengths.device
    start = torch.arange(0, length, block, device=device)
    q0, q1 = start.view(-1, 1), start.view(-1, 1) + block - 1  # [n, 1]: query tiles down
    k0, k1 = start.view(1, -1), start.view(1, -1) + block - 1  # [1, n]: key tiles across
    prefix = prefix_lengths.view(-1, 1, 1, 1)  # [B, 1, 1, 1]
    any_pair = (k0 <= q1).expand(prefix.shape[0], 1, -1, -1)
    all_pairs = (k1 <= q0).expand_as(any_pair)
    if window is not None:
        any_pair = any_pair & ((k0 < prefix) | ((q0 - k1).clamp(min=0) < window))
        all_pairs = all_pairs & ((k1 < prefix) | (q1 - torch.maximum(k0, prefix) < window))
    return (any_pair & ~all_pairs).to(torch.int8), all_pairs.to(torch.int8)


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiles as (count per query row, key-tile indices with the visible ones first, ascending)."""
    counts = tiles.sum(-1, dtype=torch.int32)
    indices = torch.argsort(tiles, dim=-1, descending=True, stable=True).to(torch.int32)
    return counts.contiguous(), indices.contiguous()


def wand_tile_block_mask(prefix_lengths: torch.Tensor | list[int], window: int | None, length: int,
                         device: str | torch.device | None = None, block: int = 128):
    """The BlockMask ``create_block_mask(wand_mask_mod(prefix_lengths, window), B, None, length, length)``
    builds, from tiles (no dense pass), cached per (prefix lengths, window, length, block, device)."""
    from torch.nn.attention.flex_attention import BlockMask

    window = validate_window(window)
    prefix_lengths = validate_prefix_lengths(prefix_lengths)
    device = torch.device(device) if device is not None else prefix_lengths.device
    # The key is read on the host once; the tiles and the mask_mod then live on ``device``.
    key = (tuple(prefix_lengths.tolist()), window, length, block, str(device))
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    prefix_lengths = prefix_lengths.to(device)
    partial, full = wand_tiles(prefix_lengths, window, length, block)
    mask = BlockMask.from_kv_blocks(
        *_ordered(partial), *_ordered(full), BLOCK_SIZE=block,
        mask_mod=wand_mask_mod(prefix_lengths, window), seq_lengths=(length, length))
    _cache[key] = mask
    if len(_cache) > BLOCK_MASK_CACHE_SIZE:
        _cache.popitem(last=False)
    return mask


def clear_block_mask_cache() -> None:
    """Forget every cached BlockMask (tests; a process that changes devices)."""
    _cache.clear()
