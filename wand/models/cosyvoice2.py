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

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .spec import ModelSpec
from .weights import load_checked

if TYPE_CHECKING:  # the module and its backbone load only when a model is built
    import torch
    from transformers import Qwen2Config

    from .cosyvoice2_lm import CosyVoice2LM

__all__ = ["CosyVoice2Spec"]


def __getattr__(name: str):
    """``from wand.models.cosyvoice2 import CosyVoice2LM`` still works (the module lives in ``cosyvoice2_lm``)."""
    if name == "CosyVoice2LM":
        from .cosyvoice2_lm import CosyVoice2LM

        return CosyVoice2LM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

@dataclass(frozen=True)
class CosyVoice2Spec(ModelSpec):
    def backbone_config(self) -> Qwen2Config:
        from transformers import Qwen2Config

        return Qwen2Config(**self.config)

    def build(self, dtype: torch.dtype | None = None) -> CosyVoice2LM:
        from .cosyvoice2_lm import CosyVoice2LM

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

