"""One curriculum stage from the driver's side: everything checked before training (``preflight``:
shards, manifest, schedule), the stage's identity and record, and one Ray Train run of the
workers (``pipeline.train.worker``) with DeepSpeed ZeRO, resumed from the stage's latest good
checkpoint. The end writes ``<storage>/<experiment>/stage-<k>.json``; stage k + 1 starts from
that checkpoint's consolidated ``model.safetensors``.
"""

from __future__ import annotations

import json
import logging
import math
import os

from pydantic import BaseModel

from wand.curriculum import Curriculum, Stage

from pipeline import resources, storage
from pipeline.config import TrainConfig
from pipeline.data.shards import load_manifest, verify_manifest
from pipeline.train import checkpoints
from pipeline.train.worker import FAULT_ENV, train_loop_per_worker

log = logging.getLogger("wand.train")


# ----------------------------------------------------------------------------- driver side
def preflight(config: TrainConfig, manifest: dict | None = None) -> tuple[dict, Curriculum]:
    """Everything that can be checked before training: shards, manifest, schedule. Raises with the
    field. ``manifest``: the shards' manifest when the caller has read (and checked) it already."""
    storage.require_credentials(config.shards, config.storage, config.teacher_source)
    if manifest is None:
        try:
            manifest = load_manifest(config.shards, config.s3_endpoint)
        except FileNotFoundError as err:
            raise ValueError(f"shards: {err}") from None
    verify_manifest(manifest, teacher=config.model, temperature=config.temperature)
    if config.k is not None and manifest["k"] != config.k:
        raise ValueError(f"k: the shards hold the teacher's top-{manifest['k']}, the config expects top-{config.k}")
    teacher = manifest["teacher"]
    if teacher["size"] != config.model_size or teacher["source"] != config.teacher_source or (
        teacher["source"] is None and teacher.get("seed") != config.teacher_seed
    ):
        raise ValueError(
            f"shards: made by teacher {teacher['preset']} size={teacher['size']} source={teacher['source']} "
            f"seed={teacher.get('seed')}; config has size={config.model_size} source={config.teacher_source} "
            f"seed={config.teacher_seed}"
        )
    steps = math.floor(manifest["rows"] * config.epochs / (config.batch_size * config.num_workers))
    if steps < config.stages:
        raise ValueError(
            f"stages: {config.stages} stages need at least as many steps, but {manifest['rows']} rows x "
            f"{config.epochs} epochs / (batch_size {config.batch_size} x {config.num_workers} workers) = {steps}"
        )
    return manifest, config.curriculum(steps)


def plan_stages(config: TrainConfig) -> list[Stage]:
    return preflight(config)[1].stages(config.stages)


def stage_record_path(config: TrainConfig, stage: int) -> tuple:
    fs, root = storage.resolve(config.storage, config.s3_endpoint)
    return fs, storage.join(root, config.experiment, f"stage-{stage}.json")


def stage_record(config: TrainConfig, stage: int) -> dict | None:
    """The record a finished stage leaves (None if it has not finished)."""
    fs, path = stage_record_path(config, stage)
    return storage.read_json(fs, path) if storage.exists(fs, path) else None


def identity_fields(config_class: type[BaseModel] = None) -> list[str]:
    """The config fields that make two submissions the same run: all but the OPERATIONAL ones."""
    fields = (config_class or TrainConfig).model_fields
    return [name for name, field in fields.items()
            if not (isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("operational"))]


def run_identity(config: TrainConfig, manifest: dict, total_steps: int) -> dict:
    """A finished stage or a checkpoint is reused only when this matches (the storage folder is named
    by the experiment, which a changed config keeps). Derived from the config's own fields, plus the
    teacher weights and the data the shards were computed from."""
    values = config.model_dump(include=set(identity_fields(type(config))))
    return {**values, "teacher_fingerprint": manifest["teacher"]["fingerprint"],
            "data_fingerprint": manifest["input"]["fingerprint"], "total_steps": total_steps}


def check_same_run(found: dict, identity: dict, config: TrainConfig, where: str) -> None:
    """Refuse to reuse ``found`` (a stage record or checkpoint state) written by a different run.
    Records written before identities were recorded are compared on their total steps."""
    have = found.get("identity") or {"total_steps": found.get("total_steps")}
    diffs = [f"{key}: {have[key]!r} there, {identity[key]!r} now" for key in have
             if key in identity and have[key] != identity[key]]
    if diffs:
        raise ValueError(
            f"storage: {where} was written by a different run of experiment {config.experiment!r} "
            f"({'; '.join(diffs)}); name this run differently (experiment:) or remove that folder to start over")


def run_stage(config: TrainConfig, stage_index: int, tracking: dict | None = None, manifest: dict | None = None) -> dict:
    """Run (or resume, or skip if finished) curriculum stage ``stage_index`` (1-based); return its record.

    ``tracking``: ``{"uri", "run_id"}`` of the stage's MLflow run; rank 0 logs the step metrics
    into it at every checkpoint (``pipeline.tracking.Tracker.log_steps``, idempotent)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    manifest, curriculum = preflight(config, manifest)
    stages = curriculum.stages(config.stages)
    if not 1 <= stage_index <= len(stages):
        raise ValueError(f"stage: must be in [1, {len(stages)}], got {stage_index}")
    identity = run_identity(config, manifest, curriculum.total_steps)
    done = stage_record(config, stage_index)
    if done is not None:
        check_same_run(done, identity, config, stage_record_path(config, stage_index)[1])
        log.info("stage %d already finished: %s", stage_index, done["checkpoint"])
        return done
    stage = stages[stage_index - 1]
    init = None
    if stage_index > 1:
        previous = stage_record(config, stage_index - 1)
        if previous is None:
            raise ValueError(f"stage: stage {stage_index - 1} has not finished; run it first "
                             f"(jobs/train_stage.py --stage {stage_index - 1})")
        check_same_run(previous, identity, config, stage_record_path(config, stage_index - 1)[1])
        init = previous["checkpoint"]
    fs, root = storage.resolve(config.storage, config.s3_endpoint)
    resumed = checkpoints.latest_for_stage(config, stage_index)
    if resumed is not None:  # read its state.json alone: the checkpoint itself may be large and remote
        check_same_run(storage.read_json(fs, storage.join(resumed.path, "state.json")), identity, config, resumed.path)
    loop_config = {
        "config": config.model_dump(), "stage": {"index": stage.index, "start": stage.start, "end": stage.end},
        "shards": [[s["file"], s["rows"], s["sha256"]] for s in manifest["shards"]], "fault": os.environ.get(FAULT_ENV),
        "total_steps": curriculum.total_steps, "init_checkpoint": init,
        "storage_is_s3": storage.is_remote(config.storage), "k": manifest["k"],
        "value_dtype": manifest["value_dtype"], "tracking": tracking, "identity": identity,
    }
    storage_kwargs = ({"storage_path": root, "storage_filesystem": fs} if storage.is_remote(config.storage)
                      else {"storage_path": root})
    request = resources.train(config)  # what preflight checked and cluster/ is sized for
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=request.count, use_gpu=request.gpus > 0,  # Ray Train adds the GPU
                                     resources_per_worker={"CPU": request.cpus}, label_selector=request.labels or None),
        run_config=RunConfig(name=config.run_name(stage_index), failure_config=FailureConfig(max_failures=config.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), **storage_kwargs),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"stage {stage_index}: training ended without a checkpoint ({result.error})")
    with result.checkpoint.as_directory() as directory:
        with open(os.path.join(directory, "state.json")) as f:
            state = json.load(f)
    record = {"stage": stage_index, "start": stage.start, "end": stage.end, "checkpoint": result.checkpoint.path,
              "param_checksum": state["param_checksum"], "init_param_checksum": state["init_param_checksum"],
              "metrics": state["metrics"], "starts": state["starts"],
              "total_steps": curriculum.total_steps, "identity": identity}
    rec_fs, rec_path = stage_record_path(config, stage_index)
    storage.write_json(rec_fs, rec_path, record)
    return record
