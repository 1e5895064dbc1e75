"""Random token sequences in a model spec's layout (prefix + speech targets), in the corpus schema.

A smoke-test corpus for the pipeline: the tokens carry no structure, so a teacher cannot learn
anything from them (the structured synthetic corpus of the embedded default does that).
"""

from __future__ import annotations

import torch


def make_row(spec, text_len, prompt_len, gen_len, seed=0):
    """A hand-built random sequence in the spec's layout; returns (ids, true prefix length)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = spec.speech_range
    speech = lambda n: torch.randint(lo, hi - len(spec.stop_token_ids), (n,), generator=g)  # noqa: E731
    # Raw text ids in [reserved, 64) or the model's own smaller text table: valid for every spec.
    text = torch.randint(spec.reserved_text_ids, min(64, spec.text_vocab_size or 64), (text_len,), generator=g)
    glob = (torch.randint(0, spec.global_codes, (spec.global_codes,), generator=g)
            if spec.global_codes is not None else None)
    return spec.layout(text, speech(prompt_len), speech(gen_len), glob)


def corpus_rows(spec, n: int, seed: int = 0, min_gen: int = 6, max_gen: int = 30) -> list[dict]:
    """Corpus rows (the precompute schema) of random sequences in the spec's layout."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        text = int(torch.randint(2, 8, (1,), generator=g))
        prompt = int(torch.randint(0, 4, (1,), generator=g))
        gen = int(torch.randint(min_gen, max_gen + 1, (1,), generator=g))
        ids, prefix = make_row(spec, text, prompt, gen, seed=seed * 100003 + i)
        row = {"id": f"utt-{seed}-{i:04d}", "input_ids": ids.tolist(), "prefix_length": prefix, "prompt_length": prompt}
        if spec.latent_shape is not None:
            n_lat, dim = spec.latent_shape
            row["conditioning_latents"] = torch.randn(n_lat * dim, generator=g).tolist()
        rows.append(row)
    return rows
