"""Training step time (forward + chunked CE/KD loss + backward + AdamW): full causal attention vs WAND.

    .venv/bin/python -m benchmarks.train_step                    # CPU: small shape, SDPA dense mask
    .venv/bin/python -m benchmarks.train_step --device cuda      # GPU: Qwen2.5-0.5B shape, bf16, Flex

The baseline is what a user trains full attention with: the model's own SDPA forward (causal, no
mask), on CUDA pinned to the flash / memory-efficient kernels (wand.profiling.timing_conditions).
WAND runs FlexAttention on CUDA (its BlockMask skips the blocks outside prefix + window; one compile
per 128-token length bucket) and the dense-mask SDPA on CPU, where a mask changes which scores
count, not how many are computed, so no speed-up is expected there. WAND is timed in both forms a
curriculum trains with: the hard mask (from tau >= wand.masks.HARD_TAU on, the last third of the
schedule and its hold) and the soft form at --soft-tau (a score_mod on every causal element: on
Flex it skips no block). Tokens per step are equal at every length (batch = --tokens / length).
Prefix 182 (CosyVoice 2's), W 32. Median of --repeats after one warm-up step (compilation).

The attention op alone (forward + backward of the first layer's attention call) is timed too, on the
very tensors and mask the step gave it (recorded from a training forward), so on CUDA it runs the
step's own compiled Flex kernel. --gqa repeat runs the whole benchmark with WAND_FLEX_GQA=repeat (K/V
heads repeated per query head before Flex, see wand.patch.flex_gqa) to compare with the default.

Goals (CUDA, issue 29): WAND soft / full <= 1.0 at T = 2,048 and <= 0.9 at 8,192 for the whole step;
the attention op alone <= 0.35 x full attention's at 8,192.
Writes benchmarks/results/train_step_<device>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import wand
from wand.losses import wand_loss
from wand.masks import HARD_TAU
from wand.patch import FLEX_GQA_MODES, flex_gqa
from wand.profiling import cpu_device, timing_conditions
from wand.topk import sparse_teacher_targets

ROOT = Path(__file__).resolve().parents[1]

VOCAB = 6564  # CosyVoice 2's speech head
SHAPES = {
    "small": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, rope_theta=1e6),  # Qwen2.5-0.5B (CosyVoice 2, Spark)
}


def step_time(model, optimizer, batch, length, window, prefix, device, repeats, tau=None) -> float:
    """Median seconds of one training step; ``window=None`` is the model's own causal forward,
    ``tau`` the soft form's penalty (None: the hard mask)."""
    gen = torch.Generator().manual_seed(length)
    ids = torch.randint(0, VOCAB, (batch, length), generator=gen).to(device)
    positions = torch.arange(prefix - 1, length - 1, device=device)
    with torch.no_grad():
        teacher = torch.randn(batch * positions.numel(), VOCAB, generator=gen).to(device)
    values, index, rest = sparse_teacher_targets(teacher, torch.arange(VOCAB, device=device), 16)
    del teacher
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        if window is None:
            out = model(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
        else:
            out = model(input_ids=ids, prefix_lengths=torch.full((batch,), prefix, device=device), window=window,
                        tau=tau, output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1][:, positions].reshape(-1, out.hidden_states[-1].shape[-1])
        targets = ids[:, positions + 1].reshape(-1)
        loss = wand_loss(hidden, model.lm_head, targets, values, index, rest).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])  # the first includes warm-up / compilation


HEADER = ("| length | batch | full ms | WAND ms | WAND / full | WAND soft ms | soft / full | op full ms "
          "| op WAND / full | op soft / full |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def row_line(row: dict) -> str:
    """One length's table line: step times (ms) and ratios, then the attention op's."""
    soft = row.get("wand_soft_s")
    soft_cells = f"{1e3 * soft:.0f} | {row['soft_ratio']:.2f}" if soft else "- | -"
    op_soft = f"{row['op_soft_ratio']:.2f}" if soft else "-"
    return (f"| {row['length']:,} | {row['batch']} | {1e3 * row['full_s']:.0f} | {1e3 * row['wand_s']:.0f} | "
            f"{row['ratio']:.2f} | {soft_cells} | {1e3 * row['op_full_s']:.1f} | {row['op_ratio']:.2f} | {op_soft} |")


def table(record: dict) -> str:
    """The markdown table of a results file (what the script printed as it ran)."""
    return "\n".join([HEADER, *(row_line(row) for row in record["rows"])])


def recorded_attention(model, batch, length, window, prefix, device, tau=None) -> tuple:
    """(function, module, query, key, value, mask, kwargs) of the first attention call of one training
    forward of ``model``, recorded as it happened: q/k/v cloned with their strides (leaves that
    require grad), the mask object itself (a soft form's score_mod rides on it)."""
    from transformers.modeling_utils import AttentionInterface

    impl = model.config._attn_implementation
    function = AttentionInterface._global_mapping[impl]
    seen = []

    def record(module, query, key, value, mask, **kwargs):
        if not seen:
            seen.append((module, *(t.detach().clone().requires_grad_() for t in (query, key, value)), mask, kwargs))
        return function(module, query, key, value, mask, **kwargs)

    ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(length)).to(device)
    AttentionInterface.register(impl, record)
    try:
        if window is None:
            model(input_ids=ids, logits_to_keep=1)  # grad enabled, like a training forward
        else:
            model(input_ids=ids, prefix_lengths=torch.full((batch,), prefix, device=device), window=window, tau=tau,
                  logits_to_keep=1)
    finally:
        AttentionInterface.register(impl, function)
    return (function, *seen[0])


def op_time(recorded: tuple, device, repeats: int) -> float:
    """Median seconds of the recorded attention call's forward + backward (after one warm-up)."""
    function, module, query, key, value, mask, kwargs = recorded
    times, grad = [], None
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = function(module, query, key, value, mask, **kwargs)[0]
        if grad is None:
            grad = torch.randn_like(out)
        out.backward(grad)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        query.grad = key.grad = value.grad = None
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: 0.5b on CUDA, small on CPU")
    parser.add_argument("--lengths", default=None, help="default: 2048,8192 on CUDA, 512,1024,2048 on CPU")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per step (default: the longest length)")
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--prefix", type=int, default=182)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--soft-tau", type=float, default=8.0,
                        help=f"tau of the soft form timed beside the hard mask (below HARD_TAU = {HARD_TAU:g}; 0: skip it)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--gqa", choices=FLEX_GQA_MODES, default=None,
                        help="how WAND's Flex takes grouped K/V heads (sets WAND_FLEX_GQA; default: its setting, native)")
    args = parser.parse_args()
    if args.gqa:
        os.environ["WAND_FLEX_GQA"] = args.gqa
    try:
        gqa = flex_gqa()  # a WAND_FLEX_GQA from the environment, checked before anything runs
    except ValueError as err:
        parser.error(str(err))
    if not 0 <= args.soft_tau < HARD_TAU:
        parser.error(f"--soft-tau must be in [0, {HARD_TAU:g}): from HARD_TAU on the soft form is the hard mask")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    shape = args.shape or ("0.5b" if cuda else "small")
    lengths = [int(x) for x in (args.lengths or ("2048,8192" if cuda else "512,1024,2048")).split(",")]
    if min(lengths) <= args.prefix:
        parser.error(f"--lengths must all exceed --prefix ({args.prefix}): a step trains on the tokens after the prefix")
    tokens = args.tokens or max(lengths)
    dtype = torch.bfloat16 if cuda else torch.float32
    backend = "flex" if cuda else "sdpa"

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, max_position_embeddings=max(lengths), **SHAPES[shape])
    full_model = Qwen2ForCausalLM(config).to(device=device, dtype=dtype)
    full_model.set_attn_implementation("sdpa")
    # Its own copy of the config: set_attn_implementation writes to the config, and a shared one
    # would switch the baseline to WAND's FlexAttention function too.
    wand_model = wand.enable_wand(Qwen2ForCausalLM(copy.deepcopy(config)).to(device=device, dtype=dtype),
                                  args.window, backend=backend)
    wand_model.load_state_dict(full_model.state_dict())
    rows = []
    with timing_conditions(device) as attention:
        name = torch.cuda.get_device_name() if cuda else cpu_device(torch.get_num_threads())
        print(f"# {shape} shape, {dtype}, on {name}; full: model SDPA causal ({attention}); WAND: {backend}"
              f"{f' (K/V heads: {gqa})' if backend == 'flex' else ''}, P={args.prefix}, W={args.window}; "
              f"{tokens} tokens per step; op: one attention call, forward + backward")
        print(HEADER)
        for length in lengths:
            batch = max(1, tokens // length)
            results = {}
            runs = [("full", full_model, None, None), ("wand", wand_model, args.window, None)]
            if args.soft_tau:
                runs.append(("wand_soft", wand_model, args.window, args.soft_tau))
            ops = {}
            for key, model, window, tau in runs:
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
                results[key] = step_time(model, optimizer, batch, length, window, args.prefix, device, args.repeats, tau)
                del optimizer
                model.zero_grad(set_to_none=True)
                ops[key] = op_time(recorded_attention(model, batch, length, window, args.prefix, device, tau),
                                   device, args.repeats)
            ratio = results["wand"] / results["full"]
            soft = results.get("wand_soft")
            row = {"length": length, "batch": batch, "full_s": results["full"], "wand_s": results["wand"],
                   "ratio": ratio, **({"wand_soft_s": soft, "soft_ratio": soft / results["full"]} if soft else {}),
                   "op_full_s": ops["full"], "op_wand_s": ops["wand"], "op_ratio": ops["wand"] / ops["full"]}
            if soft:
                row |= {"op_wand_soft_s": ops["wand_soft"], "op_soft_ratio": ops["wand_soft"] / ops["full"]}
            rows.append(row)
            print(row_line(row), flush=True)
            # After every length: a run cut short by gpu-check's time limit keeps the rows it measured.
            args.out_dir.mkdir(parents=True, exist_ok=True)
            out = args.out_dir / f"train_step_{device.type}.json"
            out.write_text(json.dumps({"device": name, "shape": shape, "dtype": str(dtype), "full_attention": attention,
                                       "wand_backend": backend, "flex_gqa": gqa if backend == "flex" else None,
                                       "prefix": args.prefix, "window": args.window,
                                       "soft_tau": args.soft_tau or None, "hard_tau": HARD_TAU,
                                       "tokens_per_step": tokens, "lengths": lengths, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
