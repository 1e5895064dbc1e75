"""wand.fuse_projections: Q/K/V and gate/up as one matmul each for decoding (and wand.fuse_norms:
RMSNorm through torch.rms_norm, bit for bit on the CPU). Checked against an
unfused copy of the same model (logits, greedy and sampled tokens, gradients), against each member's
own F.linear whatever order the members are called in, and by counting the matmuls one static decode
step dispatches (three fewer per layer, the number derived from the model's layers)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import wand
from helpers import batch_of_three
from wand.fuse import FUSED_GROUPS, FUSED_NORMS, is_fused
from wand.generation import cache_kwarg_name
from wand.static import StaticDecoder

WINDOW = 4
STEPS = 12
FUSABLE = ["qwen2", "llama", "cosyvoice2", "sparktts"]


def models(name):
    """(unfused model, fused copy, ids, mask, prefix, kwargs), both with WAND at WINDOW."""
    build, ids, mask, prefix, kwargs = batch_of_three(name)
    plain = wand.enable_wand(build(), WINDOW)
    fused = copy.deepcopy(plain)
    return plain, fused, ids, mask, prefix, kwargs


def layers_of(model) -> int:
    return sum(1 for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "k_proj"))


@pytest.mark.parametrize("name", FUSABLE)
def test_fused_model_decodes_the_unfused_tokens(name):
    plain, fused, ids, mask, prefix, kwargs = models(name)
    assert wand.fuse_projections(fused) == len(FUSED_GROUPS) * layers_of(plain) > 0
    assert is_fused(fused) and not is_fused(plain)
    assert wand.fuse_projections(fused) == 0  # fused already: nothing more to do
    with torch.no_grad():
        run = dict(input_ids=ids, attention_mask=mask, prefix_lengths=prefix, window=WINDOW, **kwargs)
        torch.testing.assert_close(fused(**run).logits, plain(**run).logits, rtol=1e-5, atol=1e-5)
    expected = wand.generate(plain, ids, prefix, WINDOW, STEPS, attention_mask=mask, prefill_kwargs=kwargs)
    for mode in (False, "eager"):
        got = wand.generate(fused, ids, prefix, WINDOW, STEPS, attention_mask=mask, prefill_kwargs=kwargs,
                            compile=mode)
        assert torch.equal(got, expected), mode
    sampled = [wand.generate(model, ids, prefix, WINDOW, STEPS, attention_mask=mask, prefill_kwargs=kwargs,
                             do_sample=True, temperature=0.9, top_k=30, generator=torch.Generator().manual_seed(5),
                             compile="eager") for model in (plain, fused)]
    assert torch.equal(sampled[0], sampled[1])
    # The model keeps its parameter names and values, and no second copy of the weights.
    assert list(fused.state_dict()) == list(plain.state_dict())
    for (key, a), b in zip(fused.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), key
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in plain.parameters())


def test_gpt2_is_fused_already_and_left_alone():
    plain, fused, *_ = models("gpt2")
    assert wand.fuse_projections(fused) == 0 and wand.fuse_norms(fused) == 0 and not is_fused(fused)


def test_the_fused_norm_classes_are_those_of_the_fusable_models():
    """FUSED_NORMS names exactly the RMSNorm classes of the models the bit-for-bit test runs: none
    listed untested, none of a supported model left out."""
    found = {type(m).__name__ for name in FUSABLE for m in models(name)[0].modules()
             if type(m).__name__.endswith("RMSNorm")}
    assert found == set(FUSED_NORMS)


def norms_per_step(model, config) -> int:
    return 2 * config.num_hidden_layers + 1  # two per layer and the final one


@pytest.mark.parametrize("name", FUSABLE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norms_equal_transformers_norms_bit_for_bit(name, dtype):
    """torch.rms_norm with the original's casts: on the CPU the same ops, so the same bits; each
    step's norms go through aten::_fused_rms_norm (one kernel on CUDA), as many as the layers give."""
    from torch.profiler import profile

    plain, _, ids, mask, prefix, kwargs = models(name)
    torch.manual_seed(1)
    for module in plain.modules():  # norm weights away from their ones, so the weight product's rounding counts
        if type(module).__name__ in FUSED_NORMS:
            module.weight.data.uniform_(0.5, 1.5)
    plain = plain.to(dtype)
    fused = copy.deepcopy(plain)
    config = getattr(plain, "backbone", plain).config
    assert wand.fuse_norms(fused) == norms_per_step(plain, config)
    assert wand.fuse_norms(fused) == 0 and is_fused(fused)
    kwargs = {k: v.to(dtype) for k, v in kwargs.items()}
    with torch.no_grad():
        run = dict(input_ids=ids, attention_mask=mask, prefix_lengths=prefix, window=WINDOW, **kwargs)
        assert torch.equal(fused(**run).logits, plain(**run).logits)
    expected = wand.generate(plain, ids, prefix, WINDOW, STEPS, attention_mask=mask, prefill_kwargs=kwargs)
    got = wand.generate(fused, ids, prefix, WINDOW, STEPS, attention_mask=mask, prefill_kwargs=kwargs, compile="eager")
    assert torch.equal(got, expected)
    with profile() as prof, torch.no_grad():
        fused(input_ids=ids[:, :1], prefix_lengths=torch.ones(3, dtype=torch.long), window=WINDOW)
    assert sum(e.name == "aten::_fused_rms_norm" for e in prof.events()) == norms_per_step(plain, config)


class _Matmuls(TorchDispatchMode):
    NAMES = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.__name__.split(".")[0] in self.NAMES
        return func(*args, **(kwargs or {}))


def _step_matmuls(model, ids, mask, prefix, kwargs) -> int:
    cache = wand.WandCache(prefix, WINDOW)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, prefix_lengths=prefix, window=WINDOW, use_cache=True,
                    **{cache_kwarg_name(model): cache}, **kwargs)
    decoder = StaticDecoder(model, cache, "eager")
    with _Matmuls() as counter:
        decoder.step(out.logits[:, -1].argmax(-1))
    return counter.count


@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_a_fused_step_runs_three_fewer_matmuls_per_layer(name):
    plain, fused, ids, mask, prefix, kwargs = models(name)
    wand.fuse_projections(fused)
    before, after = _step_matmuls(plain, ids, mask, prefix, kwargs), _step_matmuls(fused, ids, mask, prefix, kwargs)
    # Q/K/V: three matmuls become one; gate/up: two become one.
    assert before - after == 3 * layers_of(plain), (before, after)
    # A deepcopy clones each parameter on its own: the copy is plain (no stale fused weight), and
    # fusing it again fuses it.
    clone = copy.deepcopy(fused)
    assert not is_fused(clone) and _step_matmuls(clone, ids, mask, prefix, kwargs) == before
    wand.fuse_projections(clone)
    assert _step_matmuls(clone, ids, mask, prefix, kwargs) == after


def test_members_called_in_any_order_on_any_inputs_return_their_own_projection():
    plain, fused, *_ = models("qwen2")
    wand.fuse_projections(fused)
    attn = fused.model.layers[0].self_attn
    x, y = torch.randn(2, 3, attn.q_proj.in_features), torch.randn(1, 1, attn.q_proj.in_features)
    calls = [(attn.k_proj, x), (attn.q_proj, y), (attn.q_proj, x), (attn.v_proj, x), (attn.v_proj, y),
             (attn.k_proj, x), (attn.k_proj, y)]
    with torch.no_grad():
        for member, inp in calls:
            torch.testing.assert_close(member(inp), F.linear(inp, member.weight, member.bias))
        attn.q_proj(x)
        assert attn.q_proj._wand_group.memo[0] is x  # kept for k_proj and v_proj
        x.add_(1.0)  # the same tensor changed in place: the fused output of its old values is not reused
        torch.testing.assert_close(attn.k_proj(x), F.linear(x, attn.k_proj.weight, attn.k_proj.bias))
        attn.v_proj(x), attn.q_proj(x)
    assert attn.q_proj._wand_group.memo is None  # every member read it: nothing held between steps


def test_training_loaded_weights_and_a_moved_model_stay_exact():
    plain, fused, ids, mask, prefix, _ = models("llama")
    wand.fuse_projections(fused)
    run = dict(input_ids=ids, attention_mask=mask, prefix_lengths=prefix, window=WINDOW)
    # Gradients: the members' own parameters get the unfused gradients.
    for model in (plain, fused):
        model.zero_grad()
        model(**run).logits.square().mean().backward()
    for (key, a), b in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=key)
    # An optimizer step and a load_state_dict write the members in place: the fused weights follow.
    for model in (plain, fused):
        torch.optim.SGD(model.parameters(), lr=0.5).step()
    with torch.no_grad():
        torch.testing.assert_close(fused(**run).logits, plain(**run).logits)
        other = {k: torch.randn_like(v) for k, v in plain.state_dict().items()}
        plain.load_state_dict(other)
        fused.load_state_dict(other)
        attn = fused.model.layers[1].self_attn
        assert torch.equal(attn.q_proj._wand_group.weight, torch.cat([attn.q_proj.weight, attn.k_proj.weight,
                                                                     attn.v_proj.weight]))
        # (randn weights: one matmul of three summed in another blocking differs by ~1e-5; stale is O(1))
        torch.testing.assert_close(fused(**run).logits, plain(**run).logits, rtol=1e-4, atol=1e-4)
        # Moved to another dtype, the members no longer alias the fused tensor: plain Linears again (so
        # not even a compiled step can read the old fused weight), the unfused results.
        plain.double(), fused.double()
        assert not is_fused(fused) and type(fused.model.layers[0].self_attn.q_proj) is torch.nn.Linear
        torch.testing.assert_close(fused(**run).logits, plain(**run).logits)
    # Loaded with assign=True (parameters replaced, not written): unfused too; in place: still fused.
    refused = copy.deepcopy(plain).float()
    wand.fuse_projections(refused)
    refused.load_state_dict(plain.float().state_dict())
    assert is_fused(refused)
    refused.load_state_dict({k: v.clone() for k, v in plain.state_dict().items()}, assign=True)
    assert not is_fused(refused)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_compiled_static_step_keeps_the_fused_matmuls():
    """torch.compile traces the shared fused output (dynamo follows the identity check): same tokens,
    and the traced graph holds three fewer linear calls per layer than the unfused model's."""
    plain, fused, ids, mask, prefix, kwargs = models("qwen2")
    wand.fuse_projections(fused)
    counts = {}
    for label, model in (("plain", plain), ("fused", fused)):
        linears = []

        def backend(gm, example_inputs, linears=linears):
            linears.append(sum(node.target in (F.linear, torch._C._nn.linear) for node in gm.graph.nodes))
            return gm.forward

        torch._dynamo.reset()
        cache = wand.WandCache(prefix, WINDOW)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, prefix_lengths=prefix, window=WINDOW, use_cache=True,
                  **{cache_kwarg_name(model): cache})
        decoder = StaticDecoder(model, cache, "eager")  # its step on its zero tokens, traced
        with torch.no_grad():
            logits = torch.compile(decoder._step, backend=backend)(True)
        counts[label] = (max(linears), logits)
    assert counts["plain"][0] - counts["fused"][0] == 3 * layers_of(plain), counts
    torch.testing.assert_close(counts["fused"][1], counts["plain"][1])
