"""Plain causal-LM TTS models: SparkTTS (Qwen2), Llasa 1B/3B/8B and Orpheus-3B (Llama).

Their sequences are ordinary token ids of one extended vocabulary, so the backbone is the
transformers class itself (``Qwen2ForCausalLM`` / ``LlamaForCausalLM``), loaded with
``from_pretrained`` from the released folder, and ``wand.enable_wand`` applies directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .spec import ModelSpec
from .weights import WeightsNotFound, WeightsRefused, require_finite, resolve_source

if TYPE_CHECKING:
    import torch

__all__ = ["CausalLMSpec"]

# transformers' config and model class per backbone, by name: imported when a model is built, so
# the spec (token layout, limits) is cheap to import and to unpickle in a data worker.
_BACKBONES = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "llama": ("LlamaConfig", "LlamaForCausalLM")}
# Fields of the backbone config that must match the spec when loading a released folder.
_ARCH_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")


def _backbone(name: str) -> tuple[type, type]:
    import transformers

    return tuple(getattr(transformers, cls) for cls in _BACKBONES[name])


@dataclass(frozen=True)
class CausalLMSpec(ModelSpec):
    backbone: str = "qwen2"

    def backbone_config(self):
        config_cls, _ = _backbone(self.backbone)
        return config_cls(**self.config)

    def build(self, dtype: torch.dtype | None = None) -> torch.nn.Module:
        _, model_cls = _backbone(self.backbone)
        model = model_cls(self.backbone_config())
        model.set_attn_implementation("sdpa")
        return model.to(dtype) if dtype is not None else model

    def hidden_and_head(self, forward, module: torch.nn.Module, **kwargs):
        """Final (normed) hidden states [B, T, D] and the LM head; logits only for the last position
        are computed here, the caller applies the head in chunks (``wand.losses``)."""
        out = forward(**kwargs, output_hidden_states=True, logits_to_keep=1)
        return out.hidden_states[-1], module.lm_head

    def save(self, model: torch.nn.Module, directory: str | Path) -> Path:
        """Write ``model`` as the released models ship it (config.json + model.safetensors)."""
        model.save_pretrained(str(directory), safe_serialization=True)
        return Path(directory)

    def load(self, source: str | None = None, dtype: torch.dtype | None = None) -> torch.nn.Module:
        """Load released weights. ``source``: local folder, ``s3://`` URI, or Hugging Face id
        (default: this spec's ``source``). Spark keeps its LLM in the ``LLM/`` subfolder."""
        source = source or self.source
        if source is None:
            raise WeightsNotFound(f"{self.name}: pass source= a local directory or s3:// URI")
        path = resolve_source(source, self.name, self.source)
        if (path / "LLM" / "config.json").exists():
            path = path / "LLM"
        if not (path / "config.json").exists():
            raise WeightsNotFound(f"{self.name}: {path} has no config.json (expected a transformers model folder)")
        config_cls, model_cls = _backbone(self.backbone)
        loaded_config = config_cls.from_pretrained(str(path))
        expected = self.backbone_config()
        diffs = {f: (getattr(loaded_config, f, None), getattr(expected, f, None)) for f in _ARCH_FIELDS}
        diffs = {f: v for f, v in diffs.items() if v[0] != v[1]}
        if diffs:
            detail = ", ".join(f"{f}: checkpoint {a} vs preset {b}" for f, (a, b) in diffs.items())
            raise ValueError(f"{self.name} ({self.size}): {path} is a different architecture ({detail})")
        import torch
        from safetensors import SafetensorError

        try:
            model, info = model_cls.from_pretrained(str(path), dtype=dtype or torch.float32, attn_implementation="sdpa",
                                                    output_loading_info=True)
        except (OSError, RuntimeError, ValueError, SafetensorError) as err:  # a truncated or foreign weights file
            raise WeightsRefused(f"{self.name}: {path}: the weights cannot be read ({type(err).__name__}: "
                                 f"{str(err)[:200]})") from err
        # transformers initialises missing tensors randomly and only reports it: a partial checkpoint
        # would train and decode from noise. Tied weights (lm_head = embed_tokens) are not missing.
        problems = {kind: sorted(info.get(kind) or []) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        problems = {kind: keys for kind, keys in problems.items() if keys}
        if problems:
            detail = "; ".join(f"{kind.replace('_keys', '')} {len(keys)} (e.g. {[str(k) for k in keys[:3]]})"
                               for kind, keys in problems.items())
            raise WeightsRefused(f"{self.name}: {path} does not hold this model's weights completely: {detail}")
        require_finite(dict(model.state_dict()), path, self.name)
        return model.eval()

    def with_tokenizer(self, tokenizer) -> "CausalLMSpec":
        """The same spec with token ids read from the checkpoint's own tokenizer; Llasa's and
        Orpheus's presets already hold them (SparkTTS's spec overrides this)."""
        return self
