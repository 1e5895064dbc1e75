"""The whole distillation chain: precompute -> curriculum stage 1..N -> final student -> eval hooks.

Every step is skipped when its output already exists and matches the config, so resubmitting the
same command after a failure resumes where it stopped.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from . import storage
from .teacher_topk import MANIFEST, PrecomputeConfig, run_precompute
from .train import TrainConfig, preflight, run_stage, stage_record

__all__ = ["DistillConfig", "run_chain", "export_student", "load_student", "EVAL_HOOKS"]

log = logging.getLogger("wand.distill")
# Evaluations run on the final student: callables (config, student_dir) -> dict of results.
# The MLflow evals register here (pipeline/evaluate.py); the default checks that it generates.
EVAL_HOOKS: list[Callable[["DistillConfig", str], dict]] = []


class DistillConfig(BaseModel):
    """One experiment. Shared fields sit at the top; ``precompute`` and ``train`` hold the rest of
    ``PrecomputeConfig`` / ``TrainConfig`` (errors name them as ``precompute.k``, ``train.stages``)."""

    model_config = ConfigDict(extra="forbid")

    experiment: str
    model: str
    model_size: Literal["real", "small", "tiny"] = "real"
    teacher_source: str | None = None
    teacher_seed: int = 0
    corpus: str = Field(description="tokenized corpus (Parquet/JSONL, local or s3://)")
    shards: str = Field(description="where the teacher top-k shards go")
    storage: str = Field(description="checkpoints and the final student")
    temperature: float = 1.0
    s3_endpoint: str | None = None
    precompute: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _sections(self) -> "DistillConfig":
        self.precompute_config()
        self.train_config()
        return self

    def _shared(self) -> dict:
        return dict(teacher_source=self.teacher_source, teacher_seed=self.teacher_seed,
                    temperature=self.temperature, s3_endpoint=self.s3_endpoint)

    def precompute_config(self) -> PrecomputeConfig:
        values = {**self.precompute, **self._shared(), "teacher": self.model, "teacher_size": self.model_size,
                  "input": self.corpus, "output": self.shards}
        return _typed(PrecomputeConfig, values, "precompute", set(self.precompute))

    def train_config(self) -> TrainConfig:
        values = {**self.train, **self._shared(), "experiment": self.experiment, "model": self.model,
                  "k": self.precompute.get("k", PrecomputeConfig.model_fields["k"].default),
                  "model_size": self.model_size, "shards": self.shards, "storage": self.storage}
        return _typed(TrainConfig, values, "train", set(self.train))


def _typed(model: type[BaseModel], values: dict, section: str, own: set[str]):
    try:
        return model.model_validate(values)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        where = f"{section}.{field}" if field in own or not field else field
        raise ValueError(f"{where}: {first['msg']}") from None


def run_chain(config: DistillConfig) -> dict:
    """Run or resume the whole chain; return a summary (stage records, student path, evals)."""
    precompute = config.precompute_config()
    fs, root = storage.resolve(config.shards, config.s3_endpoint)
    if _shards_ready(precompute, fs, root):
        log.info("precompute: matching shards found in %s; skipped", config.shards)
    else:
        log.info("precompute: %s -> %s", config.corpus, config.shards)
        run_precompute(precompute)
    train = config.train_config()
    preflight(train)
    records = []
    for index in range(1, train.stages + 1):
        log.info("stage %d/%d", index, train.stages)
        records.append(run_stage(train, index))
    student = export_student(config, records[-1]["checkpoint"])
    evals = {}
    for hook in EVAL_HOOKS or [generation_smoke_test]:
        evals[getattr(hook, "__name__", str(hook))] = hook(config, student)
    return {"stages": records, "student": student, "evals": evals}


def _shards_ready(precompute: PrecomputeConfig, fs, root: str) -> bool:
    manifest_path = storage.join(root, MANIFEST)
    run_path = storage.join(root, "_run.json")
    if not (storage.exists(fs, manifest_path) and storage.exists(fs, run_path)):
        return False
    return storage.read_json(fs, run_path)["settings"] == precompute.resume_key()


def export_student(config: DistillConfig, checkpoint_path: str) -> str:
    """Write the final student in its model's release format (loadable with ``spec.load``)."""
    from ray.train import Checkpoint
    from safetensors.torch import load_file

    fs, root = storage.resolve(config.storage, config.s3_endpoint)
    target = storage.join(root, config.experiment, "student")
    spec = config.train_config().spec()
    model = spec.build()
    ckpt_fs = fs if storage.is_remote(config.storage) else None
    with Checkpoint(checkpoint_path, ckpt_fs).as_directory() as directory:
        _load_tied(model, load_file(os.path.join(directory, "model.safetensors")))
    if storage.is_remote(config.storage):
        import tempfile

        with tempfile.TemporaryDirectory() as local:
            spec.save(model, local)
            for name in os.listdir(local):
                with open(os.path.join(local, name), "rb") as f:
                    storage.write_bytes(fs, storage.join(target, name), f.read())
        return f"s3://{target}"
    spec.save(model, target)
    return target


def _load_tied(model: torch.nn.Module, state: dict) -> None:
    """Load a state dict in which tied weights were stored once; anything else missing is an error."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    own = model.state_dict()
    stored = {t.data_ptr() for name, t in own.items() if name in state}
    real_missing = [m for m in missing if own[m].data_ptr() not in stored]
    if real_missing or unexpected:
        raise ValueError(f"student weights do not match the model: missing {real_missing[:3]}, unexpected {unexpected[:3]}")


def load_student(config: DistillConfig, path: str | None = None) -> torch.nn.Module:
    """The final student of an experiment, as a model of its spec (one call)."""
    spec = config.train_config().spec()
    if path is None:
        fs, root = storage.resolve(config.storage, config.s3_endpoint)
        path = storage.join(root, config.experiment, "student")
        if storage.is_remote(config.storage):
            path = f"s3://{path}"
    return spec.load(path)


def generation_smoke_test(config: DistillConfig, student_dir: str) -> dict:
    """Default eval hook: the exported student loads and decodes 3 x W tokens with a WandCache."""
    import wand

    spec = config.train_config().spec()
    window = config.train_config().resolved_window_target()
    model = wand.enable_wand(load_student(config, student_dir), window)
    kwargs = {}
    if spec.family == "indextts":  # conditioning latents, then start_mel
        n, dim = spec.extra["num_latents"], spec.config["n_embd"]
        prompt = torch.tensor([[spec.extra["number_mel_codes"]] * n + [spec.prefix_end_token_id]])
        kwargs = {"conditioning_latents": torch.zeros(1, n, dim)}
    else:  # a few speech tokens, then the end-of-prefix marker
        prompt = torch.tensor([[int(spec.target_ids()[0])] * 7 + [spec.prefix_end_token_id]])
    tokens, cache = wand.generate(model, prompt, torch.tensor([prompt.shape[1]]), window, 3 * window,
                                  return_cache=True, prefill_kwargs=kwargs)
    return {"generated_tokens": int(tokens.shape[1] - prompt.shape[1]), "cache_bytes": cache.nbytes()}
