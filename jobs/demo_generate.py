"""WAND generate demo on tiny random-weight models of the three backbone classes (no download).

    make demo-generate                     # or: .venv/bin/python -m jobs.demo_generate

For each backbone (Qwen2 as in CosyVoice 2 / SparkTTS, GPT-2 as in IndexTTS, Llama as in
Llasa / Orpheus) it decodes the same prompt with full attention and with WAND (prefix + W),
and prints KV-cache bytes and per-step latency early vs late. Full attention's cache grows with
every token; WAND's stays at (prefix + W) tokens. Later issues replace this demo with the full
Ray pipeline (precompute -> curriculum stages -> MLflow evals).
"""

from __future__ import annotations

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from wand.profiling import profile_decode

BACKBONES = {
    "qwen2 (CosyVoice 2 / Spark)": lambda: Qwen2ForCausalLM(Qwen2Config(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)),
    "gpt2 (IndexTTS)": lambda: GPT2LMHeadModel(GPT2Config(
        vocab_size=512, n_embd=128, n_layer=4, n_head=4, n_positions=4096, bos_token_id=0, eos_token_id=1)),
    "llama (Llasa / Orpheus)": lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=4096)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefix", type=int, default=100, help="conditioning prefix length P")
    parser.add_argument("--window", type=int, default=32, help="WAND window W")
    parser.add_argument("--steps", type=int, default=1500, help="generated tokens per run")
    args = parser.parse_args()
    early, late = 100, args.steps - 50
    print(f"WAND demo: P={args.prefix}, W={args.window}, {args.steps} generated tokens, CPU fp32, random weights\n")
    header = f"{'backbone':<28} {'mode':<5} {'KV KiB @' + str(early):>12} {'KV KiB @' + str(args.steps):>13} " \
             f"{'ms/step @' + str(early):>13} {'ms/step @' + str(late):>14} {'late/early':>10}"
    print(header)
    print("-" * len(header))
    for name, build in BACKBONES.items():
        torch.manual_seed(0)
        model = build().eval()
        model.set_attn_implementation("sdpa")
        for mode, window in (("full", None), ("wand", args.window)):
            prof = profile_decode(model, args.prefix, window, args.steps, record_bytes_at=(early, args.steps))
            e, l = prof.latency_at(early - 1), prof.latency_at(late)
            print(f"{name:<28} {mode:<5} {prof.cache_bytes[early] / 1024:12.1f} "
                  f"{prof.cache_bytes[args.steps] / 1024:13.1f} {1e3 * e:13.3f} {1e3 * l:14.3f} {l / e:10.2f}",
                  flush=True)
    print("\nWAND's KV cache is constant: (P + W) tokens x 2 x layers x kv_heads x head_dim x bytes.")


if __name__ == "__main__":
    main()
