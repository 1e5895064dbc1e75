"""What a decode step costs at least, and what stops it being captured: a step that a CUDA graph
captures must read nothing back from the device. Checked here on the CPU by dispatch
(``wand.profiling.host_reads``), with the TTS wrappers' one-token id checks on the device as they are
on CUDA (``wand.models.spec.device_side_id_checks``); the CUDA-side check is
``tests/method/test_cuda.py::test_a_decode_step_never_waits_for_the_device``. And the weight bytes a
step must read (``wand.profiling.weight_read_bytes``), the serving benchmark's floor."""

import pytest
import torch

import wand
from conftest import tiny_model
from helpers import batch_of_three
from wand.models.spec import device_side_id_checks
from wand.profiling import copy_bandwidth, host_reads, weight_read_bytes
from wand.static import StaticDecoder

WINDOW = 4


def test_the_detector_sees_scalar_reads_and_data_dependent_shapes():
    t = torch.tensor([0.0, 2.0, 3.0])
    assert host_reads(lambda: float(t.sum())) == {"_local_scalar_dense": 1}
    assert host_reads(lambda: bool((t > 1).any())) == {"_local_scalar_dense": 1}
    assert host_reads(lambda: t[t > 1]) == {"index.Tensor (boolean mask)": 1}
    assert host_reads(lambda: t[torch.tensor([0, 2])]) == {}  # an index tensor: no read
    assert host_reads(lambda: (t > 1).nonzero()) == {"nonzero": 1}
    assert host_reads(lambda: torch.repeat_interleave(t, torch.tensor([1, 2, 0]))) == {"repeat_interleave.Tensor": 1}
    assert host_reads(lambda: (t * 2).exp().softmax(-1)) == {}


@pytest.mark.parametrize("name", ["qwen2", "llama", "gpt2", "cosyvoice2", "indextts"])
def test_a_static_decode_step_reads_nothing_back(name):
    """Both forms of the step (masked while the ring fills, then maskless) for every family, with
    left padding and three prefix lengths (the shared batch), and full prefixes."""
    build, ids, mask, prefix, kwargs = batch_of_three(name)
    model = wand.enable_wand(build(), WINDOW)
    cache = wand.WandCache(prefix, WINDOW)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, prefix_lengths=prefix, use_cache=True, cache=cache, **kwargs)
    decoder = StaticDecoder(model, cache, "eager")
    token = out.logits[:, -1].argmax(-1)
    with device_side_id_checks():
        for _ in range(WINDOW + 2):
            assert host_reads(decoder.step, token) == {}
    # Without the device-side id check the TTS wrappers do read their ids back on the CPU: the
    # detector sees what the model's own path does.
    reads = host_reads(decoder.step, token)
    assert set(reads) == ({"_local_scalar_dense"} if name in ("cosyvoice2", "indextts") else set()), reads


@pytest.mark.parametrize("family, looked_up", [("qwen2", ["model.embed_tokens"]), ("llama", []),
                                               ("gpt2", ["transformer.wpe"])])
def test_weight_read_bytes_counts_every_weight_once_but_lookup_tables(family, looked_up):
    """Qwen2 (untied): all but its input embedding; Llama (tied: the table is the head): everything;
    GPT-2 (tied token table, learned positions): all but the position table. Against the parameter
    count, which already counts a tied weight once."""
    model = tiny_model(family)
    if family == "llama":
        model.lm_head.weight = model.model.embed_tokens.weight
    modules = dict(model.named_modules())
    skipped = sum(modules[name].weight.numel() for name in looked_up)
    assert weight_read_bytes(model) == 4 * (sum(p.numel() for p in model.parameters()) - skipped)
    assert weight_read_bytes(model.to(torch.bfloat16)) == 2 * (sum(p.numel() for p in model.parameters()) - skipped)


def test_copy_bandwidth_is_measured():
    bandwidth = copy_bandwidth(torch.device("cpu"), nbytes=1 << 22, repeats=3)
    assert 1e8 < bandwidth < 1e13  # bytes/s: any real memory system
