"""The CosyVoice 2 LM module (torch + transformers), built by ``CosyVoice2Spec.build``; its own module so
that the spec (token layout, limits) imports without them: see ``wand.models.cosyvoice2``."""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from .spec import check_id_range

__all__ = ["CosyVoice2LM"]


class _Qwen2Encoder(nn.Module):
    """Holds the backbone under the attribute name upstream uses (``llm.model``)."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.model = Qwen2ForCausalLM(config)


class CosyVoice2LM(nn.Module):
    """CosyVoice 2 LM over the unified id space (see module docstring)."""

    def __init__(self, config: Qwen2Config, speech_token_size: int = 6561):
        super().__init__()
        hidden = config.hidden_size
        self.speech_token_size = speech_token_size
        self.num_speech_ids = speech_token_size + 3
        self.sos_id = self.num_speech_ids
        self.task_id = self.num_speech_ids + 1
        self.text_offset = self.num_speech_ids + 2
        self.llm_embedding = nn.Embedding(2, hidden)
        self.llm = _Qwen2Encoder(config)
        self.llm_decoder = nn.Linear(hidden, self.num_speech_ids)
        self.speech_embedding = nn.Embedding(self.num_speech_ids, hidden)
        forward = self.llm.model.model.forward
        self._cache_kw = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"

    # transformers-like surface used by wand.enable_wand / wand.generate
    @property
    def config(self):
        return self.llm.model.config

    def set_attn_implementation(self, implementation: str) -> None:
        self.llm.model.set_attn_implementation(implementation)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embed unified ids: speech codes, sos / task id, or text."""
        text_vocab = self.llm.model.model.embed_tokens.num_embeddings
        check_id_range(input_ids, self.text_offset + text_vocab, "CosyVoice2LM")
        is_speech = (input_ids < self.num_speech_ids).unsqueeze(-1)
        is_special = ((input_ids >= self.sos_id) & (input_ids < self.text_offset)).unsqueeze(-1)
        speech = self.speech_embedding(input_ids.clamp(max=self.num_speech_ids - 1))
        special = self.llm_embedding((input_ids - self.sos_id).clamp(0, 1))
        text = self.llm.model.model.embed_tokens((input_ids - self.text_offset).clamp(min=0))
        return torch.where(is_speech, speech, torch.where(is_special, special, text))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        past_key_values=None,
        use_cache: bool | None = None,
        return_hidden: bool = False,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """``return_hidden=True`` skips the head and returns the final hidden states as
        ``hidden_states`` (training applies the head in chunks, see ``wand.losses``)."""
        cache = cache if cache is not None else past_key_values
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        out = self.llm.model.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **{self._cache_kw: cache},
        )
        if return_hidden:
            return CausalLMOutputWithPast(hidden_states=out.last_hidden_state, cache=cache if use_cache else None)
        logits = self.llm_decoder(out.last_hidden_state)
        return CausalLMOutputWithPast(logits=logits, cache=cache if use_cache else None)
