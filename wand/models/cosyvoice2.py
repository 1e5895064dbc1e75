"""CosyVoice 2-0.5B's LM as a WAND-ready module with the parameter names of its released ``llm.pt``.

Upstream (FunAudioLLM/CosyVoice, ``cosyvoice/llm/llm.py``, class ``Qwen2LM``) holds:

* ``llm_embedding``: Embedding(2, 896), row 0 = sos, row 1 = task id;
* ``llm.model``: a transformers ``Qwen2ForCausalLM`` (Qwen2.5-0.5B), driven with ``inputs_embeds``;
  its ``model.embed_tokens`` embeds text, its ``lm_head`` is unused for speech;
* ``speech_embedding``: Embedding(6561 + 3, 896) and ``llm_decoder``: Linear(896, 6561 + 3), the
  speech codes plus eos (6561) and two more stop/fill ids (6562, 6563).

The sequence is ``[sos, prompt_text + text, task_id, prompt speech tokens]`` then speech tokens.
This module puts them in one id space so the WAND machinery can work on ids: speech codes keep
their ids 0..6563 (so ``llm_decoder``'s argmax is a valid next input id), sos = 6564,
task id = 6565, and text token t is ``6566 + t``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from .spec import ModelSpec, check_id_range
from .weights import load_checked

__all__ = ["CosyVoice2LM", "CosyVoice2Spec"]


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


@dataclass(frozen=True)
class CosyVoice2Spec(ModelSpec):
    def backbone_config(self) -> Qwen2Config:
        return Qwen2Config(**self.config)

    def build(self, dtype: torch.dtype | None = None) -> CosyVoice2LM:
        model = CosyVoice2LM(self.backbone_config(), speech_token_size=self.extra["speech_token_size"])
        model.set_attn_implementation("sdpa")
        return model.to(dtype) if dtype is not None else model

    def hidden_and_head(self, forward, module: CosyVoice2LM, **kwargs):
        """Final hidden states [B, T, D] (through ``forward``, e.g. a DeepSpeed engine) and the head."""
        return forward(**kwargs, return_hidden=True).hidden_states, module.llm_decoder

    @property
    def text_id_offset(self) -> int:
        """Qwen text-tokenizer ids sit after the speech codes and their 5 specials."""
        return self.extra["speech_token_size"] + 5

    @property
    def text_vocab_size(self) -> int:
        return self.config["vocab_size"]

    def layout_plan(self, **labels):
        """``[sos, text, task_id, prompt speech, speech]`` (upstream ``Qwen2LM.forward`` /
        ``inference``: sos_eos, text, task_id, then the prompt's and the target's speech tokens)."""
        sos, task = self.prefix_end_token_id - 1, self.prefix_end_token_id
        return (("ids", [sos]), ("text", self.text_id_offset), ("ids", [task]), ("prompt",), ("prefix",), ("generated",))

    def save(self, model: CosyVoice2LM, directory: str | Path) -> Path:
        """Write ``llm.pt`` as CosyVoice 2 ships it (a plain state dict)."""
        return self.save_state_dict(model, directory)

    def load(self, source: str | None = None, dtype: torch.dtype | None = None) -> CosyVoice2LM:
        """Load the released ``llm.pt`` (a CosyVoice2-0.5B folder, the file itself, or s3://)."""
        state, path = self.read_released_state(source)
        model = self.build()
        load_checked(model, state, path, self.name)
        return (model.to(dtype) if dtype is not None else model).eval()

