"""WAND on a GPU equals WAND on the CPU: forwards, greedy decoding (ours, transformers', and the static
path captured as a CUDA graph, fused projections and norms too; sampling inside the graph equals the
eager step's), FlexAttention gradients (K/V heads grouped or repeated), one compile per length bucket, and a decode
step that never waits for the device.

    make gpu-check                                   # these tests + the GPU benchmarks, on one GPU
    .venv/bin/python -m pytest -m cuda tests/method/test_cuda.py

Needs only torch and transformers (a bare GPU box has no ray, mlflow or deepspeed). Without a GPU
every test here is reported as skipped ("no CUDA device"), never as passed.
WAND_TEST_DEVICE=cpu runs the same code against the CPU reference (a dry run of this file, not a
GPU check).
"""

import os

import pytest
import torch

import wand
from conftest import VOCAB, tiny_model
from helpers import batch_of_three, left_padded

DEVICE = os.environ.get("WAND_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device"),
]


@pytest.fixture(autouse=True)
def exact_fp32():
    """Full fp32 matmuls on the GPU (no TF32), so the CPU reference is comparable at 1e-4."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def on(device, *tensors):
    return [t.to(device) for t in tensors]


@pytest.mark.parametrize("family", ["qwen2", "llama", "gpt2"])
@pytest.mark.parametrize("tau", [None, 0.9])
def test_forward_on_device_equals_cpu(family, tau):
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 33:] = 0  # right padding in a training batch
    prefix = torch.tensor([5, 12])
    cpu = wand.enable_wand(tiny_model(family), 6)
    dev = wand.enable_wand(tiny_model(family).to(DEVICE), 6)
    with torch.no_grad():
        expected = cpu(input_ids=ids, attention_mask=mask, prefix_lengths=prefix, tau=tau).logits
        got = dev(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE), prefix_lengths=prefix.to(DEVICE),
                  tau=tau).logits
    torch.testing.assert_close(got.cpu()[mask.bool()], expected[mask.bool()], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["qwen2", "llama", "gpt2", "cosyvoice2", "indextts"])
def test_greedy_generate_on_device_equals_cpu(name):
    build, ids, mask, prefix, kwargs = batch_of_three(name)
    window, steps = 4, 30
    expected = wand.generate(wand.enable_wand(build(), window), ids, prefix, window, steps, attention_mask=mask,
                             prefill_kwargs=kwargs)
    model = wand.enable_wand(build().to(DEVICE), window)
    ids_d, mask_d = on(DEVICE, ids, mask)
    kwargs_d = {k: v.to(DEVICE) for k, v in kwargs.items()}
    # Prefix lengths on the device and on the host: the cache takes either.
    for prefix_arg in (prefix.to(DEVICE), prefix):
        got = wand.generate(model, ids_d, prefix_arg, window, steps, attention_mask=mask_d, prefill_kwargs=kwargs_d)
        assert got.device.type == torch.device(DEVICE).type
        assert torch.equal(got.cpu(), expected)


def test_transformers_generate_with_a_wand_cache_on_device():
    build, ids, mask, prefix, _ = batch_of_three("qwen2")
    expected = wand.generate(wand.enable_wand(build(), 4), ids, prefix, 4, 20, attention_mask=mask)
    model = wand.enable_wand(build().to(DEVICE), 4)
    ids_d, mask_d = on(DEVICE, ids, mask)
    got = model.generate(input_ids=ids_d, attention_mask=mask_d, cache=wand.WandCache(prefix, 4),
                         max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(got.cpu(), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="sync detection needs CUDA")
def test_a_decode_step_never_waits_for_the_device():
    """torch.cuda.set_sync_debug_mode('error') raises on any host-device synchronisation: a decode
    step (plan, mask, forward, cache write) must not make one."""
    build, ids, mask, prefix, _ = batch_of_three("qwen2")
    model = wand.enable_wand(build().to("cuda"), 4)
    cache = wand.WandCache(prefix.cuda(), 4)
    ids, mask = on("cuda", ids, mask)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)  # prefill may read back
        token = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(12):  # past W: ring slots wrap
                mask = torch.cat([mask, torch.ones_like(token)], -1)
                out = model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def assert_flex_gradients_equal_dense_ones(family: str, tau: float | None) -> None:
    ids = torch.randint(0, VOCAB, (2, 150), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    prefix = torch.tensor([20, 37], device=DEVICE)
    grads = {}
    for backend in ("sdpa", "flex"):
        # Head size 16: the compiled FlexAttention kernel on CUDA needs at least that.
        # eval(): no dropout (GPT-2's attention dropout would draw different masks on the two paths);
        # gradients flow all the same.
        model = wand.enable_wand(tiny_model(family, hidden=64).to(DEVICE).eval(), 16, backend=backend)
        loss = model(input_ids=ids, prefix_lengths=prefix, tau=tau).logits.float().square().mean()
        loss.backward()
        grads[backend] = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["flex"].keys() == grads["sdpa"].keys() and len(grads["sdpa"]) > 10
    for name, grad in grads["sdpa"].items():
        torch.testing.assert_close(grads["flex"][name], grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.skipif(DEVICE == "cpu", reason="FlexAttention has no CPU backward")
@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
@pytest.mark.parametrize("tau", [None, 1.5, 1e3])
def test_flex_gradients_equal_dense_mask_gradients(family, tau):
    """Training fwd+bwd: FlexAttention (compiled on CUDA, GQA through enable_gqa, length padded to
    its bucket) gives the dense-mask SDPA gradients; at tau 1e3 (wand.masks.HARD_TAU) Flex runs the
    hard, sparse BlockMask while the dense path keeps the soft form's -tau."""
    assert_flex_gradients_equal_dense_ones(family, tau)


@pytest.mark.skipif(DEVICE == "cpu", reason="FlexAttention has no CPU backward")
@pytest.mark.parametrize("tau", [None, 1.5])
def test_flex_gradients_with_repeated_kv_heads_equal_dense_mask_gradients(tau, monkeypatch):
    """WAND_FLEX_GQA=repeat (K/V repeated per query head before Flex): the same gradients; the
    repeated K/V's gradients are summed back onto the K/V projections by autograd."""
    monkeypatch.setenv("WAND_FLEX_GQA", "repeat")
    assert_flex_gradients_equal_dense_ones("qwen2", tau)


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_compiled_flex_compiles_once_per_bucket_on_device(family, monkeypatch):
    from test_flex_compile import run_curriculum

    monkeypatch.setenv("WAND_FLEX_COMPILE", "1")
    result = run_curriculum(family, DEVICE)
    assert result["per_bucket"] == {128: 2, 256: 2, 384: 2}, result["per_bucket"]


@pytest.mark.parametrize("name", ["qwen2", "llama", "gpt2", "cosyvoice2", "indextts"])
def test_static_decoding_on_device_equals_cpu(name):
    """wand.generate(compile=True): a CUDA graph of the static step on CUDA (torch.compile on CPU),
    greedy over 5 x W steps, against the CPU's default path."""
    build, ids, mask, prefix, kwargs = batch_of_three(name)
    window, steps = 4, 20
    expected = wand.generate(wand.enable_wand(build(), window), ids, prefix, window, steps, attention_mask=mask,
                             prefill_kwargs=kwargs)
    model = wand.enable_wand(build().to(DEVICE), window)
    kwargs_d = {k: v.to(DEVICE) for k, v in kwargs.items()}
    got = wand.generate(model, ids.to(DEVICE), prefix, window, steps, attention_mask=mask.to(DEVICE),
                        prefill_kwargs=kwargs_d, compile=True)
    assert torch.equal(got.cpu(), expected)


@pytest.mark.skipif(DEVICE == "cpu", reason="a CUDA graph needs CUDA")
def test_compiled_and_captured_static_decoding_on_device_equals_cpu():
    """compile="compile-graph": the torch.compile'd step captured as the CUDA graph (inductor's
    kernels, compiled in the warm-up step); full prefixes, so both forms (masked, then maskless from
    the W-th step) are compiled and captured; tokens equal the CPU's default path."""
    from test_static import full_prefix_pair

    model, ids, prefix, kwargs = full_prefix_pair("cosyvoice2")
    window, steps = 4, 20
    expected = wand.generate(model, ids, prefix, window, steps, prefill_kwargs=kwargs)
    kwargs_d = {k: v.to(DEVICE) for k, v in kwargs.items()}
    got = wand.generate(model.to(DEVICE), ids.to(DEVICE), prefix, window, steps, prefill_kwargs=kwargs_d,
                        compile="compile-graph")
    assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("name", ["qwen2", "gpt2", "cosyvoice2", "indextts"])
def test_maskless_static_decoding_on_device_equals_cpu(name):
    """Full prefixes, no padding: from the W-th step the captured graph is the maskless form (a second
    CUDA graph, captured mid-decode); tokens equal the CPU's default path."""
    from test_static import full_prefix_pair

    model, ids, prefix, kwargs = full_prefix_pair(name)
    window = 4
    expected = wand.generate(model, ids, prefix, window, 20, prefill_kwargs=kwargs)
    model = model.to(DEVICE)
    got = wand.generate(model, ids.to(DEVICE), prefix, window, 20, compile=True,
                        prefill_kwargs={k: v.to(DEVICE) for k, v in kwargs.items()})
    assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("name", ["cosyvoice2", "llama"])
def test_fused_projections_in_the_captured_step_decode_the_cpu_tokens(name):
    """wand.fuse_projections (Q/K/V and gate/up as one matmul each; Qwen2 with biases, Llama without)
    and wand.fuse_norms (torch.rms_norm: its CUDA kernel), fused on the device, then both graph forms
    (masked, maskless from the W-th step): tokens equal the CPU's unfused default path."""
    from test_static import full_prefix_pair

    model, ids, prefix, kwargs = full_prefix_pair(name)
    expected = wand.generate(model, ids, prefix, 4, 20, prefill_kwargs=kwargs)
    model = model.to(DEVICE)
    assert wand.fuse_projections(model) > 0 and wand.fuse_norms(model) > 0
    got = wand.generate(model, ids.to(DEVICE), prefix, 4, 20, compile=True,
                        prefill_kwargs={k: v.to(DEVICE) for k, v in kwargs.items()})
    assert torch.equal(got.cpu(), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA graph needs CUDA")
def test_sampling_inside_the_captured_step_draws_the_eager_steps_tokens_without_a_sync():
    """The draw (temperature, top-k, top-p) and the stop ids inside the CUDA graph, both forms: with a
    CUDA generator of one seed (registered with the graph), or the default one seeded, the captured
    path samples the eager static path's tokens; and the eager picking step runs under
    set_sync_debug_mode('error'), where torch.multinomial's host-side check would raise."""
    from test_static import full_prefix_pair
    from wand.sampling import Sampling
    from wand.static import StaticDecoder

    model, ids, prefix, kwargs = full_prefix_pair("cosyvoice2")
    model, ids, kwargs = model.to("cuda"), ids.cuda(), {k: v.cuda() for k, v in kwargs.items()}
    settings = dict(do_sample=True, temperature=0.9, top_k=30, top_p=0.95, prefill_kwargs=kwargs)

    def run(mode, own_generator, **stop):
        torch.manual_seed(7)
        generator = torch.Generator("cuda").manual_seed(7) if own_generator else None
        return wand.generate(model, ids, prefix, 4, 20, compile=mode, generator=generator, **settings, **stop)

    for own in (True, False):
        free = run("eager", own)
        assert torch.equal(run("graph", own), free)
        stop = {"eos_token_id": int(free[1, ids.shape[1] + 6]), "pad_token_id": 0}  # sample 1 stops at step 6
        assert torch.equal(run("graph", own, **stop), run("eager", own, **stop))
    cache = wand.WandCache(prefix.cuda(), 4)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=True, cache=cache, **kwargs).logits[:, -1]
    decoder = StaticDecoder(model, cache, "eager", sampling=Sampling(True, 0.9, 30, 0.95),
                            stop_ids=torch.tensor([5]), pad_token_id=0)
    decoder.pick(logits)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(12):  # both forms: masked, then maskless from the W-th step
            decoder.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_static_decoding_at_batch_256_equals_the_default_path():
    gen = torch.Generator().manual_seed(5)
    lengths = torch.randint(3, 12, (256,), generator=gen)
    ids, mask = left_padded([torch.randint(0, VOCAB, (int(n),), generator=gen) for n in lengths], 0)
    prefix = (lengths - torch.randint(0, 3, (256,), generator=gen)).clamp(min=1)
    model = wand.enable_wand(tiny_model("qwen2").to(DEVICE), 4)
    ids, mask = on(DEVICE, ids, mask)
    expected = wand.generate(model, ids, prefix, 4, 24, attention_mask=mask)
    got = wand.generate(model, ids, prefix, 4, 24, attention_mask=mask, compile=True)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", ["cosyvoice2", "indextts", "sparktts"])
def test_teacher_training_on_device_follows_the_cpu_and_comes_back_to_it(name):
    """jobs/train_teachers.py on a GPU: the teacher loop (pipeline/synthetic/teachers.py) trains on the
    device and returns the model on the CPU; same seed, same batches: its weights follow the CPU
    run's (fp32 without TF32: 20 AdamW steps apart only by rounding, far less than training moved them)."""
    from pipeline.synthetic.law import synthetic_rows
    from pipeline.synthetic.teachers import teacher_forced_accuracy, train_teacher
    from wand.models import get_spec

    spec = get_spec(name, "tiny")
    rows = synthetic_rows(spec, 32, seed=0, min_text=4, max_text=10)
    held = synthetic_rows(spec, 4, seed=1, min_text=4, max_text=10, split="heldout")
    runs = {}
    for device in ("cpu", DEVICE):
        seen = []
        model, curve = train_teacher(spec, [(rows, 20, 4)], lr=3e-3, log_every=0, curve_every=10, device=device,
                                     curve=lambda m: seen.append(next(m.parameters()).device.type) or
                                     {"accuracy": teacher_forced_accuracy(spec, m, held)["accuracy"]})
        assert set(seen) == {torch.device(device).type}  # the curve is measured where it trains
        assert all(p.device.type == "cpu" for p in model.parameters())
        runs[device] = (model, curve)
    (cpu, cpu_curve), (dev, dev_curve) = runs["cpu"], runs[DEVICE]
    assert [p["step"] for p in dev_curve] == [p["step"] for p in cpu_curve] == [10, 20]
    torch.manual_seed(0)  # train_teacher's seed: the same initial weights
    start = spec.build().state_dict()
    moved = max(float((cpu.state_dict()[k] - v).abs().max()) for k, v in start.items() if v.is_floating_point())
    apart = max(float((dev.state_dict()[k] - cpu.state_dict()[k]).abs().max()) for k in start
                if start[k].is_floating_point())
    assert moved > 1e-3 and apart < 0.1 * moved, (apart, moved)
    assert teacher_forced_accuracy(spec, dev, held)["accuracy"] == pytest.approx(cpu_curve[-1]["accuracy"], abs=0.05)
