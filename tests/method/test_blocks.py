"""wand.blocks: the BlockMask built from tile bounds equals the one torch builds from the mask_mod
on every (query, key) pair, and it is cached without leaking one forward's attributes into the next."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from wand.blocks import clear_block_mask_cache, wand_tile_block_mask, wand_tiles
from wand.masks import wand_mask_mod
from wand.patch import _flex_mask

FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
          "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


@pytest.mark.parametrize("window", [None, 1, 5, 16, 17, 40, 200])
@pytest.mark.parametrize("length,block", [(64, 16), (96, 16), (256, 128), (1024, 128)])
def test_tiles_give_the_block_mask_torch_builds_from_every_pair(window, length, block):
    clear_block_mask_cache()
    gen = torch.Generator().manual_seed(length + (window or 0))
    # Prefixes on, just before and just after tile edges, 0 and the whole length, and random ones.
    prefix = torch.cat([torch.tensor([0, 1, block - 1, block, block + 1, length]),
                        torch.randint(0, length + 1, (4,), generator=gen)])
    ours = wand_tile_block_mask(prefix, window, length, "cpu", block)
    theirs = create_block_mask(wand_mask_mod(prefix, window), B=len(prefix), H=None, Q_LEN=length,
                               KV_LEN=length, device="cpu", BLOCK_SIZE=block)
    for field in FIELDS:
        assert torch.equal(getattr(ours, field), getattr(theirs, field)), field
    assert ours.seq_lengths == theirs.seq_lengths and ours.BLOCK_SIZE == theirs.BLOCK_SIZE


def test_full_tiles_are_the_tiles_whose_every_pair_is_visible():
    """The tile rule against the dense rule directly: a tile is full iff every pair in it is visible,
    partial iff some but not all are (prefixes 0 .. 40, windows 1 .. 40, tiles of 8)."""
    length, block = 48, 8
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    prefix = torch.arange(0, 41)
    for window in (1, 3, 8, 9, 20, 40):
        partial, full = wand_tiles(prefix, window, length, block)
        for b, p in enumerate(prefix.tolist()):
            visible = ((j <= i) & ((j < p) | (i - j < window))).view(6, block, 6, block).transpose(1, 2)
            count = visible.sum((-1, -2))
            assert torch.equal(full[b, 0].bool(), count == block * block)
            assert torch.equal(partial[b, 0].bool(), (count > 0) & (count < block * block))


def test_flex_attention_with_the_tile_mask_equals_the_dense_rule():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, 2, 256, 16, generator=gen) for _ in range(3))
    prefix, window = torch.tensor([3, 130, 256]), 20
    out = flex_attention(q, k, v, block_mask=wand_tile_block_mask(prefix, window, 256, "cpu"))
    i, j = torch.arange(256)[:, None], torch.arange(256)[None, :]
    visible = (j <= i) & ((j < prefix.view(-1, 1, 1, 1)) | (i - j < window))
    dense = torch.softmax((q @ k.transpose(-1, -2) / 4).masked_fill(~visible, float("-inf")), -1) @ v
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=0)


def test_the_cache_reuses_masks_and_a_forward_never_changes_the_cached_one():
    clear_block_mask_cache()
    prefix, valid = torch.tensor([4, 9]), torch.ones(2, 100, dtype=torch.bool)
    first = wand_tile_block_mask(prefix, 8, 128, "cpu")
    assert wand_tile_block_mask(torch.tensor([4, 9]), 8, 128, "cpu") is first
    assert wand_tile_block_mask(torch.tensor([4, 10]), 8, 128, "cpu") is not first
    assert wand_tile_block_mask(prefix, 9, 128, "cpu") is not first
    # The soft form attaches its score_mod to the causal mask; a full-attention forward (window None)
    # then gets the same cached causal mask without it.
    soft = _flex_mask(None, None, prefix, 100, 8, 0.5, valid, torch.device("cpu"))
    causal = _flex_mask(None, None, prefix, 100, None, None, valid, torch.device("cpu"))
    assert hasattr(soft, "wand_score_mod") and not hasattr(causal, "wand_score_mod")
    assert soft.kv_indices is causal.kv_indices  # one cached mask under both
    assert not hasattr(wand_tile_block_mask(prefix, None, 128, "cpu"), "wand_score_mod")


def test_bad_lengths_are_refused():
    with pytest.raises(ValueError, match="multiple of the block size"):
        wand_tiles(torch.tensor([1]), 4, 100, 128)
    with pytest.raises(ValueError, match="window"):
        wand_tile_block_mask(torch.tensor([1]), 0, 128)
