"""Batched long-form serving: ms per decode step, tokens/s, KV bytes, peak memory and real-time
streams per device, full attention vs WAND, at 10 / 30 / 60 s of speech.

    .venv/bin/python -m benchmarks.serving                          # CPU: the tiny presets (exercises the script)
    .venv/bin/python -m benchmarks.serving --device cuda            # GPU: real shapes, bf16, random weights
    .venv/bin/python -m benchmarks.serving --device cuda --models orpheus-3b --seconds 60 --batches 64,256
    .venv/bin/python -m benchmarks.serving --device cuda --full-mode graph --seconds 60   # both sides captured
    .venv/bin/python -m benchmarks.serving --device cuda --full-mode graph --fuse         # and projections, norms fused

Shapes come from the project's presets (`wand.models.get_spec(name, size)`): Llasa-3B, Orpheus-3B
and CosyVoice 2. Both sides get the same per-step treatment:

* full attention: transformers' `StaticCache` (one buffer of P + length + steps slots, attended
  whole with a mask: its step cost is set by that size) and the model's own forward, through
  `torch.compile` (on CUDA `mode="reduce-overhead"`, i.e. CUDA graphs) with SDPA pinned to flash /
  memory-efficient (wand.profiling.timing_conditions): the best full attention transformers offers.
  `--full-mode graph` instead captures its eager step as a CUDA graph per point, as WAND's is
  (`make gpu-check` runs the grid so: a capture takes one step, a compilation about a minute).
* WAND: `wand.static.StaticDecoder` over a WandCache of P + W slots, captured as a CUDA graph on
  CUDA, `torch.compile`d on CPU. `--wand-mode compile-graph` captures the compiled step instead
  (inductor's fused kernels in the graph, as the baseline has; compiles for tens of seconds).
* Each side picks its next token (argmax) inside its step: WAND's decoder with `sampling=`, the
  baseline's compiled or captured step ending in the argmax, so a replay is token to token.
* `--fuse`: `wand.fuse_projections` and `wand.fuse_norms` on the model, so both sides run Q/K/V and
  gate/up as one matmul each (the model's own modules, views of one fused weight) and each RMSNorm
  through `torch.rms_norm`; `make gpu-check` runs the grid so.

The cache a step reads has the same size whatever it holds, so each point prefills P (+ W) tokens
and times --steps steps at a cache sized for the point's length; WAND's KV bytes are measured
after a real prefill of P + length tokens (batch 1), full attention's are its allocated buffer.
Each point also records what one step launched (torch profiler): host operators, and on CUDA the
kernels, the CUDA-graph launches and whether the step replayed a graph (launched one, and inductor
skipped none): a baseline that silently fell back to launching every kernel would be unfair to it.
Real-time streams = the largest batch whose decode steps per second stay at or above the model's
token rate (Orpheus 82/s, Llasa 50/s, CosyVoice 2 25/s) at the longest length.
Writes benchmarks/results/serving_<device>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

import wand
from wand.generation import cache_kwarg_name
from wand.models import get_spec
from wand.profiling import (cache_nbytes, copy_bandwidth, cpu_device, launches_per_step, timing_conditions,
                            weight_read_bytes)
from wand.sampling import Sampling
from wand.static import GRAPH_MODES, STATIC_MODES, StaticDecoder

ROOT = Path(__file__).resolve().parents[1]

FULL_MODES = ("compile", "graph")
RECOMPILE_LIMIT = 64  # compiled variants per step function: a full default grid with --per-point-compile is 36
DEFAULT_PREFIX = 114  # Llasa / Orpheus publish no prefix length: a short text + reference prompt (ours)


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, token: torch.Tensor, steps: int, device: torch.device) -> float:
    """Median seconds per step (``step(token) -> next token``, greedy, picked inside the step on both
    sides) after two warm-up steps (compilation, capture)."""
    times = []
    for i in range(steps + 2):
        sync(device)
        start = time.perf_counter()
        token = step(token)
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def prompt_ids(spec, batch: int, length: int, device: torch.device) -> torch.Tensor:
    lo, hi = spec.speech_range  # speech ids are valid inputs for every family
    gen = torch.Generator().manual_seed(batch * 7919 + length)
    return torch.randint(lo, hi - len(spec.stop_token_ids), (batch, length), generator=gen).to(device)


def full_step(model, compile_mode, shared: bool = True):
    """The baseline's decode step ``step(token, position, cache)`` (logits; compiled: the next token), pure
    in its inputs (the StaticCache's buffers, static addresses, are its only writes). The caller advances the
    position outside the compiled region: a non-static input mutated inside it (``position.add_(1)``)
    makes torch's CUDA-graph trees skip the graph, and the baseline would run launch-bound.

    ``shared``: one compiled function for every point of a model (the cache is an argument; torch makes
    a shape dynamic once it changes): measured on CPU with the tiny preset, two compilations per length
    (batch 1, then one graph for every larger batch) instead of one per (batch, length) point, each
    about a minute for the real shapes on a GPU. Else static shapes, compiled per point."""
    name = cache_kwarg_name(model)

    def step(token, position, cache):
        return model(input_ids=token.view(-1, 1), position_ids=position, use_cache=True, **{name: cache}).logits[:, -1]

    if not compile_mode:  # logits: captured_step compares them, and captures their argmax with the step
        return step
    return torch.compile(lambda token, position, cache: step(token, position, cache).argmax(-1), mode=compile_mode,
                         dynamic=None if shared else False)


def captured_step(run, token: torch.Tensor, position: torch.Tensor, cache):
    """The baseline's eager step captured as one CUDA graph, as WAND's StaticDecoder captures its own
    (``--full-mode graph``): token and position are copied into static buffers, the graph replayed.
    Captures in one step where torch.compile takes about a minute per model, so a whole batch grid
    fits a short GPU run. The capture is checked first: its replay's logits against an eager step's
    from the same cache state (the same slot is written again); ``replay.max_diff`` keeps the largest
    difference, and one beyond bf16 rounding is printed as a warning."""
    static_token, static_position = token.clone(), position.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        eager = run(static_token, static_position, cache).clone()  # warm-up, and the check's reference
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():  # records the kernels, runs none
        out = run(static_token, static_position, cache)
        picked = out.argmax(-1)  # the next token inside the graph, as WAND's step picks its own
    graph.replay()
    max_diff = float((out.float() - eager.float()).abs().max())
    if max_diff > 1e-2 * float(eager.float().abs().max()):
        print(f"warning: the captured full-attention step differs from the eager one (max |diff| {max_diff:.3g})",
              flush=True)

    def replay(token, position, cache_):
        static_token.copy_(token)
        static_position.copy_(position)
        graph.replay()
        return picked

    replay.max_diff = max_diff
    return replay


def full_point(model, spec, batch, prefix, length, steps, device, run, capture: bool = False):
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=prefix + length + steps + 4)
    ids = prompt_ids(spec, batch, prefix, device)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{cache_kwarg_name(model): cache})
    state = {"position": torch.full((batch, 1), prefix, dtype=torch.long, device=device)}
    if capture:
        run = captured_step(run, ids[:, -1], state["position"], cache)

    def step(token):
        token = run(token, state["position"], cache)  # the next token, picked inside the step
        state["position"] = state["position"] + 1  # outside the compiled step (see full_step)
        return token

    skips = graph_skips()
    with torch.no_grad():
        seconds = time_steps(step, ids[:, -1], steps, device)
        launches = launches_per_step(step, ids[:, -1], device=device)
    record = graph_record(device, device.type == "cuda", skips, launches)
    if capture:
        record["capture_max_diff"] = run.max_diff  # the captured step against an eager one
    return seconds, cache_nbytes(cache), record


def compiled_graphs() -> int:
    """Dynamo's count of graphs compiled so far in this process (a compiled step with a graph break
    counts two)."""
    return counters["stats"]["unique_graphs"]


def graph_skips() -> int:
    """Inductor's count of CUDA graphs it declined to record (a mutated non-static input, CPU ops...)."""
    return counters["inductor"]["cudagraph_skips"]


def graph_record(device, expected: bool, skips_before: int, launches: dict) -> dict:
    """Whether a step replayed a CUDA graph, from the profiler's graph launches and inductor's skips."""
    record = dict(launches)
    if device.type == "cuda":
        record["graph_skips"] = graph_skips() - skips_before
        record["graph_replayed"] = launches["graph_launches"] > 0 and record["graph_skips"] == 0
        if expected and not record["graph_replayed"]:
            print(f"warning: a step expected to replay a CUDA graph did not ({record})", flush=True)
    return record


def wand_point(model, spec, batch, prefix, window, steps, device, mode):
    cache = wand.WandCache(torch.full((batch,), prefix), window)
    ids = prompt_ids(spec, batch, prefix + window, device)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=True, **{cache_kwarg_name(model): cache}).logits[:, -1]
    decoder = StaticDecoder(model, cache, mode, sampling=Sampling())  # greedy, picked inside the step (graph)
    decoder.pick(logits)
    skips = graph_skips()
    seconds = time_steps(lambda _: decoder.step(), ids[:, -1], steps, device)  # each step decodes its own pick
    launches = launches_per_step(lambda _: decoder.step(), ids[:, -1], device=device)
    return seconds, cache.nbytes(), graph_record(device, mode in GRAPH_MODES, skips, launches)


def wand_bytes_after(model, spec, prefix, length, window, device, chunk: int = 512) -> int:
    """KV bytes of a batch-1 WandCache after a real, chunked prefill of prefix + length tokens."""
    cache = wand.WandCache(torch.tensor([prefix]), window)
    ids = prompt_ids(spec, 1, prefix + length, device)
    with torch.no_grad():
        for start in range(0, ids.shape[1], chunk):
            model(input_ids=ids[:, start:start + chunk], use_cache=True, **{cache_kwarg_name(model): cache})
    return cache.nbytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="cosyvoice2,llasa-3b,orpheus-3b")
    parser.add_argument("--size", default=None, help="preset size (default: real on CUDA, tiny on CPU)")
    parser.add_argument("--seconds", default="10,30,60", help="speech already generated at each point")
    parser.add_argument("--batches", default=None, help="default: 1,8,32,64,128,256 on CUDA, 1,4,16 on CPU")
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per point")
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--full-mode", choices=FULL_MODES, default="compile",
                        help="the baseline's step: compile (torch.compile; on CUDA reduce-overhead, CUDA graphs) "
                             "or graph (its eager step captured as a CUDA graph per point, as WAND's; CUDA only)")
    parser.add_argument("--wand-mode", choices=STATIC_MODES, default=None,
                        help="StaticDecoder mode for WAND (default: graph on CUDA, compile on CPU)")
    parser.add_argument("--fuse", action="store_true",
                        help="wand.fuse_projections and fuse_norms, both sides (Q/K/V and gate/up one matmul each)")
    parser.add_argument("--per-point-compile", action="store_true",
                        help="compile the baseline anew, with static shapes, for every (batch, length) point "
                             "(default: one compiled step per model, shapes dynamic)")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    size = args.size or ("real" if cuda else "tiny")
    dtype = torch.bfloat16 if cuda else torch.float32
    batches = [int(b) for b in (args.batches or ("1,8,32,64,128,256" if cuda else "1,4,16")).split(",")]
    seconds_grid = [float(s) for s in args.seconds.split(",")]
    full_compile = "reduce-overhead" if cuda else "default"
    wand_mode = args.wand_mode or ("graph" if cuda else "compile")
    if wand_mode in GRAPH_MODES and not cuda:
        parser.error(f"--wand-mode {wand_mode} captures a CUDA graph: it needs --device cuda")
    if args.full_mode == "graph" and not cuda:
        parser.error("--full-mode graph captures a CUDA graph: it needs --device cuda")
    capture = args.full_mode == "graph"
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"serving_{device.type}.json"
    name = torch.cuda.get_device_name() if cuda else cpu_device(torch.get_num_threads())
    torch.set_float32_matmul_precision("high")
    if capture:
        full_how = "StaticCache, eager step captured as a CUDA graph per point"
    else:
        full_how = (f"StaticCache + torch.compile({full_compile}, "
                    f"{'per point, static shapes' if args.per_point_compile else 'one per model, dynamic shapes'})")
    results = {"device": name, "dtype": str(dtype), "size": size, "steps": args.steps, "full": full_how,
               "wand": f"StaticDecoder ({wand_mode})", "models": {}}
    # Past dynamo's recompile limit (8 per code object) a compiled step would silently run eager: every
    # point's step shares one code object, so a grid of more than 8 points (or a second model) once fell
    # back without a word. Here the limit is raised and hitting it is an error.
    import torch._dynamo.config as dynamo_config

    with timing_conditions(device) as attention, dynamo_config.patch(recompile_limit=RECOMPILE_LIMIT,
                                                                     fail_on_recompile_limit_hit=True):
        results["attention"] = attention
        bandwidth = copy_bandwidth(device)  # the weight-read floor's denominator, measured here
        results["copy_bandwidth_gb_s"] = bandwidth / 1e9
        print(f"# {name}, {dtype}, presets '{size}'; full: {results['full']}; WAND: {results['wand']}; "
              f"attention: {attention}; copy bandwidth {bandwidth / 1e9:,.0f} GB/s", flush=True)
        for model_name in args.models.split(","):
            torch._dynamo.reset()  # each model compiles afresh: no cache entries of the last one count
            spec = get_spec(model_name, size)
            torch.manual_seed(0)
            with torch.device(device):  # random init on the device: a 3B model's on the CPU takes a while
                model = spec.build(dtype).eval()
            model.set_attn_implementation("sdpa")
            # On the device: a later move would un-fuse the projections.
            fused = (wand.fuse_projections(model), wand.fuse_norms(model)) if args.fuse else (0, 0)
            prefix = spec.paper_prefix_length or DEFAULT_PREFIX
            window = spec.target_window
            rate = spec.token_rate_hz
            rows = []
            weights = weight_read_bytes(model)
            floor_ms = 1e3 * weights / bandwidth  # a step can be no faster than reading its weights once
            results["models"][model_name] = {"prefix": prefix, "window": window, "token_rate": rate, "rows": rows,
                                             "weight_read_bytes": weights, "floor_ms": floor_ms,
                                             "fused_groups": fused[0], "fused_norms": fused[1]}
            full_graphs = 0
            shared_run = None if args.per_point_compile or capture else full_step(model, full_compile)
            print(f"\n## {model_name} ({size}): P={prefix}, W={window}, {rate:g} tokens/s of speech; "
                  f"fused: {fused[0]} projection groups, {fused[1]} norms; weights "
                  f"{weights / 2**30:.2f} GiB, read in {floor_ms:.3f} ms at that bandwidth (the step's floor)")
            print("| speech | batch | full ms/step | WAND ms/step | WAND / floor | full tok/s | WAND tok/s | "
                  "full KV/stream | WAND KV/stream | peak GiB full / WAND | launched full / WAND |")
            print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
            for seconds in seconds_grid:
                length = spec.tokens_for_seconds(seconds)
                wand.disable_wand(model)
                wand.enable_wand(model, window)
                kv_wand = wand_bytes_after(model, spec, prefix, length, window, device)
                for batch in batches:
                    row = {"seconds": seconds, "length": length, "batch": batch, "wand_kv_per_stream": kv_wand}
                    for side in ("full", "wand"):
                        if cuda:
                            torch.cuda.empty_cache()
                            torch.cuda.reset_peak_memory_stats()
                        try:
                            if side == "full":
                                wand.disable_wand(model)
                                run = shared_run or full_step(model, None if capture else full_compile, shared=False)
                                before = compiled_graphs()
                                secs, kv, launches = full_point(model, spec, batch, prefix, length, args.steps,
                                                                device, run, capture)
                                full_graphs += compiled_graphs() - before
                                row["full_kv_per_stream"] = kv // batch
                            else:
                                wand.enable_wand(model, window)
                                secs, _, launches = wand_point(model, spec, batch, prefix, window, args.steps,
                                                               device, wand_mode)
                            row[f"{side}_launches"] = launches
                            row[f"{side}_ms"] = 1e3 * secs
                            row[f"{side}_tokens_per_s"] = batch / secs
                            row[f"{side}_over_floor"] = row[f"{side}_ms"] / floor_ms
                        except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
                            if not is_oom(err):
                                raise
                            row[f"{side}_ms"] = None
                            row[f"{side}_oom"] = True
                        if cuda:
                            row[f"{side}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    rows.append(row)
                    # After every point: a run cut short (gpu-check's time limit) keeps what it measured.
                    path.write_text(json.dumps(results, indent=2))
                    print(f"| {seconds:g} s | {batch} | {fmt(row.get('full_ms'))} | {fmt(row.get('wand_ms'))} | "
                          f"{fmt(row.get('wand_over_floor'), 1)} | {fmt(row.get('full_tokens_per_s'), 0)} | {fmt(row.get('wand_tokens_per_s'), 0)} | "
                          f"{kib(row.get('full_kv_per_stream'))} | {kib(kv_wand)} | "
                          f"{fmt(row.get('full_peak_gib'), 2, '-')} / {fmt(row.get('wand_peak_gib'), 2, '-')} | "
                          f"{launched(row.get('full_launches'))} / {launched(row.get('wand_launches'))} |", flush=True)
            longest = max(seconds_grid)
            streams = {side: max([r["batch"] for r in rows if r["seconds"] == longest and r.get(f"{side}_ms")
                                  and 1e3 / r[f"{side}_ms"] >= rate], default=0) for side in ("full", "wand")}
            print(f"real-time streams at {longest:g} s (steps/s >= {rate:g}): full {streams['full']}, "
                  f"WAND {streams['wand']} (largest batch tried: {max(batches)})")
            print(f"graphs compiled for the full-attention baseline of {model_name}: {full_graphs}")
            results["models"][model_name] |= {"realtime_streams": streams, "at_seconds": longest,
                                              "full_graphs_compiled": full_graphs}
            del model
    path.write_text(json.dumps(results, indent=2))
    plot(results, out / f"serving_{device.type}.png")
    print(f"\nwrote {path} and .png")


def fmt(value, digits: int = 2, missing: str = "OOM") -> str:
    return missing if value is None else f"{value:,.{digits}f}"


def launched(record: dict | None) -> str:
    """One step's launches for the table: kernels and whether a CUDA graph replayed, or host ops (CPU)."""
    if record is None:
        return "-"
    if "kernels" in record:
        return f"{record['kernels']} kernels, graph {'yes' if record['graph_replayed'] else 'NO'}"
    return f"{record['aten_ops']} ops"


def kib(value) -> str:
    return "-" if value is None else f"{value / 1024:,.0f} KiB"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, (model_name, data) in zip(axes[0], models.items()):
        longest = data["at_seconds"]
        rows = [r for r in data["rows"] if r["seconds"] == longest]
        for side in ("full", "wand"):
            points = [(r["batch"], r[f"{side}_tokens_per_s"]) for r in rows if r.get(f"{side}_ms")]
            if points:
                ax.plot(*zip(*points), marker="o", label=f"{side}")
        ax.set(xscale="log", yscale="log", xlabel="batch (streams)", ylabel="tokens/s",
               title=f"{model_name} at {longest:g} s of speech")
        ax.grid(alpha=0.3), ax.legend()
    fig.suptitle(f"{results['device']} ({results['dtype']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
