"""enable_wand forward == the same model run with a hand-built 4-D additive mask from the rule."""

import pytest
import torch
from transformers import BertConfig, BertModel

import wand
from conftest import VOCAB, tiny_model


def rule_mask(prefix_lengths, seq_len, window, tau=None):
    """Independent additive mask: a Python loop over (b, i, j), not wand.masks."""
    batch = len(prefix_lengths)
    neg = torch.finfo(torch.float32).min
    mask = torch.full((batch, 1, seq_len, seq_len), neg)
    for b in range(batch):
        for i in range(seq_len):
            for j in range(i + 1):
                if window is None or j < int(prefix_lengths[b]) or i - j < window:
                    mask[b, 0, i, j] = 0.0
                elif tau is not None:
                    mask[b, 0, i, j] = -tau
    return mask


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_forward_equals_hand_built_mask(family, attn):
    torch.manual_seed(1)
    model = tiny_model(family, attn)
    ids = torch.randint(0, VOCAB, (3, 24))
    prefix = torch.tensor([4, 0, 11])
    positions = torch.arange(24).expand(3, -1)
    for window, tau in [(3, None), (8, None), (None, None), (3, 0.7)]:
        expected = model(input_ids=ids, attention_mask=rule_mask(prefix, 24, window, tau), position_ids=positions).logits
        wand.enable_wand(model, window)
        got = model(input_ids=ids, prefix_lengths=prefix, tau=tau).logits
        wand.disable_wand(model)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_window_really_changes_the_output(family):
    model = wand.enable_wand(tiny_model(family), 2)
    ids = torch.randint(0, VOCAB, (1, 16))
    windowed = model(input_ids=ids, prefix_lengths=torch.tensor([3])).logits
    full = model(input_ids=ids, prefix_lengths=torch.tensor([3]), window=None).logits
    # Positions inside prefix + window agree, later ones differ.
    torch.testing.assert_close(windowed[:, :5], full[:, :5], atol=1e-5, rtol=0)
    assert (windowed[:, 6:] - full[:, 6:]).abs().max() > 1e-3


def test_soft_mask_limits_through_the_model(family):
    model = wand.enable_wand(tiny_model(family), 3)
    ids = torch.randint(0, VOCAB, (2, 20))
    prefix = torch.tensor([4, 6])
    full = model(input_ids=ids, prefix_lengths=prefix, window=None).logits
    hard = model(input_ids=ids, prefix_lengths=prefix).logits
    torch.testing.assert_close(model(input_ids=ids, prefix_lengths=prefix, tau=0.0).logits, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(model(input_ids=ids, prefix_lengths=prefix, tau=1e9).logits, hard, atol=1e-5, rtol=0)


def test_right_padding_does_not_change_real_tokens(family):
    model = wand.enable_wand(tiny_model(family), 4)
    ids = torch.randint(0, VOCAB, (2, 18))
    padding = torch.ones_like(ids)
    padding[0, 12:] = 0
    prefix = torch.tensor([5, 5])
    batched = model(input_ids=ids, attention_mask=padding, prefix_lengths=prefix).logits
    alone = model(input_ids=ids[:1, :12], prefix_lengths=prefix[:1]).logits
    torch.testing.assert_close(batched[:1, :12], alone, atol=1e-5, rtol=0)


def test_gradients_flow_with_soft_mask(family):
    model = wand.enable_wand(tiny_model(family), 3).train()
    ids = torch.randint(0, VOCAB, (2, 16))
    out = model(input_ids=ids, prefix_lengths=torch.tensor([4, 2]), tau=1.0, labels=ids)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_bad_inputs_name_the_argument():
    model = wand.enable_wand(tiny_model("qwen2"), 4)
    ids = torch.randint(0, VOCAB, (2, 10))
    with pytest.raises(ValueError, match="prefix_lengths"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match="prefix_lengths"):
        model(input_ids=ids, prefix_lengths=torch.tensor([3]))  # wrong batch size
    with pytest.raises(ValueError, match="prefix_lengths"):
        model(input_ids=ids, prefix_lengths=torch.tensor([3, 11]))  # longer than the sequence
    with pytest.raises(ValueError, match="prefix_lengths"):
        model(input_ids=ids, prefix_lengths=torch.tensor([3, -1]))
    with pytest.raises(ValueError, match="window"):
        wand.enable_wand(tiny_model("qwen2"), 0)
    with pytest.raises(ValueError, match="window"):
        model(input_ids=ids, prefix_lengths=torch.tensor([3, 3]), window=-2)
    bert = BertModel(BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8))
    with pytest.raises(ValueError, match="Qwen2ForCausalLM.*GPT2LMHeadModel"):
        wand.enable_wand(bert, 4)


@pytest.mark.parametrize("gqa", ["native", "repeat"])  # WAND_FLEX_GQA: K/V heads grouped or repeated
@pytest.mark.parametrize("tau", [None, 0.9, 1e3])  # 1e3: HARD_TAU, the Flex path's hard mask
def test_flex_backend_matches_dense(family, tau, gqa, monkeypatch):
    """The FlexAttention path (BlockMask + score_mod) gives the dense path's logits (CPU, unfused)."""
    monkeypatch.setenv("WAND_FLEX_GQA", gqa)
    ids = torch.randint(0, VOCAB, (2, 40))
    prefix = torch.tensor([5, 12])
    with torch.no_grad():  # FlexAttention has no CPU backward
        dense = wand.enable_wand(tiny_model(family, "sdpa"), 6)(input_ids=ids, prefix_lengths=prefix, tau=tau).logits
        flex_model = wand.enable_wand(tiny_model(family, "sdpa"), 6, backend="flex")
        assert flex_model.config._attn_implementation == "wand_flex"
        flex = flex_model(input_ids=ids, prefix_lengths=prefix, tau=tau).logits
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=0)


def test_repeated_kv_heads_reach_flex_as_one_per_query_head(monkeypatch):
    """WAND_FLEX_GQA=repeat really repeats (so the test above compares two different calls), native
    passes the grouped heads; any other setting is refused by name."""
    import torch.nn.attention.flex_attention as flex_module

    seen = []
    real = flex_module.flex_attention

    def spy(query, key, value, **kwargs):
        seen.append((query.shape[1], key.shape[1], value.shape[1], kwargs["enable_gqa"]))
        return real(query, key, value, **kwargs)

    monkeypatch.setattr(flex_module, "flex_attention", spy)
    model = wand.enable_wand(tiny_model("qwen2", "sdpa"), 6, backend="flex")  # 4 query heads, 2 K/V heads
    ids, prefix = torch.randint(0, VOCAB, (2, 20)), torch.tensor([5, 7])
    for setting, expected in (("native", (4, 2, 2, True)), ("repeat", (4, 4, 4, False))):
        monkeypatch.setenv("WAND_FLEX_GQA", setting)
        seen.clear()
        with torch.no_grad():
            model(input_ids=ids, prefix_lengths=prefix)
        assert seen and set(seen) == {expected}, (setting, seen)
    monkeypatch.setenv("WAND_FLEX_GQA", "tiled")
    with pytest.raises(ValueError, match="WAND_FLEX_GQA"), torch.no_grad():
        model(input_ids=ids, prefix_lengths=prefix)


def test_from_hard_tau_the_flex_path_skips_the_blocks_the_soft_form_zeroes():
    """From HARD_TAU the soft form's out-of-window weights are exactly 0 in float32, so the Flex path
    builds the hard, sparse BlockMask (no score_mod) there, and keeps the dense soft form below it."""
    from wand.curriculum import Curriculum
    from wand.masks import HARD_TAU
    from wand.patch import _flex_mask

    # 1. Float32 softmax: scores up to 800 apart, -HARD_TAU on the outside keys == those keys removed,
    # bit for bit; a tenth of it still leaks weight onto them.
    gen = torch.Generator().manual_seed(0)
    scores = (torch.rand(256, 256, generator=gen) - 0.5) * 800
    outside = torch.rand(256, 256, generator=gen) < 0.7
    outside[:, 0] = False  # every row keeps a key
    hard = torch.softmax(scores.masked_fill(outside, float("-inf")), -1)
    assert torch.equal(torch.softmax(scores - HARD_TAU * outside, -1), hard)
    assert not torch.equal(torch.softmax(scores - HARD_TAU / 10 * outside, -1), hard)

    # 2. The block masks, against blocks counted from the rule itself (j <= i and (j < P or i - j < W)).
    prefix, length, window, block = torch.tensor([8, 200]), 1024, 32, 128
    valid = torch.ones(2, length, dtype=torch.bool)
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    expected = 0
    for p in prefix.tolist():
        visible = (j <= i) & ((j < p) | (i - j < window))
        expected += int(visible.view(length // block, block, length // block, block).any(3).any(1).sum())
    causal = 2 * (length // block) * (length // block + 1) // 2

    def blocks(mask) -> int:
        return int(mask.kv_num_blocks.sum() + mask.full_kv_num_blocks.sum())

    below = _flex_mask(None, None, prefix, length, window, HARD_TAU / 2, valid, torch.device("cpu"))
    at = _flex_mask(None, None, prefix, length, window, torch.tensor(HARD_TAU), valid, torch.device("cpu"))
    assert hasattr(below, "wand_score_mod") and blocks(below) == causal
    assert not hasattr(at, "wand_score_mod") and blocks(at) == expected < causal, (blocks(at), expected, causal)

    # 3. Where the curriculum (tau 0.5 -> 1e4, log scale) passes it: after 68% of its schedule.
    schedule = Curriculum(total_steps=1000)
    first = next(s for s in range(1000) if schedule.tau(s) >= HARD_TAU)
    assert round(first / 1000, 2) == 0.68, first


def test_a_deep_copied_wand_model_runs_its_own_weights():
    """The wrapper is a method bound to the model: copy.deepcopy (a student made from its teacher)
    rebinds it, so the copy's forward uses the copy's parameters, not the original's."""
    import copy

    from wand.models import get_spec

    for name in ("sparktts", "indextts"):
        spec = get_spec(name, "tiny")
        torch.manual_seed(0)
        teacher = wand.enable_wand(spec.build().eval(), 4)
        student = copy.deepcopy(teacher)
        ids = spec.target_ids()[:12].view(1, -1)
        kwargs = {"input_ids": ids, "prefix_lengths": torch.tensor([4])}
        if name == "indextts":
            kwargs["conditioning_latents"] = torch.zeros(1, spec.extra["num_latents"], spec.config["n_embd"])
        with torch.no_grad():
            before = teacher(**kwargs).logits
            torch.testing.assert_close(student(**kwargs).logits, before)
            for p in student.parameters():
                p.add_(0.1)
            assert not torch.allclose(student(**kwargs).logits, before)
            torch.testing.assert_close(teacher(**kwargs).logits, before)
