"""Random token sequences in a model spec's layout (prefix + speech targets), in the corpus schema.

A smoke-test corpus for the pipeline: the tokens carry no structure, so a teacher cannot learn
anything from them (the structured synthetic corpus of the embedded default does that).
"""

from __future__ import annotations

import torch


def assemble(spec, text: torch.Tensor, prompt: torch.Tensor, generated: torch.Tensor,
             global_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """One sequence in the spec's layout from its parts; returns (ids, prefix length).

    ``text``: raw text/phoneme ids (mapped into the spec's id space here); ``prompt`` and
    ``generated``: speech ids; ``global_tokens``: Spark's global (speaker) codes, 0-based."""
    marker = torch.tensor([spec.prefix_end_token_id])
    if spec.family == "cosyvoice2":
        head = torch.cat([torch.tensor([spec.prefix_end_token_id - 1]), spec.text_ids(text), marker])  # sos, text, task id
    elif spec.family == "indextts":
        e = spec.extra
        latents = torch.full((e["num_latents"],), e["number_mel_codes"])
        head = torch.cat([latents, spec.text_ids(torch.tensor([0])), spec.text_ids(text), spec.text_ids(torch.tensor([1])), marker])
    elif spec.family == "sparktts":
        ids = spec.extra["token_ids"]
        glob = spec.extra["first_global_id"] + (global_tokens if global_tokens is not None
                                                else torch.zeros(spec.extra["global_codes"], dtype=torch.long))
        head = torch.cat([torch.tensor([ids["<|task_tts|>"], ids["<|start_content|>"]]), text,
                          torch.tensor([ids["<|end_content|>"], ids["<|start_global_token|>"]]), glob,
                          torch.tensor([ids["<|end_global_token|>"]]), marker])
    else:  # llasa / orpheus: text then the marker
        head = torch.cat([text, marker])
    return torch.cat([head, prompt, generated]), len(head) + len(prompt)


def make_row(spec, text_len, prompt_len, gen_len, seed=0):
    """A hand-built random sequence in the spec's layout; returns (ids, true prefix length)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = spec.speech_range
    speech = lambda n: torch.randint(lo, hi - len(spec.stop_token_ids), (n,), generator=g)  # noqa: E731
    if spec.family == "cosyvoice2":
        text = torch.randint(0, spec.config["vocab_size"], (text_len,), generator=g)
    elif spec.family == "indextts":
        text = torch.randint(2, spec.extra["number_text_tokens"], (text_len,), generator=g)
    else:
        text = torch.randint(0, 64, (text_len,), generator=g)
    glob = (torch.randint(0, spec.extra["global_codes"], (spec.extra["global_codes"],), generator=g)
            if spec.family == "sparktts" else None)
    return assemble(spec, text, speech(prompt_len), speech(gen_len), glob)


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
        if spec.family == "indextts":
            n_lat, dim = spec.extra["num_latents"], spec.config["n_embd"]
            row["conditioning_latents"] = torch.randn(n_lat * dim, generator=g).tolist()
        rows.append(row)
    return rows
