"""The static decode path (wand.static.StaticDecoder, wand.generate(compile=...)) gives exactly the
default path's tokens: greedy and seeded sampling, batch 3 with left padding and three prefix
lengths, 5 x W steps, per-sample stop ids; eager and torch.compile'd (the CUDA-graph mode runs in
tests/method/test_cuda.py)."""

import pytest
import torch

import wand
from conftest import VOCAB, tiny_model
from helpers import batch_of_three as shared_batch, left_padded
from wand.generation import cache_kwarg_name
from wand.static import StaticDecoder

WINDOW = 4
STEPS = 5 * WINDOW


def batch_of_three(name):
    """(model with WAND at W, ids, mask, prefix, prefill kwargs): the shared batch, built."""
    build, ids, mask, prefix, kwargs = shared_batch(name)
    return wand.enable_wand(build(), WINDOW), ids, mask, prefix, kwargs


MODELS = ["qwen2", "llama", "gpt2", "cosyvoice2", "indextts"]


@pytest.mark.parametrize("name", MODELS)
def test_static_steps_equal_the_default_path(name):
    model, ids, mask, prefix, kwargs = batch_of_three(name)
    expected = wand.generate(model, ids, prefix, WINDOW, STEPS, attention_mask=mask, prefill_kwargs=kwargs)
    got = wand.generate(model, ids, prefix, WINDOW, STEPS, attention_mask=mask, prefill_kwargs=kwargs, compile="eager")
    assert torch.equal(got, expected)
    # Seeded sampling draws the same tokens.
    sampled = [wand.generate(model, ids, prefix, WINDOW, STEPS, attention_mask=mask, prefill_kwargs=kwargs,
                             do_sample=True, temperature=0.9, top_k=30, top_p=0.95, compile=mode,
                             generator=torch.Generator().manual_seed(11)) for mode in (False, "eager")]
    assert torch.equal(sampled[0], sampled[1])


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", MODELS)
def test_compiled_static_steps_equal_the_default_path(name):
    """torch.compile of the static step (inductor, CPU): same greedy and seeded sampled tokens; the
    graphs compiled for the first two steps are all that the next 18 need (no recompilation per step)."""
    import torch._dynamo.utils as dynamo_utils

    model, ids, mask, prefix, kwargs = batch_of_three(name)
    expected = wand.generate(model, ids, prefix, WINDOW, STEPS, attention_mask=mask, prefill_kwargs=kwargs)
    graphs = []
    for steps in (3, STEPS):
        torch._dynamo.reset()
        dynamo_utils.counters.clear()
        got = wand.generate(model, ids, prefix, WINDOW, steps, attention_mask=mask, prefill_kwargs=kwargs, compile=True)
        graphs.append(dynamo_utils.counters["stats"]["unique_graphs"])
    assert torch.equal(got, expected)
    assert graphs[0] >= 1 and graphs[1] == graphs[0], graphs
    # Seeded sampling too: the pick runs after the compiled step, from the same random stream.
    sampled = [wand.generate(model, ids, prefix, WINDOW, STEPS, attention_mask=mask, prefill_kwargs=kwargs,
                             do_sample=True, temperature=0.9, top_k=30, top_p=0.95, compile=mode,
                             generator=torch.Generator().manual_seed(11)) for mode in (False, True)]
    assert torch.equal(sampled[0], sampled[1])


def test_per_sample_stop_ids_match_the_default_path():
    model, ids, mask, prefix, _ = batch_of_three("qwen2")
    free = wand.generate(model, ids, prefix, WINDOW, 60, attention_mask=mask)
    width = ids.shape[1]
    # Stop ids that end samples at different steps, and the last one late (past a stop check).
    stops = [int(free[0, width + 3]), int(free[1, width + 40])]
    expected = wand.generate(model, ids, prefix, WINDOW, 60, attention_mask=mask, eos_token_id=stops, pad_token_id=VOCAB - 1)
    got = wand.generate(model, ids, prefix, WINDOW, 60, attention_mask=mask, eos_token_id=stops, pad_token_id=VOCAB - 1,
                        compile="eager")
    assert torch.equal(got, expected)
    assert got.shape[1] <= width + 60


def test_bad_static_requests_name_the_problem():
    model, ids, mask, prefix, _ = batch_of_three("qwen2")
    with pytest.raises(ValueError, match="full attention"):
        wand.generate(model, ids, prefix, None, 4, attention_mask=mask, compile=True)
    with pytest.raises(ValueError, match="compile must be"):
        wand.generate(model, ids, prefix, WINDOW, 4, attention_mask=mask, compile="fast")
    for mode in ("graph", "compile-graph"):
        with pytest.raises(ValueError, match=f"mode='{mode}' captures a CUDA graph; the cache is on cpu"):
            wand.generate(model, ids, prefix, WINDOW, 4, attention_mask=mask, compile=mode)
    flex = wand.enable_wand(tiny_model("qwen2"), WINDOW, backend="flex")
    with pytest.raises(ValueError, match="needs dense attention .* 'wand_flex'"):
        wand.generate(flex, ids, prefix, WINDOW, 4, attention_mask=mask, compile=True)
    with pytest.raises(ValueError, match="enable_wand"):
        StaticDecoder(tiny_model("qwen2"), wand.WandCache(prefix, WINDOW))
    with pytest.raises(ValueError, match="after a prefill"):
        StaticDecoder(model, wand.WandCache(prefix, WINDOW))


def test_static_steps_at_batch_256_equal_the_default_path():
    gen = torch.Generator().manual_seed(5)
    lengths = torch.randint(3, 12, (256,), generator=gen)
    rows = [torch.randint(0, VOCAB, (int(n),), generator=gen) for n in lengths]
    ids, mask = left_padded(rows, 0)
    prefix = (lengths - torch.randint(0, 3, (256,), generator=gen)).clamp(min=1)
    model = wand.enable_wand(tiny_model("llama"), WINDOW)
    expected = wand.generate(model, ids, prefix, WINDOW, STEPS, attention_mask=mask)
    assert torch.equal(wand.generate(model, ids, prefix, WINDOW, STEPS, attention_mask=mask, compile="eager"), expected)


def continue_eagerly(model, tokens, mask, prefix, cache, steps: int) -> torch.Tensor:
    """Greedy eager steps from a returned cache (the caller's own loop): the continuation's tokens."""
    cache_kw = cache_kwarg_name(model)
    out = []
    step_input, mask = tokens[:, -1:], torch.cat([mask, torch.ones_like(tokens[:, -1:])], -1)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=step_input, attention_mask=mask, prefix_lengths=prefix, window=WINDOW,
                           use_cache=True, **{cache_kw: cache}).logits[:, -1]
            step_input = logits.argmax(-1, keepdim=True)
            out.append(step_input)
            mask = torch.cat([mask, torch.ones_like(step_input)], -1)
    return torch.cat(out, -1)


BOOKKEEPING = ("_next_position", "_ring_columns_written", "_columns_seen", "num_prefix", "key_positions", "key_valid")


@pytest.mark.parametrize("name", ["qwen2", "gpt2"])
def test_a_cache_returned_by_the_static_path_continues_like_the_eager_one(name):
    """generate(compile=..., return_cache=True) hands back a cache whose bookkeeping equals the eager
    path's (the static steps' positions, ring columns and columns seen written back), so decoding on
    from it gives the eager path's tokens; with a stop id the static path stops where eager stops."""
    model, ids, mask, prefix, kwargs = batch_of_three(name)
    third = wand.generate(model, ids, prefix, WINDOW, 3, attention_mask=mask, prefill_kwargs=kwargs)[:, -1]
    for eos in (None, sorted(set(third.tolist()))):  # no stop; every sample stops by its third token (or before)
        runs = {}
        for mode in (False, "eager"):
            tokens, cache = wand.generate(model, ids, prefix, WINDOW, 2 * WINDOW + 1, attention_mask=mask,
                                          prefill_kwargs=kwargs, eos_token_id=eos, return_cache=True, compile=mode)
            grown = torch.cat([mask, torch.ones_like(tokens[:, ids.shape[1]:-1])], -1)
            runs[mode] = (tokens, cache, continue_eagerly(model, tokens, grown, prefix, cache, 3 * WINDOW))
        (eager_tokens, eager_cache, eager_next), (static_tokens, static_cache, static_next) = runs[False], runs["eager"]
        assert torch.equal(static_tokens, eager_tokens)
        assert static_tokens.shape[1] - ids.shape[1] <= (3 if eos else 2 * WINDOW + 1)
        for field in BOOKKEEPING:
            a, b = getattr(eager_cache, field), getattr(static_cache, field)
            assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), (eos, field, a, b)
        for eager_layer, static_layer in zip(eager_cache.layers, static_cache.layers):
            torch.testing.assert_close(static_layer.keys, eager_layer.keys, rtol=0, atol=1e-6)
        assert torch.equal(static_next, eager_next), eos


def test_a_static_step_with_a_masked_sample_advances_only_the_valid_ones():
    """An eager decode step whose attention_mask hides one sample's new column leaves that sample's
    position where it was and marks the slot invalid; the static step given the same ``valid`` does
    the same, and the valid samples' logits agree, on that step and the next ones."""
    model, ids, mask, prefix, kwargs = batch_of_three("qwen2")
    caches = [wand.WandCache(prefix, WINDOW) for _ in range(2)]
    cache_kw = cache_kwarg_name(model)
    with torch.no_grad():
        for cache in caches:
            first = model(input_ids=ids, attention_mask=mask, prefix_lengths=prefix, window=WINDOW, use_cache=True,
                          **{cache_kw: cache}, **kwargs).logits[:, -1]
    decoder = StaticDecoder(model, caches[1], "eager")
    token, grown = first.argmax(-1), mask
    valid_per_step = [torch.tensor([True, False, True]), torch.tensor([True, True, True]),
                      torch.tensor([False, True, True]), torch.tensor([True, True, True])]
    for valid in valid_per_step * 2:
        grown = torch.cat([grown, valid.long().view(-1, 1)], -1)
        with torch.no_grad():
            eager = model(input_ids=token.view(-1, 1), attention_mask=grown, prefix_lengths=prefix, window=WINDOW,
                          use_cache=True, **{cache_kw: caches[0]}).logits[:, -1]
        static = decoder.step(token, valid)
        torch.testing.assert_close(static[valid], eager[valid], rtol=0, atol=1e-5)
        token = eager.argmax(-1)
    decoder.sync_cache()
    for field in BOOKKEEPING:
        a, b = getattr(caches[0], field), getattr(caches[1], field)
        assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), (field, a, b)


def full_prefix_pair(name):
    """Two samples with the same full prefix and no padding (the shared batch's first row, twice)."""
    model, ids, mask, prefix, kwargs = batch_of_three(name)
    assert bool(mask[0].all())
    ids = ids[:1].repeat(2, 1)
    ids[1, -1] = ids[0, -2]
    kwargs = {k: v[:1].repeat(2, *[1] * (v.dim() - 1)) for k, v in kwargs.items()}
    return model, ids, prefix[:1].repeat(2), kwargs


@pytest.mark.parametrize("name", MODELS)
def test_once_the_ring_is_full_the_step_builds_no_mask_and_decodes_the_same(name):
    """Full prefixes, every column valid: from the W-th step on every slot is visible, so the step
    builds no mask (a zero mask made once), with the default path's tokens, greedy and sampled."""
    model, ids, prefix, kwargs = full_prefix_pair(name)
    for sampling in ({}, {"do_sample": True, "temperature": 0.9, "top_k": 30}):
        runs = [wand.generate(model, ids, prefix, WINDOW, STEPS, prefill_kwargs=kwargs, compile=mode,
                              generator=torch.Generator().manual_seed(5), **sampling) for mode in (False, "eager")]
        assert torch.equal(runs[0], runs[1])


def test_the_maskless_step_starts_after_w_clean_steps_and_launches_fewer_operators():
    from wand.profiling import launches_per_step

    model, ids, prefix, _ = full_prefix_pair("qwen2")
    cache = wand.WandCache(prefix, WINDOW)
    with torch.no_grad():
        logits = model(input_ids=ids, prefix_lengths=prefix, use_cache=True, cache=cache).logits[:, -1]
    decoder = StaticDecoder(model, cache, "eager")
    forms, ops, out = [], {}, {}

    def step(token, valid):
        out["logits"] = decoder.step(token, valid)

    for index in range(3 * WINDOW):
        valid = torch.tensor([True, True]) if index == WINDOW else None  # a given valid restarts the count
        count = launches_per_step(step, logits.argmax(-1), valid, device=torch.device("cpu"))["aten_ops"]
        logits = out["logits"]
        forms.append(decoder._all_visible())
        ops.setdefault(forms[-1], set()).add(count)
    assert forms == [False] * (WINDOW - 1) + [True] + [False] * WINDOW + [True] * WINDOW
    assert len(ops[True]) == 1 and max(ops[True]) + 10 <= min(ops[False]), ops  # the mask's ~17 operators gone
    # A left-padded batch with three prefix lengths always builds its mask.
    model, ids, mask, prefix, _ = batch_of_three("qwen2")
    cache = wand.WandCache(prefix, WINDOW)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, prefix_lengths=prefix, use_cache=True, cache=cache)
    assert not StaticDecoder(model, cache, "eager")._prefix_full


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_compiled_maskless_step_decodes_the_same():
    model, ids, prefix, kwargs = full_prefix_pair("qwen2")
    expected = wand.generate(model, ids, prefix, WINDOW, STEPS, prefill_kwargs=kwargs)
    assert torch.equal(wand.generate(model, ids, prefix, WINDOW, STEPS, prefill_kwargs=kwargs, compile=True), expected)
