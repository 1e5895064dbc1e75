"""IndexTTS 1.5's GPT as a WAND-ready module with the parameter names of its released ``gpt.pth``.

Upstream (index-tts/index-tts, ``indextts/gpt/model.py``, class ``UnifiedVoice``) holds a
transformers ``GPT2Model`` under ``gpt`` whose own token and position embeddings are removed
(``wte`` deleted, ``wpe`` returns zeros), plus ``text_embedding`` (12000 + 1 ids),
``mel_embedding`` (8192 codes + start 8192 + stop 8193), learned ``text_pos_embedding.emb`` and
``mel_pos_embedding.emb`` tables, ``final_norm``, ``text_head`` and ``mel_head``. Positions are
relative to each segment: text from ``start_text`` = 0, mel codes from ``start_mel`` = 0; the 32
perceiver conditioning latents carry none.

The conditioning encoder (conformer + perceiver) that turns reference mel frames into the 32
latents is not part of this spec: the latents are an input (precomputed by the model's own
encoder), and its ``conditioning_encoder.*`` / ``perceiver_encoder.*`` keys in ``gpt.pth`` are
skipped on load (reported, never silently).

Unified id space: mel codes keep ids 0..8193 (``mel_head``'s argmax is a valid next input id);
8194 marks a conditioning-latent slot; text token t is ``8195 + t``. Prefix =
``[32 latents, start_text, text, stop_text, start_mel]``; it ends with ``start_mel`` (8192).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .spec import ModelSpec
from .weights import load_checked

if TYPE_CHECKING:  # the module and its backbone load only when a model is built
    import torch
    from transformers import GPT2Config

    from .indextts_gpt import IndexTTSGPT

__all__ = ["IndexTTSSpec"]

CONDITIONING_PREFIXES = ("conditioning_encoder.", "perceiver_encoder.")


def __getattr__(name: str):
    """``from wand.models.indextts import IndexTTSGPT`` still works (the module lives in ``indextts_gpt``)."""
    if name == "IndexTTSGPT":
        from .indextts_gpt import IndexTTSGPT

        return IndexTTSGPT
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

@dataclass(frozen=True)
class IndexTTSSpec(ModelSpec):
    def backbone_config(self) -> GPT2Config:
        from transformers import GPT2Config

        return GPT2Config(**self.config)

    def build(self, dtype: torch.dtype | None = None) -> IndexTTSGPT:
        e = self.extra
        from .indextts_gpt import IndexTTSGPT

        model = IndexTTSGPT(self.backbone_config(), e["number_text_tokens"], e["number_mel_codes"],
                            e["max_text_tokens"], e["max_mel_tokens"], e["num_latents"])
        model.set_attn_implementation("sdpa")
        return model.to(dtype) if dtype is not None else model

    def hidden_and_head(self, forward, module: IndexTTSGPT, **kwargs):
        hidden = forward(**kwargs, return_hidden=True).hidden_states
        return hidden, lambda h: module.mel_head(module.final_norm(h))

    @property
    def text_id_offset(self) -> int:
        """IndexTTS BPE ids (start_text 0, stop_text 1 included) sit after the mel codes and start_mel."""
        return self.extra["number_mel_codes"] + 1

    row_columns = ("conditioning_latents",)

    @property
    def reserved_text_ids(self) -> int:
        return 2  # start_text 0, stop_text 1

    @property
    def text_vocab_size(self) -> int:
        return self.extra["number_text_tokens"]

    @property
    def latent_shape(self) -> tuple[int, int]:
        return self.extra["num_latents"], self.config["n_embd"]

    @property
    def max_text_tokens(self) -> int:
        return self.extra["max_text_tokens"]

    @property
    def max_generated_tokens(self) -> int:
        # Upstream pads mel codes to max_mel_tokens and adds start/stop: the mel positions hold
        # start_mel (the prefix's last token), max_mel_tokens codes and the stop code.
        return self.extra["max_mel_tokens"] + 1

    def layout_plan(self, **labels):
        """``[latents, start_text, text, stop_text, start_mel, speech]`` (upstream ``UnifiedVoice``:
        conditioning latents, then text and mel each between its start and stop token)."""
        latents = [self.extra["number_mel_codes"]] * self.extra["num_latents"]
        start, stop = self.text_id_offset, self.text_id_offset + 1  # start_text 0, stop_text 1
        return (("ids", latents + [start]), ("text", self.text_id_offset), ("ids", [stop, self.prefix_end_token_id]),
                ("prompt",), ("prefix",), ("generated",))

    def row_inputs(self, rows, device=None):
        n, dim = self.latent_shape
        import torch

        latents = np.stack([np.asarray(r["conditioning_latents"], dtype=np.float32).reshape(n, dim) for r in rows])
        return {"conditioning_latents": torch.from_numpy(latents).to(device or "cpu")}

    def row_problem(self, row):
        latents = row.get("conditioning_latents")
        n, dim = self.latent_shape
        if latents is None:
            return f"missing column 'conditioning_latents' ({n} x {dim} floats)"
        if len(latents) != n * dim:
            return f"conditioning_latents has {len(latents)} values, expected {n * dim} ({n} x {dim})"
        text = int(row["prefix_length"]) - n - 3 - int(row.get("prompt_length") or 0)  # and start/stop text, start_mel
        if text > self.max_text_tokens:
            return f"{text} text tokens, more than {self.name}'s limit of {self.max_text_tokens}"
        return super().row_problem(row)

    def save(self, model: IndexTTSGPT, directory: str | Path) -> Path:
        """Write ``gpt.pth`` as IndexTTS ships it (a plain state dict)."""
        return self.save_state_dict(model, directory)

    def load(self, source: str | None = None, dtype: torch.dtype | None = None) -> IndexTTSGPT:
        """Load the released ``gpt.pth`` (an IndexTTS-1.5 folder, the file itself, or s3://)."""
        state, path = self.read_released_state(source)
        model = self.build()
        # Upstream GPT-2 blocks of older transformers saved causal-mask buffers; they carry no weights.
        state = {k: v for k, v in state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        skipped = load_checked(model, state, path, self.name, ignore_prefixes=CONDITIONING_PREFIXES)
        model.skipped_keys = skipped  # the conditioning encoder's weights: not part of this spec
        return (model.to(dtype) if dtype is not None else model).eval()
