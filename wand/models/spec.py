"""The model-spec interface: what WAND needs to know about one AR-TTS model.

A spec says how to build the network (real size or tiny, random weights, no download), how to
load released weights, where the conditioning prefix ends in a token sequence, which ids are
speech tokens (KD and CE apply only there), the stop tokens, and the KV bytes per token.

Every spec works in one *input id space*: a sequence row is a list of ints in
``[0, vocab_size)``. For plain causal LMs (Spark, Llasa, Orpheus) it is the tokenizer's
vocabulary. CosyVoice 2 and IndexTTS keep text and speech in separate embedding tables, so their
specs define an id space with the speech codes first (their head's output ids are then valid
input ids) and text after; see their modules.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TYPE_CHECKING

import numpy as np

from ..kv import kv_bytes_per_token as _kv_bytes_per_token

# A spec is data (the token layout, limits, sizes): it imports and unpickles without torch, so a
# corpus builder's data workers never load it. Methods that make tensors import torch themselves.
if TYPE_CHECKING:  # annotations only: torch is imported where tensors are made
    import torch

__all__ = ["ModelSpec", "check_id_range", "checks_on_device", "device_side_id_checks"]


_device_side_checks = [False]  # set by device_side_id_checks()


@contextlib.contextmanager
def device_side_id_checks():
    """Within it, one-token steps check their ids on the device on every device, as they do on CUDA:
    a CPU test then sees a decode step exactly as a CUDA graph captures it (``wand.profiling.host_reads``)."""
    saved = _device_side_checks[0]
    _device_side_checks[0] = True
    try:
        yield
    finally:
        _device_side_checks[0] = saved


def checks_on_device(input_ids: torch.Tensor) -> bool:
    """Whether a step's input checks run on the device (``torch._assert_async``) rather than reading a
    flag back: a one-token step (a decode step) on CUDA, or on any device within
    ``device_side_id_checks()``."""
    return input_ids.shape[-1] == 1 and (input_ids.device.type == "cuda" or _device_side_checks[0])


def check_id_range(input_ids: torch.Tensor, upper: int, who: str) -> None:
    """Raise ``ValueError`` if an id is outside [0, upper).

    A one-token step on a GPU (a decode step, whose token came from the model's own head) is checked
    on the device instead (``torch._assert_async``: a bad id fails at the next synchronisation), so
    that decoding never waits for the GPU to answer a question about its input; so is a compiled step."""
    bad = (input_ids < 0) | (input_ids >= upper)
    import torch

    message = f"{who}: token ids must be in [0, {upper})"
    if checks_on_device(input_ids) or torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), message)  # also inside a compiled step: no graph break
    elif bool(bad.any()):
        raise ValueError(message)


@dataclass(frozen=True)
class ModelSpec:
    """Common interface of all model specs. Subclasses implement ``build`` and ``load``."""

    name: str
    size: str  # "real", "small", "mini" or "tiny" (wand.models.SIZES)
    family: str
    config: dict[str, Any]  # architecture of the backbone (transformers config kwargs)
    vocab_size: int  # size of the input id space
    speech_range: tuple[int, int]  # [first, last + 1) speech-token ids (targets of CE / KD)
    stop_token_ids: tuple[int, ...]
    prefix_end_token_id: int  # the prefix ends with this marker (then optional prompt speech tokens)
    token_rate_hz: float
    target_window: int  # the paper's W for this model
    paper_prefix_length: int | None = None  # back-solved from the paper's Table 1 (WAND.md)
    source: str | None = None  # Hugging Face id of the released weights
    weights_file: str = "model.safetensors"
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ building and loading
    def backbone_config(self):
        raise NotImplementedError

    def build(self, dtype: torch.dtype | None = None) -> torch.nn.Module:
        """The network with random weights at this spec's size (no download)."""
        raise NotImplementedError

    def hidden_and_head(self, forward, module: torch.nn.Module, **kwargs):
        """(final hidden states [B, T, D], head: hidden -> logits) of a forward with ``kwargs``."""
        raise NotImplementedError

    def load(self, source: str | None = None, dtype: torch.dtype | None = None) -> torch.nn.Module:
        """Released weights from a local path, ``s3://`` URI or Hugging Face id (see ``wand.models.weights``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ sizes
    def kv_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """KV bytes per cached token at ``dtype`` (default bf16)."""
        return _kv_bytes_per_token(self.backbone_config(), dtype)

    @property
    def speech_vocab_size(self) -> int:
        return self.speech_range[1] - self.speech_range[0]

    def target_ids(self) -> torch.Tensor:
        """Ids a generated position may hold: the speech codes, then stop ids outside that range.

        This is the vocabulary of the CE / KD losses and of the teacher's top-k; a compact index i
        into it is stored instead of the id (it fits a smaller integer type)."""
        import torch

        return torch.from_numpy(self.target_id_array())

    def target_id_array(self) -> np.ndarray:
        """``target_ids()`` as an int64 numpy array (no torch: the corpus builder's checks)."""
        lo, hi = self.speech_range
        if lo < 0:
            raise ValueError(f"{self.name} ({self.size}): speech ids unknown; use spec.with_tokenizer(...) first")
        extra = [s for s in self.stop_token_ids if not lo <= s < hi]
        return np.concatenate([np.arange(lo, hi, dtype=np.int64), np.asarray(extra, dtype=np.int64)])

    def tokens_for_seconds(self, seconds: float) -> int:
        return round(seconds * self.token_rate_hz)

    # ------------------------------------------------------------------ token sequences
    def is_speech(self, input_ids: torch.Tensor) -> torch.Tensor:
        """BoolTensor: which ids are speech tokens (the only CE / KD targets)."""
        lo, hi = self.speech_range
        return (input_ids >= lo) & (input_ids < hi)

    def check_token_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        """Raise ``ValueError`` naming the sample and position of any id outside the vocabulary."""
        import torch

        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        bad = valid & ((input_ids < 0) | (input_ids >= self.vocab_size))
        if bad.any():
            b, t = (int(x) for x in torch.nonzero(bad)[0])
            raise ValueError(
                f"{self.name}: token id {int(input_ids[b, t])} at sample {b}, position {t} is outside the "
                f"vocabulary [0, {self.vocab_size})"
            )

    def prefix_lengths(
        self,
        input_ids: torch.Tensor,
        prompt_lengths: torch.Tensor | list[int] | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prefix length per sample: up to and including the end-of-prefix marker, plus that sample's
        prompt speech tokens (``prompt_lengths``, default 0: the ids alone cannot tell prompt speech
        from generated speech, the data pipeline records how many there are).

        Sequences must be right-padded (or unpadded); ``attention_mask`` marks real tokens.
        """
        import torch

        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        if self.prefix_end_token_id < 0:
            raise ValueError(
                f"{self.name} ({self.size}): its token ids come from the checkpoint's tokenizer; use "
                "spec.with_tokenizer(AutoTokenizer.from_pretrained('<checkpoint>/LLM')) first"
            )
        self.check_token_ids(input_ids, attention_mask)
        batch = input_ids.shape[0]
        lengths = (
            torch.full((batch,), input_ids.shape[1], dtype=torch.long)
            if attention_mask is None
            else attention_mask.long().sum(-1).cpu()
        )
        prompts = torch.zeros(batch, dtype=torch.long) if prompt_lengths is None else torch.as_tensor(prompt_lengths).long().cpu()
        if prompts.shape != (batch,):
            raise ValueError(f"prompt_lengths must have one entry per sample ({batch}), got shape {tuple(prompts.shape)}")
        out = torch.empty(batch, dtype=torch.long)
        for b in range(batch):
            row = input_ids[b, : int(lengths[b])].cpu()
            hits = torch.nonzero(row == self.prefix_end_token_id).flatten()
            if hits.numel() == 0:
                raise ValueError(
                    f"{self.name}: sample {b} has no end-of-prefix marker (id {self.prefix_end_token_id}, "
                    f"{self.extra.get('prefix_end_token', 'marker')}); every row must hold the conditioning prefix"
                )
            end = int(hits[0]) + 1 + int(prompts[b])
            if end > int(lengths[b]):
                raise ValueError(
                    f"{self.name}: sample {b}: prefix ({end} tokens with {int(prompts[b])} prompt tokens) is longer "
                    f"than the sequence ({int(lengths[b])} tokens)"
                )
            out[b] = end
        return out

    # ------------------------------------------------------------------ rows: layout, inputs, limits
    # A corpus row is {"id", "input_ids", "prefix_length", "prompt_length", + ``row_columns``}. What
    # differs per model (the layout of the prefix, extra forward inputs, length limits) is answered
    # here, so the data pipeline never asks which family a spec is.
    row_columns: ClassVar[tuple[str, ...]] = ()  # model-specific corpus columns (IndexTTS: conditioning_latents)

    @property
    def text_id_offset(self) -> int:
        """What ``text_ids`` adds to a raw text-tokenizer id (0 for one-vocabulary models)."""
        return 0

    def text_ids(self, text_token_ids: torch.Tensor) -> torch.Tensor:
        """Text-tokenizer ids mapped into this spec's input id space (identity for one-vocabulary models)."""
        return text_token_ids + self.text_id_offset if self.text_id_offset else text_token_ids

    @property
    def reserved_text_ids(self) -> int:
        """Raw text ids below this are the model's own markers, not text (IndexTTS: start/stop text)."""
        return 0

    @property
    def text_vocab_size(self) -> int | None:
        """Size of the raw text vocabulary where the model has its own text table, else None."""
        return None

    @property
    def global_codes(self) -> int | None:
        """Size of the global (speaker) codebook the prefix holds (Spark), or None."""
        return None

    @property
    def latent_shape(self) -> tuple[int, int] | None:
        """(count, width) of the conditioning latents a row carries (IndexTTS), or None."""
        return None

    @property
    def max_text_tokens(self) -> int | None:
        """The model's limit on text tokens in the prefix, or None."""
        return None

    @property
    def max_generated_tokens(self) -> int | None:
        """The model's limit on generated tokens, stop id included (IndexTTS's learned mel positions), or None."""
        return None

    @property
    def backbone_positions(self) -> int | None:
        """Positions the backbone's config declares (``max_position_embeddings``), or None."""
        config = self.config if isinstance(self.config, dict) else {}
        return config.get("max_position_embeddings") or config.get("n_positions")

    @property
    def context_length(self) -> int | None:
        """The widest window that can mask anything: the backbone's positions, or the generated
        positions where the model's own limits say it (IndexTTS)."""
        return self.backbone_positions or self.max_generated_tokens

    def layout_plan(self, **labels) -> tuple[tuple, ...]:
        """The layout as data, in order: ``("ids", [...])`` fixed ids, ``("text", offset)`` the raw text
        ids plus ``offset``, ``("global", offset)`` the global codes plus ``offset`` (Spark),
        ``("prompt",)`` / ``("generated",)`` the speech ids as given, and ``("prefix",)`` where the
        conditioning prefix ends. ``layout`` builds one row from it, the corpus builder a whole batch
        (``pipeline.data.corpus_batch``): one definition per model. ``labels``: per-row fixed choices
        (Spark's controllable form: ``style``)."""
        return (("text", self.text_id_offset), ("ids", [self.prefix_end_token_id]),  # Llasa / Orpheus
                ("prompt",), ("prefix",), ("generated",))

    def layout(self, text: torch.Tensor, prompt: torch.Tensor, generated: torch.Tensor,
               global_tokens: torch.Tensor | None = None, **labels) -> tuple[torch.Tensor, int]:
        """One sequence from its parts, in the layout of the model's own training and inference code;
        returns (ids, prefix length). ``text``: raw text-tokenizer ids (mapped with ``text_ids`` here);
        ``prompt`` / ``generated``: speech ids (the caller appends the stop id to ``generated``)."""
        import torch

        given = {"prompt": prompt, "generated": generated}
        plan = self.layout_plan(**labels)
        pieces, prefix = [], 0
        for kind, *arg in plan:
            if kind == "prefix":
                prefix = sum(len(p) for p in pieces)
            elif kind == "ids":
                pieces.append(torch.tensor(arg[0], dtype=torch.long))
            elif kind == "text":
                pieces.append(text + arg[0])
            elif kind == "global":
                pieces.append(torch.as_tensor(global_tokens) + arg[0] if global_tokens is not None
                              else torch.tensor([], dtype=torch.long))
            else:
                pieces.append(given[kind])
        if "prompt" not in {step[0] for step in plan} and len(prompt):
            raise ValueError(f"{self.name}: this layout has no prompt speech")
        return torch.cat(pieces), prefix

    def row_inputs(self, rows: list[dict], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """The model-specific forward inputs of a batch of rows (none for most models)."""
        return {}

    def over_limits(self, lengths, prefix_lengths):
        """(more generated tokens than the model's limit, more tokens than its context): the length
        limits ``row_problem`` refuses, for one row (ints -> bools) or a whole chunk at once (numpy
        arrays -> bool arrays; the corpus builder). Plain operators: no per-row cost in the row checks."""
        limit, context = self.max_generated_tokens, self.backbone_positions
        too_many = lengths - prefix_lengths > limit if limit is not None else False
        too_long = lengths > context if context is not None else False
        return too_many, too_long

    def row_problem(self, row: dict) -> str | None:
        """Why a row cannot be used with this model beyond the vocabulary (its own columns, its
        length limits), or None. ``input_ids`` and ``prefix_length`` are already checked."""
        generated = len(row["input_ids"]) - int(row["prefix_length"])
        too_many, too_long = self.over_limits(len(row["input_ids"]), int(row["prefix_length"]))
        if too_many:
            return (f"{generated} generated tokens, more than {self.name}'s limit of {self.max_generated_tokens} "
                    "(the model has no positions past it)")
        context = self.backbone_positions
        if too_long:
            return (f"{len(row['input_ids'])} tokens, longer than {self.name}'s context of {context} positions "
                    "(max_position_embeddings): split the utterance or drop it")
        return None

    # ------------------------------------------------------------------ pickled state-dict releases
    def save_state_dict(self, model: torch.nn.Module, directory) -> "Path":
        """Write ``weights_file`` as a plain state dict, the way CosyVoice 2 / IndexTTS ship theirs."""
        path = Path(directory) / self.weights_file
        path.parent.mkdir(parents=True, exist_ok=True)
        import torch

        torch.save(model.state_dict(), path)
        return path

    def read_released_state(self, source: str | None) -> tuple[dict[str, torch.Tensor], "Path"]:
        """The state dict in ``weights_file`` under ``source`` (folder, the file itself, or s3://)."""
        from .weights import WeightsNotFound, read_state_dict, resolve_source

        source = source or self.source
        if source is None:
            raise WeightsNotFound(f"{self.name}: pass source= a folder holding {self.weights_file}, or an s3:// URI")
        return read_state_dict(resolve_source(source, self.name, self.source), (self.weights_file,))

    def describe(self) -> dict[str, Any]:
        """Plain facts for logs and tables."""
        return {
            "name": self.name,
            "size": self.size,
            "family": self.family,
            "vocab_size": self.vocab_size,
            "speech_vocab_size": self.speech_vocab_size,
            "token_rate_hz": self.token_rate_hz,
            "target_window": self.target_window,
            "kv_bytes_per_token_bf16": self.kv_bytes_per_token(),
            "source": self.source,
        }
