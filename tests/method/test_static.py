"""The static decode path (wand.static.StaticDecoder, wand.generate(compile=...)) gives exactly the
default path's tokens: greedy and seeded sampling, batch 3 with left padding and three prefix
lengths, 5 x W steps, per-sample stop ids; eager and torch.compile'd (the CUDA-graph mode runs in
tests/method/test_cuda.py)."""

import pytest
import torch

import wand
from conftest import VOCAB, tiny_model
from helpers import batch_of_three as shared_batch, left_padded
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
    """torch.compile of the static step (inductor, CPU): same greedy tokens; the graphs compiled for
    the first two steps are all that the next 18 need (no recompilation per step)."""
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
    with pytest.raises(ValueError, match="CUDA graph"):
        wand.generate(model, ids, prefix, WINDOW, 4, attention_mask=mask, compile="graph")
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
