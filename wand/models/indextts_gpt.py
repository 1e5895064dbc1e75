"""The IndexTTS GPT module (torch + transformers), built by ``IndexTTSSpec.build``; its own module so
that the spec (token layout, limits) imports without them: see ``wand.models.indextts``."""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import GPT2Config, GPT2Model
from transformers.modeling_outputs import CausalLMOutputWithPast

from .spec import check_id_range, checks_on_device

__all__ = ["IndexTTSGPT"]


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
            if checks_on_device(input_ids) or torch.compiler.is_compiling():
                torch._assert_async(~(mel_pos > last).any(), past)
            elif bool((mel_pos > last).any()):
                raise ValueError(past)
        mel_pos = mel_pos.clamp(0, last)
        mel = self.mel_embedding(input_ids.clamp(max=self.number_mel_codes - 1)) + self.mel_pos_embedding.emb(mel_pos)
        text = self.text_embedding((input_ids - self.text_offset).clamp(min=0)) + self.text_pos_embedding.emb(text_pos)
        emb = torch.where(is_mel, mel, text)
        no_latents = "IndexTTSGPT: the input has conditioning-latent slots; pass conditioning_latents=[B, 32, dim]"
        if checks_on_device(input_ids) and conditioning_latents is None:
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
