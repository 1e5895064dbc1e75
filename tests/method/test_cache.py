"""WandCache generation == a no-cache loop of full masked forwards; constant memory."""

import pytest
import torch
from transformers.cache_utils import DynamicCache

import wand
from conftest import VOCAB, tiny_model


def kv_bytes_per_token(model) -> int:
    cfg = model.config
    layers = cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return 2 * layers * kv_heads * head_dim * next(model.parameters()).element_size()


def left_padded_prompts(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, width - n:] = torch.randint(0, VOCAB, (n,), generator=gen)
        mask[b, width - n:] = 1
    return ids, mask


def no_cache_greedy(model, ids, mask, prefix, steps):
    """Reference: recompute the full WAND-masked forward over the whole sequence every step."""
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask, prefix_lengths=prefix, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], -1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], -1)
    return ids


@pytest.mark.parametrize("window", [1, 5])
def test_generate_equals_no_cache_loop(family, window):
    model = wand.enable_wand(tiny_model(family), window)
    prefix = torch.tensor([7, 3])
    ids, mask = left_padded_prompts([7, 3])
    steps = 3 * window + 4
    expected = no_cache_greedy(model, ids, mask, prefix, steps)
    got = wand.generate(model, ids, prefix, window, steps, attention_mask=mask)
    assert torch.equal(got, expected)


def test_generate_with_prompt_longer_than_prefix(family):
    # The prompt can already contain generated-region tokens (e.g. a continuation).
    model = wand.enable_wand(tiny_model(family), 4)
    ids, mask = left_padded_prompts([12, 9], seed=3)
    prefix = torch.tensor([5, 2])
    expected = no_cache_greedy(model, ids, mask, prefix, 14)
    assert torch.equal(wand.generate(model, ids, prefix, 4, 14, attention_mask=mask), expected)


def test_model_generate_accepts_wand_cache(family):
    model = wand.enable_wand(tiny_model(family), 4)
    prefix = torch.tensor([6, 4])
    ids, mask = left_padded_prompts([6, 4], seed=1)
    ours = wand.generate(model, ids, prefix, 4, 15, attention_mask=mask)
    hf = model.generate(input_ids=ids, attention_mask=mask, cache=wand.WandCache(prefix, 4),
                        max_new_tokens=15, do_sample=False, pad_token_id=0)
    assert torch.equal(hf, ours)


def test_cache_bytes_are_constant(family):
    window = 6
    model = wand.enable_wand(tiny_model(family), window)
    prefix = torch.tensor([9, 5])
    ids, mask = left_padded_prompts([9, 5])
    _, cache_w = wand.generate(model, ids, prefix, window, window, attention_mask=mask, return_cache=True)
    _, cache_10w = wand.generate(model, ids, prefix, window, 10 * window, attention_mask=mask, return_cache=True)
    per_token = kv_bytes_per_token(model)
    expected = 2 * (9 + window) * per_token  # batch 2, (P_max + W) slots
    assert cache_w.nbytes() == cache_10w.nbytes() == expected

    # The default transformers cache (full attention) grows linearly with the generated length:
    # after n steps it holds the prompt and n - 1 generated tokens (the last one is not fed back).
    def dynamic_bytes(steps):
        _, cache = wand.generate(model, ids, prefix, None, steps, attention_mask=mask, return_cache=True)
        assert isinstance(cache, DynamicCache)
        return sum((layer.keys.numel() + layer.values.numel()) * layer.keys.element_size() for layer in cache.layers)

    assert dynamic_bytes(window) == 2 * (9 + window - 1) * per_token
    assert dynamic_bytes(10 * window) == 2 * (9 + 10 * window - 1) * per_token


def test_full_attention_generate_equals_hf_generate(family):
    model = tiny_model(family)
    ids = torch.randint(0, VOCAB, (1, 6))
    expected = model.generate(input_ids=ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(wand.generate(model, ids, torch.tensor([6]), None, 10), expected)


def test_eos_stops_and_pads():
    model = wand.enable_wand(tiny_model("qwen2"), 4)
    ids = torch.randint(0, VOCAB, (2, 5))
    free = wand.generate(model, ids, torch.tensor([5, 5]), 4, 12)
    stop = int(free[0, 7])  # the third generated token of sample 0 becomes the stop id
    out = wand.generate(model, ids, torch.tensor([5, 5]), 4, 12, eos_token_id=stop, pad_token_id=VOCAB - 1)
    first = int((free[0, 5:] == stop).nonzero()[0])
    assert out[0, 5 + first] == stop
    assert (out[0, 6 + first:] == VOCAB - 1).all()


def test_sampling_is_seeded():
    model = wand.enable_wand(tiny_model("gpt2"), 4)
    ids = torch.randint(0, VOCAB, (2, 5))
    runs = [
        wand.generate(model, ids, torch.tensor([5, 5]), 4, 10, do_sample=True, top_k=20, top_p=0.9,
                      temperature=0.8, generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])


def test_cache_errors():
    model = tiny_model("qwen2")
    with pytest.raises(ValueError, match="window"):
        wand.WandCache(torch.tensor([3]), 0)
    with pytest.raises(RuntimeError, match="enable_wand"):
        model(input_ids=torch.randint(0, VOCAB, (1, 4)), cache=wand.WandCache(torch.tensor([3]), 2))
    wand.enable_wand(model, 2)
    with pytest.raises(ValueError, match="batch"):
        model(input_ids=torch.randint(0, VOCAB, (2, 4)), cache=wand.WandCache(torch.tensor([3]), 2))
    with pytest.raises(ValueError, match="prefix_lengths"):
        wand.generate(model, torch.randint(0, VOCAB, (1, 4)), torch.tensor([5]), 2, 3)
    with pytest.raises(ValueError, match="left-padded"):
        wand.generate(model, torch.randint(0, VOCAB, (1, 4)), torch.tensor([2]), 2, 3,
                      attention_mask=torch.tensor([[1, 1, 0, 0]]))
