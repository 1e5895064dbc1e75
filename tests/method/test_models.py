"""Model specs: published checkpoint layouts, loading, prefix detection, WAND through each wrapper."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import wand
from helpers import make_row
from wand.models import MODEL_NAMES, WeightsNotFound, get_spec, kv_bytes_per_token

FIXTURE = json.loads((Path(__file__).parents[1] / "fixtures" / "checkpoint_keys.json").read_text())


def expected_keys(entry) -> dict[str, tuple]:
    keys = {k: tuple(v) for k, v in entry["global"].items()}
    for i in range(entry["num_layers"]):
        prefix = entry["layer_prefix"].format(i=i)
        keys.update({prefix + k: tuple(v) for k, v in entry["layer"].items()})
    return keys


def released_state_shapes(spec) -> dict[str, tuple]:
    """Keys and shapes of the real-size model as its released file stores them (meta device)."""
    with torch.device("meta"):
        model = spec.build()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if spec.config.get("tie_word_embeddings") and spec.family not in ("cosyvoice2",):
        shapes.pop("lm_head.weight", None)  # save_pretrained stores tied weights once
    return shapes


@pytest.mark.parametrize("name", sorted(FIXTURE))
def test_real_size_keys_and_shapes_match_published_checkpoint(name):
    assert released_state_shapes(get_spec(name, "real")) == expected_keys(FIXTURE[name])


@pytest.mark.parametrize(
    "name, kib", [("cosyvoice2", 12), ("sparktts", 12), ("indextts", 120), ("llasa-1b", 32),
                  ("llasa-3b", 112), ("llasa-8b", 128), ("orpheus-3b", 112)],
)
def test_kv_bytes_per_token(name, kib):
    spec = get_spec(name, "real")
    cfg = spec.backbone_config()
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or (getattr(cfg, "hidden_size", None) or cfg.n_embd) // heads
    assert kv_bytes_per_token(spec, torch.bfloat16) == 2 * layers * kv_heads * head_dim * 2 == kib * 1024


def test_registry_errors_list_the_names():
    with pytest.raises(ValueError, match="cosyvoice2.*indextts.*sparktts.*llasa-1b.*orpheus-3b"):
        get_spec("vall-e")
    with pytest.raises(ValueError, match="real, small, mini, tiny"):
        get_spec("cosyvoice2", size="huge")
    assert set(MODEL_NAMES) == {"cosyvoice2", "indextts", "sparktts", "llasa-1b", "llasa-3b", "llasa-8b", "orpheus-3b"}


# ----------------------------------------------------------------------------- token sequences
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_prefix_detection_on_hand_built_batches(name):
    spec = get_spec(name, "tiny")
    rows = [make_row(spec, 5, 3, 10, seed=1), make_row(spec, 9, 0, 4, seed=2), make_row(spec, 2, 7, 6, seed=3)]
    width = max(len(r) for r, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, (row, _) in enumerate(rows):
        ids[b, : len(row)] = row
        mask[b, : len(row)] = 1
    expected = torch.tensor([p for _, p in rows])
    got = spec.prefix_lengths(ids, prompt_lengths=[3, 0, 7], attention_mask=mask)
    assert torch.equal(got, expected)
    # Without a prompt the prefix ends right after the marker.
    no_prompt = spec.prefix_lengths(ids[1:2, : len(rows[1][0])])
    assert int(no_prompt[0]) == rows[1][1]
    # Speech positions are exactly the generated region plus prompt speech.
    assert bool(spec.is_speech(ids[0, rows[0][1]: len(rows[0][0])]).all())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_bad_sequences_name_the_sample(name):
    spec = get_spec(name, "tiny")
    good, _ = make_row(spec, 4, 0, 5)
    ids = torch.stack([good, good.clone()])
    ids[1, 2] = spec.vocab_size + 3
    with pytest.raises(ValueError, match="sample 1, position 2.*outside the vocabulary"):
        spec.prefix_lengths(ids)
    no_marker = torch.stack([good, torch.where(good == spec.prefix_end_token_id, spec.speech_range[0], good)])
    with pytest.raises(ValueError, match="sample 1 has no end-of-prefix marker"):
        spec.prefix_lengths(no_marker)
    with pytest.raises(ValueError, match="sample 0.*longer than the sequence"):
        spec.prefix_lengths(ids[:1], prompt_lengths=[100])


def test_real_spark_needs_its_tokenizer():
    with pytest.raises(ValueError, match="with_tokenizer"):
        get_spec("sparktts", "real").prefix_lengths(torch.zeros(1, 4, dtype=torch.long))


# ----------------------------------------------------------------------------- weights
def tiny_inputs(spec, seed=0):
    rows = [make_row(spec, 4, 2, 12, seed=seed), make_row(spec, 6, 0, 8, seed=seed + 1)]
    width = max(len(r) for r, _ in rows)
    ids = torch.full((2, width), spec.speech_range[0], dtype=torch.long)
    for b, (row, _) in enumerate(rows):
        ids[b, : len(row)] = row
    prefix = torch.tensor([p for _, p in rows])
    kwargs = {}
    if spec.family == "indextts":
        kwargs["conditioning_latents"] = torch.randn(2, spec.extra["num_latents"], spec.config["n_embd"])
    return ids, prefix, kwargs


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_save_load_round_trip_reproduces_logits(name, tmp_path):
    spec = get_spec(name, "tiny")
    torch.manual_seed(0)
    model = wand.enable_wand(spec.build().eval(), spec.target_window)
    ids, prefix, kwargs = tiny_inputs(spec)
    # The training forward takes the prefix lengths the spec finds in the batch.
    lengths = torch.tensor([len(make_row(spec, 4, 2, 12, seed=0)[0]), len(make_row(spec, 6, 0, 8, seed=1)[0])])
    mask = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
    assert torch.equal(spec.prefix_lengths(ids, prompt_lengths=[2, 0], attention_mask=mask), prefix)
    before = model(input_ids=ids, prefix_lengths=prefix, **kwargs).logits
    spec.save(model, tmp_path)
    loaded = wand.enable_wand(spec.load(str(tmp_path)), spec.target_window)
    after = loaded(input_ids=ids, prefix_lengths=prefix, **kwargs).logits
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)


def test_indextts_load_skips_conditioning_encoder_and_says_so(tmp_path):
    spec = get_spec("indextts", "tiny")
    state = spec.build().state_dict()
    state["conditioning_encoder.embed.conv.0.weight"] = torch.zeros(3, 3)
    state["perceiver_encoder.latents"] = torch.zeros(4, 32)
    state["gpt.h.0.attn.bias"] = torch.ones(1, 1, 8, 8)  # old transformers' causal-mask buffer
    torch.save(state, tmp_path / "gpt.pth")
    model = spec.load(str(tmp_path))
    assert sorted(model.skipped_keys) == ["conditioning_encoder.embed.conv.0.weight", "perceiver_encoder.latents"]


def test_load_errors_say_how_to_point_at_a_copy(tmp_path, monkeypatch):
    spec = get_spec("cosyvoice2", "tiny")
    with pytest.raises(WeightsNotFound, match="no such file"):
        spec.load(str(tmp_path / "missing"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFound, match="huggingface-cli download FunAudioLLM/CosyVoice2-0.5B"):
        spec.load("FunAudioLLM/CosyVoice2-0.5B")
    # A checkpoint of another architecture: the error lists what differs.
    other = replace(spec, config={**spec.config, "hidden_size": 48, "num_attention_heads": 4})
    other.save(other.build(), tmp_path)
    with pytest.raises(ValueError, match="does not match this preset's architecture.*shape mismatch"):
        spec.load(str(tmp_path))


@pytest.mark.slow
def test_load_from_s3(s3_server, tmp_path, monkeypatch):
    import s3fs

    monkeypatch.setenv("WAND_CACHE_DIR", str(tmp_path / "cache"))
    spec = get_spec("llasa-1b", "tiny")
    torch.manual_seed(0)
    model = spec.build().eval()
    spec.save(model, tmp_path / "local")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint})
    fs.mkdir("models")
    fs.put(str(tmp_path / "local") + "/", "models/llasa-tiny/", recursive=True)
    loaded = spec.load("s3://models/llasa-tiny")
    ids, _, _ = tiny_inputs(spec)
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6, rtol=0)
    with pytest.raises(WeightsNotFound, match="does not exist"):
        spec.load("s3://models/nothing-here")


# ----------------------------------------------------------------------------- WAND through the wrappers
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_wand_generate_equals_masked_forward_through_spec(name):
    spec = get_spec(name, "tiny")
    torch.manual_seed(0)
    window = 4
    model = wand.enable_wand(spec.build().eval(), window)
    rows = [make_row(spec, 5, 2, 0, seed=4), make_row(spec, 2, 0, 0, seed=5)]
    width = max(len(r) for r, _ in rows)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, (row, _) in enumerate(rows):  # left-padded prompts = the prefixes
        ids[b, width - len(row):] = row
        mask[b, width - len(row):] = 1
    prefix = torch.tensor([p for _, p in rows])
    _, _, kwargs = tiny_inputs(spec)
    steps = 3 * window + 2
    got = wand.generate(model, ids, prefix, window, steps, attention_mask=mask, prefill_kwargs=kwargs)
    seq = ids
    for _ in range(steps):
        logits = model(input_ids=seq, attention_mask=mask, prefix_lengths=prefix, use_cache=False, **kwargs).logits
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], -1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], -1)
    assert torch.equal(got, seq)
    if spec.family in ("cosyvoice2", "indextts"):
        # Their heads cover only speech ids, and those ids are valid next inputs.
        assert bool(spec.is_speech(got[:, width:]).all())


@pytest.mark.parametrize("name, paper", [("cosyvoice2", 0.499), ("indextts", 0.662), ("sparktts", 0.605)])
def test_presets_reproduce_paper_reductions_at_10s(name, paper):
    from wand.kv import cache_bytes

    spec = get_spec(name, "real")
    per_token = spec.kv_bytes_per_token()
    generated = spec.tokens_for_seconds(10)
    full = cache_bytes(per_token, spec.paper_prefix_length, generated, None)
    windowed = cache_bytes(per_token, spec.paper_prefix_length, generated, spec.target_window)
    assert abs((1 - windowed / full) - paper) < 0.02


def test_measured_wand_cache_matches_analytic_at_tiny_size():
    """The bytes a filled WandCache / DynamicCache hold equal the analytic (P + W) / (P + G) figures."""
    from transformers.cache_utils import DynamicCache

    from wand.kv import cache_bytes
    from wand.profiling import cache_nbytes

    spec = get_spec("cosyvoice2", "tiny")
    model = wand.enable_wand(spec.build().eval(), 8)
    prefix, generated = 12, 90
    ids = torch.randint(0, spec.speech_range[1], (1, prefix + generated))
    per_token = spec.kv_bytes_per_token(torch.float32)
    for window, cache in ((None, DynamicCache()), (8, wand.WandCache(torch.tensor([prefix]), 8))):
        with torch.no_grad():
            model(input_ids=ids, prefix_lengths=torch.tensor([prefix]), window=window, cache=cache, use_cache=True)
        assert cache_nbytes(cache) == cache_bytes(per_token, prefix, generated, window)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_hidden_and_head_reproduce_the_logits(name):
    spec = get_spec(name, "tiny")
    model = wand.enable_wand(spec.build().eval(), 4)
    ids, prefix, kwargs = tiny_inputs(spec)
    full = model(input_ids=ids, prefix_lengths=prefix, **kwargs).logits
    hidden, head = spec.hidden_and_head(model, model, input_ids=ids, prefix_lengths=prefix, **kwargs)
    torch.testing.assert_close(head(hidden), full, atol=1e-5, rtol=0)
    assert spec.target_ids().max() < full.shape[-1]  # every target id is a head output
