"""Compiled FlexAttention compiles once per length bucket for a whole curriculum (W 128 -> 32, tau
changing), not once per W or per batch length; and the padded, compiled path equals the dense mask.

Runs the compiled path on the CPU (inductor's C++ backend; WAND_FLEX_COMPILE=1) so CI checks it;
the same test runs on CUDA in `make gpu-check` (tests/method/test_cuda.py)."""

import pytest
import torch

import wand
from conftest import VOCAB, tiny_model
from wand.patch import flex_bucket


def compiles() -> int:
    import torch._dynamo.utils as dynamo_utils

    return dynamo_utils.counters["stats"]["unique_graphs"]


def run_curriculum(family: str, device: str) -> dict:
    """Forwards over three lengths (two in one bucket) and a shrinking window at each; returns the
    number of new compiled graphs per bucket, and the compiled logits of one (L, W) for a check."""
    torch._dynamo.reset()
    import torch._dynamo.utils as dynamo_utils

    dynamo_utils.counters.clear()
    model = wand.enable_wand(tiny_model(family, "sdpa", hidden=64).to(device), 128, backend="flex")
    per_bucket: dict[int, int] = {}
    prefix = torch.tensor([20, 37], device=device)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for length in (100, 120, 180, 300):
            ids = torch.randint(0, VOCAB, (2, length), generator=gen).to(device)
            before = compiles()
            for window in range(128, 31, -16):  # the hard curriculum: a new W every step
                model(input_ids=ids, prefix_lengths=prefix, window=window)
            for tau in (0.5, 2.0, 8.0):  # the soft form: a new tau every step
                model(input_ids=ids, prefix_lengths=prefix, window=32, tau=tau)
            bucket = flex_bucket(length)
            per_bucket[bucket] = per_bucket.get(bucket, 0) + compiles() - before
        checked = model(input_ids=ids, prefix_lengths=prefix, window=48).logits
    return {"per_bucket": per_bucket, "ids": ids, "prefix": prefix, "logits": checked}


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_compiled_flex_compiles_once_per_bucket_over_a_curriculum(family, monkeypatch):
    monkeypatch.setenv("WAND_FLEX_COMPILE", "1")
    result = run_curriculum(family, "cpu")
    # 100 and 120 share the 128 bucket; 180 -> 256; 300 -> 384. Per bucket: one graph for the hard
    # mask (every W) and one for the soft form (every tau), never one per W, tau or length.
    assert result["per_bucket"] == {128: 2, 256: 2, 384: 2}, result["per_bucket"]
    with torch.no_grad():
        dense = wand.enable_wand(tiny_model(family, "sdpa", hidden=64), 48)(
            input_ids=result["ids"], prefix_lengths=result["prefix"]).logits
    torch.testing.assert_close(result["logits"], dense, atol=1e-4, rtol=0)


def test_flex_bucket():
    assert [flex_bucket(n) for n in (1, 127, 128, 129, 300)] == [128, 128, 128, 256, 384]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compiled_flex_stays_fused_past_torchs_recompile_limit_or_fails_loudly(monkeypatch):
    """Past torch's recompile limit dynamo would run FlexAttention eagerly (the whole score matrix),
    silently: with the limit lowered to 1, every new (batch, bucket) variant must still compile, and
    with WAND's own limit reached the forward must raise, naming the setting."""
    monkeypatch.setenv("WAND_FLEX_COMPILE", "1")
    # torch's own patch, not monkeypatch: undoing a monkeypatch deletes the attribute, and torch's
    # config module then hides the setting from every later caller.
    with torch._dynamo.config.patch(recompile_limit=1):
        check_fused_or_loud(monkeypatch)


def check_fused_or_loud(monkeypatch):
    import torch._dynamo.utils as dynamo_utils

    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    model = wand.enable_wand(tiny_model("qwen2", "sdpa", hidden=64), 8, backend="flex")
    gen = torch.Generator().manual_seed(1)

    def forward(batch: int, length: int):
        ids = torch.randint(0, VOCAB, (batch, length), generator=gen)
        with torch.no_grad():
            return model(input_ids=ids, prefix_lengths=torch.full((batch,), 12), window=8).logits

    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch.nn.attention.flex_attention import flex_attention

    for count, (batch, length) in enumerate(((1, 100), (2, 100), (1, 200)), 1):  # three variants, limit 1
        forward(batch, length)
        # One compiled entry per variant on flex_attention's frame (dynamo's eager fallback adds none).
        entries = len(_debug_get_cache_entry_list(flex_attention.__code__))
        assert entries == count, f"batch {batch}, length {length}: {entries} compiled variants, so it ran unfused"
    monkeypatch.setenv("WAND_FLEX_RECOMPILE_LIMIT", "1")
    torch._dynamo.reset()
    forward(1, 100)
    with pytest.raises(RuntimeError, match="recompile limit .*WAND_FLEX_RECOMPILE_LIMIT"):
        forward(2, 100)
    torch._dynamo.reset()
