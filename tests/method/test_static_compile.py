"""The compiled static decode step (``wand.generate(compile="compile")``, the CPU default of
``compile=True``) across the shapes of a process's lifetime: new batch sizes and prefix lengths reuse
one graph with dynamic sizes instead of compiling per shape until dynamo's recompile limit turns the
step silently eager; reaching the (raised) limit is an error."""

import pytest
import torch

import wand
import wand.static
from conftest import VOCAB, tiny_model

WINDOW = 4
STEPS = 3 * WINDOW  # past W clean steps: both forms (masked, then maskless) run


def request(batch: int, prefix: int, seed: int):
    """(ids, prefix lengths): no padding, every prefix full, so the maskless form runs too."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, prefix + 3), generator=generator)
    return ids, torch.full((batch,), prefix)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_new_batch_sizes_and_prefix_lengths_reuse_the_compiled_step(fresh_dynamo):
    """Two shapes compile (the second with dynamic sizes); then four more shapes, two of them on a
    second model of the same class, run with recompilation forbidden and decode the eager tokens.
    With static shapes each of them was a new graph, and past the eighth the step ran eager."""
    models = [wand.enable_wand(tiny_model("qwen2", seed=seed), WINDOW) for seed in (0, 1)]
    for batch, prefix in ((2, 5), (3, 6)):
        ids, lengths = request(batch, prefix, seed=batch)
        assert torch.equal(wand.generate(models[0], ids, lengths, WINDOW, STEPS, compile="compile"),
                           wand.generate(models[0], ids, lengths, WINDOW, STEPS))
    for model, (batch, prefix) in zip(models + models, ((4, 7), (5, 9), (7, 5), (2, 12))):
        ids, lengths = request(batch, prefix, seed=batch + prefix)
        expected = wand.generate(model, ids, lengths, WINDOW, STEPS)
        with torch.compiler.set_stance("fail_on_recompile"):
            got = wand.generate(model, ids, lengths, WINDOW, STEPS, compile="compile")
        assert torch.equal(got, expected), (batch, prefix)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_reaching_the_recompile_limit_is_an_error_not_an_eager_step(fresh_dynamo, monkeypatch):
    """With the limit at 1 graph, the second form (maskless, after W clean steps) would be a second
    graph: the decode stops with an error that names the setting."""
    import torch._dynamo.config as dynamo_config

    monkeypatch.setattr(wand.static, "STATIC_RECOMPILE_LIMIT", 1)
    before = dynamo_config.recompile_limit
    model = wand.enable_wand(tiny_model("qwen2"), WINDOW)
    ids, lengths = request(2, 5, seed=0)
    # dynamo's own patch, not monkeypatch: undoing a monkeypatch on dynamo's config module deletes the
    # setting for the rest of the process (a later FlexAttention call then failed).
    with dynamo_config.patch(recompile_limit=1), pytest.raises(RuntimeError, match="STATIC_RECOMPILE_LIMIT"):
        wand.generate(model, ids, lengths, WINDOW, STEPS, compile="compile")
    assert dynamo_config.recompile_limit == before
