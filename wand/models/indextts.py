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

import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import GPT2Config, GPT2Model
from transformers.modeling_outputs import CausalLMOutputWithPast

from .spec import ModelSpec, check_id_range
from .weights import load_checked

__all__ = ["IndexTTSGPT", "IndexTTSSpec"]

CONDITIONING_PREFIXES = ("conditioning_encoder.", "perceiver_encoder.")


class _NoPositions(nn.Module):
    """Stands in for GPT-2's ``wpe``: IndexTTS adds its own segment positions before the GPT.

    Returns a 0-d zero so adding it keeps the hidden states' dtype (bf16 stays bf16)."""

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), device=position_ids.device)


class _LearnedPositions(nn.Module):
    def __init__(self, length: int, dim: int):
        super().__init__()
        self.emb = nn.Embedding(length, dim)


class IndexTTSGPT(nn.Module):
    def __init__(self, config: GPT2Config, number_text_tokens: int, number_mel_codes: int,
                 max_text_tokens: int, max_mel_tokens: int, num_latents: int = 32):
        super().__init__()
        dim = config.n_embd
        self.number_mel_codes = number_mel_codes
        self.start_mel, self.stop_mel = number_mel_codes - 2, number_mel_codes - 1
        self.latent_id = number_mel_codes
        self.text_offset = number_mel_codes + 1
        self.num_latents = num_latents
        self.text_embedding = nn.Embedding(number_text_tokens + 1, dim)
        self.mel_embedding = nn.Embedding(number_mel_codes, dim)
        self.gpt = GPT2Model(config)
        del self.gpt.wte  # upstream deletes it too: embeddings come from the tables above
        self.gpt.wpe = _NoPositions()
        self.mel_pos_embedding = _LearnedPositions(max_mel_tokens + 2 + 1, dim)
        self.text_pos_embedding = _LearnedPositions(max_text_tokens + 2, dim)
        self.final_norm = nn.LayerNorm(dim)
        self.text_head = nn.Linear(dim, number_text_tokens + 1)
        self.mel_head = nn.Linear(dim, number_mel_codes)
        self._cache_kw = "cache" if "cache" in inspect.signature(self.gpt.forward).parameters else "past_key_values"

    @property
    def config(self):
        return self.gpt.config

    def set_attn_implementation(self, implementation: str) -> None:
        self.gpt.set_attn_implementation(implementation)

    def embed(self, input_ids, position_ids, prefix_lengths, conditioning_latents=None):
        """Token embedding + the segment's learned position; latent slots take the latents."""
        text_vocab = self.text_embedding.num_embeddings
        check_id_range(input_ids, self.text_offset + text_vocab, "IndexTTSGPT")
        is_mel = (input_ids < self.number_mel_codes).unsqueeze(-1)
        is_latent = input_ids == self.latent_id
        # Text starts right after the latents; mel codes at start_mel, the prefix's last token.
        text_pos = (position_ids - self.num_latents).clamp(0, self.text_pos_embedding.emb.num_embeddings - 1)
        mel_pos = position_ids - (prefix_lengths.view(-1, 1) - 1)
        last = self.mel_pos_embedding.emb.num_embeddings - 1
        if input_ids.shape[1] == 1:
            # A decode step past the learned mel positions: upstream stops at max_mel_tokens; clamping
            # would silently reuse the last position. (Training rows are checked by the row checks.)
            past = f"IndexTTSGPT: generated past max_mel_tokens (mel position > {last}); stop generation there"
            if input_ids.device.type == "cuda" or torch.compiler.is_compiling():
                torch._assert_async(~(mel_pos > last).any(), past)
            elif bool((mel_pos > last).any()):
                raise ValueError(past)
        mel_pos = mel_pos.clamp(0, last)
        mel = self.mel_embedding(input_ids.clamp(max=self.number_mel_codes - 1)) + self.mel_pos_embedding.emb(mel_pos)
        text = self.text_embedding((input_ids - self.text_offset).clamp(min=0)) + self.text_pos_embedding.emb(text_pos)
        emb = torch.where(is_mel, mel, text)
        no_latents = "IndexTTSGPT: the input has conditioning-latent slots; pass conditioning_latents=[B, 32, dim]"
        if input_ids.shape[1] == 1 and input_ids.device.type == "cuda" and conditioning_latents is None:
            # A decode step on a GPU: checked on the device, never read back (see check_id_range).
            torch._assert_async(~is_latent.any(), no_latents)
        elif bool(is_latent.any()):
            if conditioning_latents is None:
                raise ValueError(no_latents)
            slot = (torch.cumsum(is_latent.long(), -1) - 1).clamp(min=0)
            if int(slot.max()) >= conditioning_latents.shape[1]:
                raise ValueError(f"IndexTTSGPT: more latent slots than the {conditioning_latents.shape[1]} latents given")
            gathered = torch.gather(conditioning_latents.to(emb.dtype), 1,
                                    slot.unsqueeze(-1).expand(-1, -1, emb.shape[-1]))
            emb = torch.where(is_latent.unsqueeze(-1), gathered, emb)
        return emb

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                use_cache=None, prefix_lengths=None, conditioning_latents=None, return_hidden=False,
                **kwargs) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else past_key_values
        if position_ids is None or prefix_lengths is None:
            raise ValueError("IndexTTSGPT needs position_ids and prefix_lengths: call it through wand.enable_wand")
        emb = self.embed(input_ids, position_ids, prefix_lengths.to(input_ids.device), conditioning_latents)
        out = self.gpt(inputs_embeds=emb, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=use_cache, **{self._cache_kw: cache})
        if return_hidden:  # the head (final_norm + mel_head) is applied by the caller, in chunks
            return CausalLMOutputWithPast(hidden_states=out.last_hidden_state, cache=cache if use_cache else None)
        logits = self.mel_head(self.final_norm(out.last_hidden_state))
        return CausalLMOutputWithPast(logits=logits, cache=cache if use_cache else None)


@dataclass(frozen=True)
class IndexTTSSpec(ModelSpec):
    def backbone_config(self) -> GPT2Config:
        return GPT2Config(**self.config)

    def build(self, dtype: torch.dtype | None = None) -> IndexTTSGPT:
        e = self.extra
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
