"""SparkTTS's LLM (Qwen2.5-0.5B with BiCodec tokens) and its three prompt forms.

Upstream ``cli/SparkTTS.py`` builds one of three prompts (``process_prompt`` and
``process_prompt_control``); where the conditioning prefix ends differs, and so does what the model
generates after it:

- ``clone`` (voice cloning with the prompt's transcript): ``<|task_tts|><|start_content|>`` prompt
  text + text ``<|end_content|><|start_global_token|>`` global tokens ``<|end_global_token|>
  <|start_semantic_token|>`` + the prompt's semantic tokens. The prefix ends after those; the model
  generates semantic tokens, then ``<|im_end|>``.
- ``clone_no_text`` (voice cloning without a transcript): the same up to ``<|end_global_token|>``,
  where the prefix ends; the model generates ``<|start_semantic_token|>``, semantic tokens, ``<|im_end|>``.
- ``controllable`` (no reference audio): ``<|task_controllable_tts|><|start_content|>`` text
  ``<|end_content|><|start_style_label|><|gender_g|><|pitch_label_p|><|speed_label_s|><|end_style_label|>``,
  where the prefix ends; the model generates ``<|start_global_token|>``, the global tokens,
  ``<|end_global_token|><|start_semantic_token|>``, semantic tokens, ``<|im_end|>``: the global
  tokens belong to the generated part.

The ids come from the checkpoint's ``LLM/tokenizer.json`` (``spec.with_tokenizer(tokenizer)``); the
tiny presets number the ``clone`` forms' tokens themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .causal_lm import CausalLMSpec

__all__ = ["SparkTTSSpec", "PROMPT_FORMS", "SPECIAL_TOKENS", "STYLE_TOKENS"]

PROMPT_FORMS = ("clone", "clone_no_text", "controllable")
SPECIAL_TOKENS = (
    "<|task_tts|>", "<|start_content|>", "<|end_content|>", "<|start_global_token|>",
    "<|end_global_token|>", "<|start_semantic_token|>", "<|im_end|>",
)
# Only the controllable form uses these (upstream GENDER_MAP and LEVELS_MAP: 2 genders, 5 levels).
CONTROL_TOKENS = ("<|task_controllable_tts|>", "<|start_style_label|>", "<|end_style_label|>")
STYLE_TOKENS = {"gender": ("<|gender_{}|>", 2), "pitch": ("<|pitch_label_{}|>", 5), "speed": ("<|speed_label_{}|>", 5)}
_PREFIX_END = {"clone": "<|start_semantic_token|>", "clone_no_text": "<|end_global_token|>",
               "controllable": "<|end_style_label|>"}


@dataclass(frozen=True)
class SparkTTSSpec(CausalLMSpec):
    prompt_form: str = "clone"

    def __post_init__(self) -> None:
        if self.prompt_form not in PROMPT_FORMS:
            raise ValueError(f"{self.name}: prompt_form must be one of {', '.join(PROMPT_FORMS)}, got {self.prompt_form!r}")

    def _id(self, token: str) -> int:
        ids = self.extra.get("token_ids", {})
        if token not in ids:
            raise ValueError(f"{self.name} ({self.size}): no id for {token}; use "
                             "spec.with_tokenizer(AutoTokenizer.from_pretrained('<checkpoint>/LLM')) first")
        return int(ids[token])

    @property
    def global_codes(self) -> int:
        return int(self.extra["global_codes"])

    def _global_ids(self, codes):
        """Global codes (ints, an array or a tensor) -> their token ids."""
        if "first_global_id" not in self.extra:
            raise ValueError(f"{self.name}: global-token ids unknown; use spec.with_tokenizer(...) first")
        return self.extra["first_global_id"] + codes

    def with_prompt_form(self, form: str) -> "SparkTTSSpec":
        """The same spec for prompts of ``form`` (one of PROMPT_FORMS): its prefix ends elsewhere."""
        spec = replace(self, prompt_form=form)
        return replace(spec, prefix_end_token_id=spec._id(_PREFIX_END[form]))

    def target_id_array(self) -> np.ndarray:
        """Semantic codes and ``<|im_end|>``; plus what the form makes the model generate before them."""
        base = super().target_id_array()
        if self.prompt_form == "clone":
            return base
        structure = [self._id("<|start_semantic_token|>")]
        if self.prompt_form == "controllable":
            structure = [self._id("<|start_global_token|>"), self._id("<|end_global_token|>")] + structure
            structure += self._global_ids(np.arange(self.global_codes)).tolist()
        return np.concatenate([base, np.asarray(structure, dtype=np.int64)])

    def layout_plan(self, style: tuple[int, int, int] | None = None, **labels):
        """The form's sequence (module docstring). ``style``: (gender, pitch, speed) label indices of
        the controllable form."""
        t = lambda *names: ("ids", [self._id(n) for n in names])  # noqa: E731
        if "first_global_id" not in self.extra:
            raise ValueError(f"{self.name}: global-token ids unknown; use spec.with_tokenizer(...) first")
        glob = ("global", int(self.extra["first_global_id"]))
        text = ("text", self.text_id_offset)
        if self.prompt_form == "controllable":
            if style is None or len(style) != 3:
                raise ValueError(f"{self.name}: the controllable form needs style=(gender, pitch, speed)")
            labels_ = []
            for (kind, (pattern, count)), value in zip(STYLE_TOKENS.items(), style):
                if not 0 <= int(value) < count:
                    raise ValueError(f"{self.name}: style {kind} must be in [0, {count}), got {value}")
                labels_.append(pattern.format(int(value)))
            return (t("<|task_controllable_tts|>", "<|start_content|>"), text,
                    t("<|end_content|>", "<|start_style_label|>", *labels_, "<|end_style_label|>"), ("prefix",),
                    t("<|start_global_token|>"), glob, t("<|end_global_token|>", "<|start_semantic_token|>"),
                    ("generated",))
        head = (t("<|task_tts|>", "<|start_content|>"), text, t("<|end_content|>", "<|start_global_token|>"), glob)
        if self.prompt_form == "clone":
            return head + (t("<|end_global_token|>", "<|start_semantic_token|>"), ("prompt",), ("prefix",), ("generated",))
        return head + (t("<|end_global_token|>"), ("prefix",), t("<|start_semantic_token|>"), ("generated",))

    def layout(self, text, prompt, generated, global_tokens=None, style: tuple[int, int, int] | None = None):
        """The form's sequence (``layout_plan``). ``global_tokens``: BiCodec global codes (0-based)."""
        form = self.prompt_form
        if form != "clone" and len(prompt):
            raise ValueError(f"{self.name}: the {form} form has no prompt speech" + (
                " (upstream drops it without its text)" if form == "clone_no_text" else ""))
        if form != "controllable" and global_tokens is None:
            raise ValueError(f"{self.name}: the {form} form needs the reference audio's global tokens")
        return super().layout(text, prompt, generated, global_tokens, style=style)

    def with_tokenizer(self, tokenizer) -> "SparkTTSSpec":
        """The same spec with token ids read from the checkpoint's own tokenizer (``LLM/tokenizer.json``):
        the special tokens, the semantic and global BiCodec codes, and (when present) the
        controllable form's style tokens."""
        unk = getattr(tokenizer, "unk_token_id", None)
        lookup = lambda tok: (lambda i: None if i is None or i == unk else int(i))(tokenizer.convert_tokens_to_ids(tok))  # noqa: E731
        ids = {tok: lookup(tok) for tok in SPECIAL_TOKENS}
        missing = [tok for tok, i in ids.items() if i is None]
        ranges = {}
        for kind, count in (("semantic", self.extra["semantic_codes"]), ("global", self.extra["global_codes"])):
            first, last = lookup(f"<|bicodec_{kind}_0|>"), lookup(f"<|bicodec_{kind}_{count - 1}|>")
            if first is None or last is None or last - first + 1 != count:
                missing.append(f"<|bicodec_{kind}_0..{count - 1}|>")
            ranges[kind] = first
        if missing:
            raise ValueError(f"{self.name}: this tokenizer lacks Spark's tokens ({', '.join(missing)})")
        control = {tok: lookup(tok) for tok in CONTROL_TOKENS}
        control.update({pattern.format(i): lookup(pattern.format(i))
                        for pattern, count in STYLE_TOKENS.values() for i in range(count)})
        ids.update({tok: i for tok, i in control.items() if i is not None})  # absent: no controllable form
        first = ranges["semantic"]
        spec = replace(self, speech_range=(first, first + self.extra["semantic_codes"]),
                       stop_token_ids=(ids["<|im_end|>"],),
                       extra={**self.extra, "token_ids": ids, "first_global_id": ranges["global"],
                              "ids_from_tokenizer": True})
        return spec.with_prompt_form(self.prompt_form)
