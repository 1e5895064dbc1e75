import pytest
import torch

from wand.masks import (
    additive_mask,
    outside_window,
    visibility,
    wand_additive_mask,
    wand_block_mask,
    wand_mask,
    wand_mask_mod,
    wand_score_mod,
)


def brute_force(prefix_lengths, seq_len, window):
    batch = len(prefix_lengths)
    out = torch.zeros(batch, seq_len, seq_len, dtype=torch.bool)
    for b in range(batch):
        for i in range(seq_len):
            for j in range(seq_len):
                visible = j <= i
                if window is not None:
                    visible = visible and (j < int(prefix_lengths[b]) or i - j < window)
                out[b, i, j] = visible
    return out


@pytest.mark.parametrize("seed", range(6))
def test_wand_mask_equals_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    seq_len = int(torch.randint(1, 40, (1,), generator=gen))
    batch = int(torch.randint(1, 4, (1,), generator=gen))
    prefix = torch.randint(0, seq_len + 1, (batch,), generator=gen)
    window = int(torch.randint(1, seq_len + 3, (1,), generator=gen))
    assert torch.equal(wand_mask(prefix, seq_len, window), brute_force(prefix, seq_len, window))


def test_edge_cases():
    causal = torch.tril(torch.ones(12, 12, dtype=torch.bool))
    prefix = torch.tensor([0, 5, 12])
    # W >= T is plain causal attention; so is W = None.
    assert torch.equal(wand_mask(prefix, 12, 12), causal.expand(3, -1, -1))
    assert torch.equal(wand_mask(prefix, 12, None), causal.expand(3, -1, -1))
    # P = 0 is a pure sliding window of W (the diagonal and W-1 below it).
    band = causal & ~torch.tril(torch.ones(12, 12, dtype=torch.bool), diagonal=-3)
    assert torch.equal(wand_mask(torch.tensor([0]), 12, 3)[0], band)
    assert torch.equal(wand_mask(prefix, 12, 3), brute_force(prefix, 12, 3))
    # Each query sees at most P + W keys.
    assert int(wand_mask(torch.tensor([4]), 50, 6).sum(-1).max()) == 4 + 6


def test_soft_mask_limits():
    prefix, seq_len, window = torch.tensor([3, 7]), 20, 4
    scores = torch.randn(2, 1, seq_len, seq_len)
    causal = torch.tril(torch.ones(seq_len, seq_len, dtype=torch.bool))
    hard = wand_additive_mask(prefix, seq_len, window)
    full = wand_additive_mask(prefix, seq_len, None)
    soft0 = wand_additive_mask(prefix, seq_len, window, tau=0.0)
    soft_inf = wand_additive_mask(prefix, seq_len, window, tau=1e9)
    assert torch.equal(soft0, full)
    assert torch.equal(soft0[:, 0] == 0, causal.expand(2, -1, -1))
    p_hard = torch.softmax(scores + hard, -1)
    assert torch.allclose(torch.softmax(scores + soft_inf, -1), p_hard, atol=0, rtol=0)
    # In between, out-of-window keys get exactly -tau and nothing else changes.
    soft = wand_additive_mask(prefix, seq_len, window, tau=2.5)
    m = outside_window(prefix, seq_len, window)
    assert torch.equal(soft[:, 0][m], torch.full((int(m.sum()),), -2.5))
    assert torch.equal(soft[:, 0][~m], hard[:, 0][~m])
    # M is exactly causal minus visible.
    assert torch.equal(m, causal & ~wand_mask(prefix, seq_len, window))


def test_soft_mask_bf16_huge_tau_equals_hard():
    prefix = torch.tensor([2])
    hard = wand_additive_mask(prefix, 10, 3, dtype=torch.bfloat16)
    soft = wand_additive_mask(prefix, 10, 3, dtype=torch.bfloat16, tau=1e30)
    assert torch.isfinite(soft).all()
    scores = torch.randn(1, 1, 10, 10, dtype=torch.bfloat16)
    assert torch.equal(torch.softmax(scores + hard, -1), torch.softmax(scores + soft, -1))


def test_padding_right_and_left():
    # Right padding: padded keys are hidden from every query.
    padding = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    mask = wand_additive_mask(torch.tensor([2, 3]), 7, 2, padding_mask=padding)
    assert (mask[0, 0, :, 5:] == torch.finfo(torch.float32).min).all()
    assert torch.equal(mask[1, 0] == 0, wand_mask(torch.tensor([3]), 7, 2)[0])
    # Left padding through explicit positions: the same rule on the real tokens.
    valid = torch.tensor([[0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    visible, _ = visibility(positions, positions, torch.tensor([2]), 2, valid)
    assert torch.equal(visible[0, 2:, 2:], wand_mask(torch.tensor([2]), 5, 2)[0])
    assert not visible[0, :, :2].any()


def test_additive_mask_no_nan_on_empty_rows():
    visible = torch.zeros(1, 2, 3, dtype=torch.bool)
    mask = additive_mask(visible, None, torch.float16)
    assert torch.isfinite(torch.softmax(mask.float(), -1)).all()


def test_flex_mask_mod_matches_dense():
    from torch.nn.attention.flex_attention import create_mask

    prefix, seq_len = torch.tensor([0, 5, 9]), 33
    for window in (1, 4, 40, None):
        dense = create_mask(wand_mask_mod(prefix, window), 3, 1, seq_len, seq_len, device="cpu")[:, 0]
        assert torch.equal(dense, brute_force(prefix, seq_len, window))
    block = wand_block_mask(prefix, seq_len, 4, device="cpu", block_size=8)
    assert block.shape == (3, 1, seq_len, seq_len)


def test_flex_attention_matches_sdpa_hard_and_soft():
    from torch.nn.attention.flex_attention import flex_attention

    torch.manual_seed(0)
    prefix, seq_len, window = torch.tensor([3, 10]), 32, 5
    q, k, v = (torch.randn(2, 2, seq_len, 8) for _ in range(3))
    block = wand_block_mask(prefix, seq_len, window, device="cpu", block_size=16)
    flex = flex_attention(q, k, v, block_mask=block)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=wand_additive_mask(prefix, seq_len, window))
    assert torch.allclose(flex, dense, atol=1e-5)
    causal = wand_block_mask(prefix, seq_len, None, device="cpu", block_size=16)
    soft = flex_attention(q, k, v, block_mask=causal, score_mod=wand_score_mod(prefix, window, 1.7))
    soft_dense = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=wand_additive_mask(prefix, seq_len, window, tau=1.7)
    )
    assert torch.allclose(soft, soft_dense, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(prefix_lengths=torch.tensor([2]), seq_len=8, window=0), "window"),
        (dict(prefix_lengths=torch.tensor([2]), seq_len=8, window=-3), "window"),
        (dict(prefix_lengths=torch.tensor([9]), seq_len=8, window=2), "prefix_lengths"),
        (dict(prefix_lengths=torch.tensor([-1]), seq_len=8, window=2), "prefix_lengths"),
        (dict(prefix_lengths=torch.tensor([[1]]), seq_len=8, window=2), "prefix_lengths"),
        (dict(prefix_lengths=torch.tensor([1.5]), seq_len=8, window=2), "prefix_lengths"),
        (dict(prefix_lengths=torch.tensor([1]), seq_len=0, window=2), "seq_len"),
    ],
)
def test_bad_input_names_the_argument(kwargs, field):
    with pytest.raises(ValueError, match=field):
        wand_mask(**kwargs)
