"""The exported student as an MLflow ``pyfunc`` model (the loader module MLflow imports).

MLflow loads it with ``mlflow.pyfunc.load_model("models:/wand-cosyvoice2@champion")``: this module's
``_load_pyfunc`` reads the model folder (the family's release-format weights plus ``wand_model.json``),
and ``predict`` generates speech tokens with WAND's constant-size cache (``wand.generate``, the
trained W, the family's stop ids). It needs the ``wand-tts`` library and MLflow only (no ray, no
deepspeed, no pickle: the weights are the family's own files).

Input, one row per utterance, in the model's own prompt layout (what a corpus row holds up to its
prefix): ``input_ids`` (the prompt, ints of the model's id space), ``prefix_length`` (where the
conditioning prefix ends, <= the prompt's length) and the family's own columns (IndexTTS:
``conditioning_latents``). Output, one row each: ``speech_ids`` (the generated tokens, up to and
without the stop id), ``stopped`` and ``generated_tokens``. Params: ``max_new_tokens``, ``do_sample``,
``temperature``, ``top_k``, ``seed``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

import wand
from wand.models import get_spec

DESCRIBE = "wand_model.json"  # model, model_size, window, experiment: how to rebuild the student


def default_params(spec) -> dict[str, Any]:
    """The params of ``predict`` and their defaults (also the signature's param schema)."""
    return {"max_new_tokens": int(spec.max_generated_tokens or spec.tokens_for_seconds(30.0)), "do_sample": False,
            "temperature": 1.0, "top_k": 0, "seed": 0}


def prompt_of(spec, row: dict) -> dict[str, Any]:
    """A corpus row cut to its prompt (the ids up to its prefix, plus the family's columns): an input row."""
    prefix = int(row["prefix_length"])
    extra = {c: np.asarray(row[c], dtype=np.float64).reshape(-1).tolist() for c in spec.row_columns}
    return {"input_ids": [int(t) for t in row["input_ids"][:prefix]], "prefix_length": prefix, **extra}


class WandStudent:
    """A WAND student and its spec: ``predict`` is what MLflow's pyfunc wrapper calls."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        describe_path = folder / DESCRIBE
        if not describe_path.is_file():
            raise FileNotFoundError(f"{folder}: no {DESCRIBE}; this is not a wand-tts student model folder")
        self.describe = json.loads(describe_path.read_text())
        self.spec = get_spec(self.describe["model"], self.describe["model_size"])
        self.window = int(self.describe["window"])
        self.model = wand.enable_wand(self.spec.load(str(folder)).eval(), self.window)

    def predict(self, model_input, params: dict[str, Any] | None = None):
        import pandas as pd

        settings = {**default_params(self.spec), **{k: v for k, v in (params or {}).items() if v is not None}}
        unknown = sorted(set(settings) - set(default_params(self.spec)))
        if unknown:
            raise ValueError(f"unknown params {unknown}; known: {sorted(default_params(self.spec))}")
        rows = _records(model_input)
        out = [self._one(index, row, settings) for index, row in enumerate(rows)]
        return pd.DataFrame(out, columns=["speech_ids", "stopped", "generated_tokens"])

    def _one(self, index: int, row: dict, settings: dict) -> dict[str, Any]:
        spec = self.spec
        ids = _ints(row.get("input_ids"), f"row {index}: input_ids")
        prefix = row.get("prefix_length")
        if prefix is None or isinstance(prefix, bool) or int(prefix) != prefix or not 1 <= int(prefix) <= len(ids):
            raise ValueError(f"row {index}: prefix_length must be an int in [1, {len(ids)}] (the prompt's length), "
                             f"got {prefix!r}")
        prompt = torch.tensor([ids], dtype=torch.long)
        columns = {c: row.get(c) for c in spec.row_columns}
        try:
            spec.check_token_ids(prompt)
            problem = spec.row_problem({"input_ids": ids, "prefix_length": int(prefix), **columns})
            if problem is None and spec.row_columns:
                extra = spec.row_inputs([{c: np.asarray(v, dtype=np.float32) for c, v in columns.items()}])
        except (ValueError, TypeError) as err:
            problem = str(err)
        if problem is not None:
            raise ValueError(f"row {index}: {problem}")
        extra = extra if spec.row_columns else {}
        steps = int(settings["max_new_tokens"])
        if steps < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {steps}")
        generator = torch.Generator().manual_seed(int(settings["seed"]) + index)
        out = wand.generate(self.model, prompt, [int(prefix)], self.window, steps, do_sample=bool(settings["do_sample"]),
                            temperature=float(settings["temperature"]), top_k=int(settings["top_k"]) or None,
                            eos_token_id=list(spec.stop_token_ids), generator=generator, prefill_kwargs=extra)
        generated = out[0, len(ids):].tolist()
        stops = [i for i, t in enumerate(generated) if t in spec.stop_token_ids]
        speech = generated[: stops[0]] if stops else generated
        return {"speech_ids": speech, "stopped": bool(stops), "generated_tokens": len(speech)}


def _records(model_input) -> list[dict]:
    """Rows of a pandas DataFrame (what MLflow hands over), a list of dicts or one dict."""
    if hasattr(model_input, "to_dict"):
        return model_input.to_dict(orient="records")
    if isinstance(model_input, dict):
        return [model_input]
    if isinstance(model_input, list) and all(isinstance(r, dict) for r in model_input):
        return model_input
    raise ValueError(f"input: rows of input_ids / prefix_length expected, got {type(model_input).__name__}")


def _ints(values, what: str) -> list[int]:
    array = np.asarray(values if values is not None else [])
    if array.ndim != 1 or array.size == 0 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{what}: a non-empty list of ints expected")
    return [int(v) for v in array]


def _load_pyfunc(data_path: str) -> WandStudent:
    """MLflow's entry point for a ``loader_module`` model: ``data_path`` is the model's student folder."""
    return WandStudent(data_path)
