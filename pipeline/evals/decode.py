"""Free-running greedy decoding for the results table: one row at a time (its per-step time is the
latency figure) or a whole set of rows in one left-padded batch (the PER columns: the same tokens,
one decode instead of 64)."""

from __future__ import annotations

import time

import torch
from transformers import DynamicCache

from wand.batch import forward_inputs
from wand.cache import WandCache
from wand.generation import cache_kwarg_name
from wand.profiling import cache_nbytes

from pipeline.evals.common import speech_ids

__all__ = ["free_run", "free_run_batch"]


def _allowed(spec, stop: bool) -> torch.Tensor:
    """The ids greedy decoding picks from: the speech codes (and with ``stop``, the stop ids)."""
    codes = speech_ids(spec)
    if stop:
        codes = torch.cat([codes, torch.tensor(spec.stop_token_ids, dtype=codes.dtype)])
    return codes


def _outcome(spec, truth: torch.Tensor, tokens: torch.Tensor, stop: bool) -> dict:
    """Accuracy against the row's tokens (over the row's length), stop and tokens before the first error."""
    compared = torch.full_like(truth, -1)
    compared[: min(len(tokens), len(truth))] = tokens[: len(truth)]  # stopped early: the rest count as wrong
    wrong = torch.nonzero(compared != truth).flatten()
    return {"accuracy": float((compared == truth).float().mean()),
            "stopped": bool(stop and int(tokens[-1]) in spec.stop_token_ids),
            "matched": int(wrong[0]) if len(wrong) else len(truth), "tokens": tokens}


@torch.no_grad()
def free_run(spec, model, row: dict, window: int | None, keep: int, stop: bool = False,
             max_tokens: int | None = None) -> dict:
    """Greedy decoding from the row's prefix, restricted to the speech codes (with ``stop``, also the
    stop ids, and decoding ends at one), for ``max_tokens`` tokens at most (default: as many as the
    row has); the cache is a WandCache keeping ``keep`` first tokens + ``window`` (None: the full
    DynamicCache). Returns the tokens, their accuracy against the row (over the row's length),
    per-step seconds and cache bytes."""
    inputs = forward_inputs(spec, row, torch.device("cpu"))
    prefix = inputs.pop("prefix_length")
    ids = inputs.pop("input_ids")
    truth = ids[0, prefix:]
    codes = _allowed(spec, stop)
    keep_t = torch.tensor([keep])
    cache = WandCache(keep_t, window) if window is not None else DynamicCache()
    kw = {cache_kwarg_name(model): cache, "prefix_lengths": keep_t, "window": window, "use_cache": True,
          "model_prefix_lengths": torch.tensor([prefix])}
    out = model(input_ids=ids[:, :prefix], **kw, **inputs)
    token = codes[out.logits[0, -1, codes].argmax()].view(1, 1)
    generated, seconds = [token], []
    for _ in range((max_tokens or len(truth)) - 1):
        if stop and int(token) in spec.stop_token_ids:
            break
        start = time.perf_counter()
        out = model(input_ids=token, **kw)
        token = codes[out.logits[0, -1, codes].argmax()].view(1, 1)
        seconds.append(time.perf_counter() - start)
        generated.append(token)
    tokens = torch.cat(generated, 1)[0]
    return {**_outcome(spec, truth, tokens, stop), "step_seconds": seconds, "cache_bytes": cache_nbytes(cache)}




@torch.no_grad()
def free_run_batch(spec, model, rows: list[dict], window: int | None, keeps: list[int], stop: bool = True,
                   max_tokens: list[int] | None = None) -> list[dict]:
    """``free_run`` of every row (``keeps[b]`` first tokens kept besides the window, at most
    ``max_tokens[b]`` tokens, default the row's length) in one left-padded batch: the same tokens,
    accuracy, stop and match per row (no per-step time or cache bytes: the batch's are not a row's)."""
    prefixes = [int(r["prefix_length"]) for r in rows]
    caps = max_tokens or [len(r["input_ids"]) - p for r, p in zip(rows, prefixes)]
    codes = _allowed(spec, stop)
    width = max(prefixes)
    ids = torch.full((len(rows), width), int(codes[0]), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, (row, p) in enumerate(zip(rows, prefixes)):
        ids[b, width - p:] = torch.tensor(row["input_ids"][:p])
        mask[b, width - p:] = 1
    keep_t = torch.tensor(keeps)
    cache = WandCache(keep_t, window) if window is not None else DynamicCache()
    kw = {cache_kwarg_name(model): cache, "prefix_lengths": keep_t, "window": window, "use_cache": True,
          "model_prefix_lengths": torch.tensor(prefixes)}
    out = model(input_ids=ids, attention_mask=mask, **kw, **spec.row_inputs(rows, torch.device("cpu")))
    stops, caps_t = torch.tensor(spec.stop_token_ids), torch.tensor(caps)
    columns = [codes[out.logits[:, -1, codes].argmax(-1)]]
    done = torch.isin(columns[0], stops) if stop else torch.zeros(len(rows), dtype=torch.bool)
    done |= caps_t <= 1
    while not bool(done.all()):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = model(input_ids=columns[-1][:, None], attention_mask=mask, **kw)
        token = codes[out.logits[:, -1, codes].argmax(-1)]
        columns.append(token)
        if stop:
            done |= torch.isin(token, stops)
        done |= caps_t <= len(columns)
    generated = torch.stack(columns, 1)
    results = []
    for b, (row, p) in enumerate(zip(rows, prefixes)):
        tokens = generated[b, : caps[b]]
        if stop and bool(torch.isin(tokens, stops).any()):  # up to and with its first stop id
            tokens = tokens[: int(torch.nonzero(torch.isin(tokens, stops))[0]) + 1]
        results.append(_outcome(spec, torch.tensor(row["input_ids"][p:]), tokens, stop))
    return results
