"""Published architectures of the target models (real size) and tiny variants for tests.

Real sizes are the released configs (WAND.md section 4 and the upstream repositories), so a spec
builds at real size with random weights and no download. Token layouts (which ids are speech,
which end the prefix, which stop) are the released tokenizers'; tiny variants keep the same
layout shape with small vocabularies. Values marked "ours" are not published and are our choice.
"""

from __future__ import annotations

from .causal_lm import CausalLMSpec
from .cosyvoice2 import CosyVoice2Spec
from .indextts import IndexTTSSpec
from .sparktts import SPECIAL_TOKENS as SPARK_SPECIAL_TOKENS
from .sparktts import SparkTTSSpec

# Qwen2.5-0.5B, the backbone of CosyVoice 2 and SparkTTS.
_QWEN25_05B = dict(
    hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
_LLAMA3_ROPE = dict(rope_type="llama3", high_freq_factor=4.0, low_freq_factor=1.0,
                    original_max_position_embeddings=8192, rope_theta=500_000.0)
_LLAMA_32_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
                    tie_word_embeddings=True, rope_parameters={**_LLAMA3_ROPE, "factor": 32.0})
_LLAMA_32_3B = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                    num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5,
                    tie_word_embeddings=True, rope_parameters={**_LLAMA3_ROPE, "factor": 32.0})
_LLAMA_31_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5,
                    tie_word_embeddings=False, rope_parameters={**_LLAMA3_ROPE, "factor": 8.0})
_TINY_QWEN2 = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)
_TINY_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=1, max_position_embeddings=4096, tie_word_embeddings=True)

LLAMA3_TEXT_VOCAB = 128256  # Llama 3 tokenizer; TTS models append their tokens after it


def _cosyvoice2(size: str) -> CosyVoice2Spec:
    speech = 6561 if size == "real" else 61
    text_vocab = 151936 if size == "real" else 64
    config = dict(_QWEN25_05B, vocab_size=text_vocab) if size == "real" else dict(_TINY_QWEN2, vocab_size=text_vocab)
    return CosyVoice2Spec(
        name="cosyvoice2", size=size, family="cosyvoice2", config=config,
        vocab_size=speech + 3 + 2 + text_vocab, speech_range=(0, speech + 3),
        stop_token_ids=(speech, speech + 1, speech + 2), prefix_end_token_id=speech + 4,  # task id
        token_rate_hz=25.0, target_window=32, paper_prefix_length=182,
        source="FunAudioLLM/CosyVoice2-0.5B", weights_file="llm.pt",
        extra={"speech_token_size": speech, "prefix_end_token": "task_id"},
    )


def _indextts(size: str) -> IndexTTSSpec:
    if size == "real":
        extra = dict(number_text_tokens=12000, number_mel_codes=8194, max_text_tokens=600, max_mel_tokens=800,
                     num_latents=32)
        config = dict(n_embd=1280, n_layer=24, n_head=20, activation_function="gelu_pytorch_tanh", vocab_size=256,
                      n_positions=(800 + 3) + (600 + 2), bos_token_id=None, eos_token_id=None)
    else:
        extra = dict(number_text_tokens=40, number_mel_codes=66, max_text_tokens=60, max_mel_tokens=400, num_latents=4)
        # No dropout: upstream builds GPT2Config with its defaults (0.1 on embeddings, residuals and
        # attention) and trains with them, but never decodes with them; left on, it also ran through
        # every fine-tune of a student and the mini students stopped 8% of the time (issue 26: with 0,
        # a W=8 student stopped 5 of 8). The real size keeps upstream's training config.
        config = dict(n_embd=32, n_layer=2, n_head=4, activation_function="gelu_pytorch_tanh", vocab_size=256,
                      n_positions=465, bos_token_id=None, eos_token_id=None, embd_pdrop=0.0, resid_pdrop=0.0,
                      attn_pdrop=0.0)
    mel = extra["number_mel_codes"]
    return IndexTTSSpec(
        name="indextts", size=size, family="indextts", config=config,
        vocab_size=mel + 1 + extra["number_text_tokens"] + 1, speech_range=(0, mel),
        stop_token_ids=(mel - 1,), prefix_end_token_id=mel - 2,  # start_mel
        token_rate_hz=24000 / 1024, target_window=32, paper_prefix_length=74,
        source="IndexTeam/IndexTTS-1.5", weights_file="gpt.pth",
        extra={**extra, "prefix_end_token": "start_mel"},
    )


def _sparktts(size: str) -> CausalLMSpec:
    if size == "real":
        # Special-token ids live in the checkpoint's LLM/tokenizer.json: use spec.with_tokenizer(tok).
        return SparkTTSSpec(
            name="sparktts", size=size, family="sparktts", backbone="qwen2",
            config=dict(_QWEN25_05B, vocab_size=166000), vocab_size=166000,
            speech_range=(-1, -1), stop_token_ids=(), prefix_end_token_id=-1,
            token_rate_hz=50.0, target_window=64, paper_prefix_length=227,
            source="SparkAudio/Spark-TTS-0.5B",
            extra={"semantic_codes": 8192, "global_codes": 4096, "prefix_end_token": "<|start_semantic_token|>"},
        )
    text, specials, globals_, semantic = 64, 7, 32, 256
    first_semantic = text + specials + globals_
    return SparkTTSSpec(
        name="sparktts", size=size, family="sparktts", backbone="qwen2",
        config=dict(_TINY_QWEN2, vocab_size=first_semantic + semantic), vocab_size=first_semantic + semantic,
        speech_range=(first_semantic, first_semantic + semantic), stop_token_ids=(text + 6,),  # <|im_end|>
        prefix_end_token_id=text + 5,  # <|start_semantic_token|>
        token_rate_hz=50.0, target_window=64, paper_prefix_length=227, source=None,
        extra={"semantic_codes": semantic, "global_codes": globals_, "prefix_end_token": "<|start_semantic_token|>",
               "token_ids": {tok: text + i for i, tok in enumerate(SPARK_SPECIAL_TOKENS)},
               "first_global_id": text + specials},
    )


def _llasa(variant: str, size: str) -> CausalLMSpec:
    # Llama 3 vocabulary + 8 specials (SPEECH_GENERATION_START = +4, _END = +5) + 65,536 XCodec2 codes.
    text = LLAMA3_TEXT_VOCAB if size == "real" else 64
    codes = 65536 if size == "real" else 256
    arch = {"1b": _LLAMA_32_1B, "3b": _LLAMA_32_3B, "8b": _LLAMA_31_8B}[variant] if size == "real" else _TINY_LLAMA
    return CausalLMSpec(
        name=f"llasa-{variant}", size=size, family="llasa", backbone="llama",
        config=dict(arch, vocab_size=text + 8 + codes), vocab_size=text + 8 + codes,
        speech_range=(text + 8, text + 8 + codes), stop_token_ids=(text + 5,), prefix_end_token_id=text + 4,
        token_rate_hz=50.0, target_window=64,  # W: ours (50 Hz, as Spark's 64)
        source=f"HKUSTAudio/Llasa-{variant.upper()}",
        extra={"prefix_end_token": "<|SPEECH_GENERATION_START|>"},
    )


def _orpheus(size: str) -> CausalLMSpec:
    # Llama 3 vocabulary + 10 specials (start_of_speech = +1, end_of_speech = +2) + 7 x 4,096 SNAC codes.
    text = LLAMA3_TEXT_VOCAB if size == "real" else 64
    codes = 7 * (4096 if size == "real" else 32)
    vocab = 156940 if size == "real" else text + 10 + codes
    return CausalLMSpec(
        name="orpheus-3b", size=size, family="orpheus", backbone="llama",
        config=dict(_LLAMA_32_3B if size == "real" else _TINY_LLAMA, vocab_size=vocab), vocab_size=vocab,
        speech_range=(text + 10, text + 10 + codes), stop_token_ids=(text + 2,), prefix_end_token_id=text + 1,
        token_rate_hz=82.0, target_window=126,  # W: ours, 18 SNAC frames of 7 tokens
        source="canopylabs/orpheus-3b-0.1-ft",
        extra={"prefix_end_token": "start_of_speech", "tokens_per_frame": 7},
    )


def _on_backbone(spec, size: str, width: int, layers: int, heads: int):
    """The same spec (vocabularies, token layout) on a backbone ``width`` wide, ``layers`` deep, with
    ``heads`` attention heads (2 KV heads for the Qwen2 / Llama backbones); labelled ``size``."""
    from dataclasses import replace

    if "n_embd" in spec.config:  # GPT-2 (IndexTTS)
        config = {**spec.config, "n_embd": width, "n_layer": layers, "n_head": heads}
    else:
        config = {**spec.config, "hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": layers,
                  "num_attention_heads": heads, "num_key_value_heads": 2}
        if "head_dim" in config:
            config["head_dim"] = width // heads
    return replace(spec, size=size, config=config)


def shrink(spec):
    """The same spec (vocabularies, token layout) on a 4-layer, 256-wide backbone."""
    return _on_backbone(spec, "small", width=256, layers=4, heads=8)


def widen(spec, width: int = 96, layers: int = 3, heads: int = 4):
    """The tiny spec (small vocabularies, same token layout) on a 3-layer, 96-wide backbone: big
    enough to learn the synthetic corpus (pipeline/synthetic/law.py), small enough to train on a CPU in
    minutes. The embedded default's teachers (teachers/) are this size. Other ``width`` / ``layers``
    / ``heads``: the same vocabularies on another backbone (teacher capacity experiments)."""
    if width < 1 or layers < 1 or heads < 1 or width % heads or (heads % 2 and "n_embd" not in spec.config):
        raise ValueError(f"backbone {width} wide, {layers} layers, {heads} heads: need width divisible by heads "
                         "(and an even number of heads for the Qwen2 / Llama backbones, which have 2 KV heads)")
    return _on_backbone(spec, "mini", width=width, layers=layers, heads=heads)


BUILDERS = {
    "cosyvoice2": _cosyvoice2,
    "indextts": _indextts,
    "sparktts": _sparktts,
    "llasa-1b": lambda size: _llasa("1b", size),
    "llasa-3b": lambda size: _llasa("3b", size),
    "llasa-8b": lambda size: _llasa("8b", size),
    "orpheus-3b": _orpheus,
}
