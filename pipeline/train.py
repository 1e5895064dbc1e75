"""One curriculum stage = one Ray Train run of the student with DeepSpeed ZeRO.

Each worker: ``deepspeed.initialize`` (ZeRO 1/2/3, torch AdamW as the client optimizer; gloo and
DeepSpeed's CPU accelerator on CPU, bf16 on GPU) -> per global step t, its rows of the teacher
top-k shards in the seeded order of ``pipeline.row_order``, the curriculum's W(t), tau(t) and lr(t),
``wand.batch.collate`` and ``wand.distill.distill_loss`` (the WAND-masked student forward, CE + KD)
-> every ``checkpoint_every`` steps
every rank saves its DeepSpeed checkpoint and reports it with ``ray.train.report``.

Resume: a worker failure restarts the group from the last reported checkpoint
(``FailureConfig(max_failures)``); a resubmitted driver finds the run by its name
(``<experiment>-stage<k>``) under the storage path and continues from its latest checkpoint.
The per-step metrics travel inside each checkpoint (the history up to its step), so the final
checkpoint holds every step exactly once, however many restarts happened.
The stage's end writes ``<storage>/<experiment>/stage-<k>.json`` (final checkpoint, checksum);
stage k + 1 starts from that checkpoint's consolidated ``model.safetensors``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
import re
import tempfile
import time
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from wand.curriculum import Curriculum, Stage
from wand.batch import collate
from wand.distill import SparseTeacher, distill_loss
from wand.losses import KD_KINDS
from wand.models import MODEL_NAMES, get_spec, spec_for
from wand.models.weights import fingerprint, load_tied, read_safetensors, s3_endpoint

from . import checkpoints, storage
from .checks import MAX_SEED, one_of, require_teacher_weights
from .progress import Progress
from .row_order import RowOrder, ShardRows, read_shard
from .teacher_topk import decode_values, load_manifest, teacher_weights, verify_manifest

__all__ = ["TrainConfig", "plan_stages", "preflight", "run_stage", "stage_record", "param_checksum"]

log = logging.getLogger("wand.train")


# Fields that cannot change what a run computes (where it runs and stores, how often it saves, how
# it fails over). Every other field is part of the run identity: a new field is covered by default.
OPERATIONAL = {"json_schema_extra": {"operational": True}}


class TrainConfig(BaseModel):
    """Student distillation settings (one experiment = a chain of curriculum stages)."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True, allow_inf_nan=False)

    experiment: str = Field(description="run name prefix; stage k runs as <experiment>-stage<k>", **OPERATIONAL)
    model: str = Field(description="model preset (the teacher's; the student starts from its weights)")
    model_size: Literal["real", "small", "mini", "tiny"] = "real"
    teacher_source: str | None = Field(None, description="teacher weights (local, s3://, HF id); None = seeded random",
                                       **OPERATIONAL)  # the teacher fingerprint is in the identity
    teacher_seed: int = Field(0, ge=0, le=MAX_SEED, **OPERATIONAL)  # likewise (it makes the random teacher)
    shards: str = Field(description="teacher top-k shard folder (jobs/precompute.py output)", min_length=1,
                        **OPERATIONAL)
    k: int | None = Field(None, ge=1, description="the shards' top-k; None accepts what the manifest says",
                          **OPERATIONAL)  # a check on the shards (preflight), which hold one k
    storage: str = Field(description="Ray Train storage path for checkpoints: local folder or s3://bucket/prefix",
                         min_length=1, **OPERATIONAL)
    s3_endpoint: str | None = Field(None, **OPERATIONAL)
    stages: int = Field(3, ge=1, description="curriculum stages (separate Ray Train runs / resume points)")
    epochs: float = Field(1.0, gt=0, le=1000)
    batch_size: int = Field(8, ge=1, description="sequences per worker per step")
    window_start: int = Field(128, ge=1)
    window_target: int | None = Field(None, ge=1, description="default: the preset's target W")
    tau_start: float = Field(0.5, gt=0)
    tau_end: float | None = Field(1e4, gt=0, description="None: hard mask every step (no soft curriculum)")
    lr: float = Field(1e-5, gt=0)
    warmup_fraction: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    kd_kind: str = Field("skew_fkl", description=f"one of {', '.join(KD_KINDS)}")
    kd_weight: float = Field(1.0, ge=0, description="lambda: loss = CE + lambda x KD")
    skew_alpha: float = Field(0.1, gt=0, lt=1)
    temperature: float = Field(1.0, gt=0, description="must equal the shards' temperature")
    zero_stage: Literal[1, 2, 3] = 2
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = Field(False, **OPERATIONAL)  # a resumed run may move between devices
    attention: Literal["auto", "flex", "sdpa"] = Field(
        "auto", description="the student's attention in training: flex (FlexAttention block masks, GPUs), "
        "sdpa (the dense mask); auto = flex with GPUs, sdpa without", **OPERATIONAL)  # the same function
    cpus_per_worker: float = Field(0.5, gt=0, description="fractional on small machines (the evals' task needs CPUs too)",
                                   **OPERATIONAL)
    max_failures: int = Field(2, ge=0, **OPERATIONAL)
    checkpoint_every: int = Field(50, ge=1, **OPERATIONAL)
    progress_every_s: float = Field(30.0, gt=0, description="seconds between progress lines in the job's log",
                                    **OPERATIONAL)
    loss_chunk_size: int = Field(1024, ge=1, **OPERATIONAL)  # memory only: the loss is the same
    gradient_clipping: float = Field(1.0, ge=0)
    seed: int = Field(0, ge=0, le=MAX_SEED, description="the order of the training rows (a seeded shuffle per epoch)")
    shuffle_window: int = Field(16, ge=1, description="rows of this many shards are shuffled together "
                                "(memory: a worker holds up to twice as many shards)")

    @field_validator("experiment")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
            raise ValueError("experiment must be letters, digits, '_', '.', '-' (it names runs and folders)")
        return value

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        return one_of(value, MODEL_NAMES, "model preset")

    @field_validator("kd_kind")
    @classmethod
    def _known_kd(cls, value: str) -> str:
        return one_of(value, KD_KINDS, "kd_kind")

    @model_validator(mode="after")
    def _windows(self) -> "TrainConfig":
        require_teacher_weights(self.model_size, self.teacher_source)
        if self.attention == "flex" and not self.use_gpu:
            raise ValueError("attention: flex trains on GPUs only (FlexAttention has no CPU backward); "
                             "use sdpa, or auto, on CPU workers")
        target = self.resolved_window_target()
        if target > self.window_start:
            raise ValueError(f"window_target ({target}) must be <= window_start ({self.window_start})")
        context = get_spec(self.model, self.model_size).context_length
        if context is not None and self.window_start > context:
            raise ValueError(f"window_start ({self.window_start}) is wider than {self.model}'s context of {context} "
                             "positions: such a window never masks anything")
        return self

    def spec(self):
        with s3_endpoint(self.s3_endpoint):
            return spec_for(self.model, self.model_size, self.teacher_source)

    def resolved_attention(self) -> str:
        """The ``enable_wand`` backend the workers train with."""
        if self.attention == "auto":
            return "flex" if self.use_gpu else "sdpa"
        return self.attention

    def resolved_window_target(self) -> int:
        # The preset's W: no need for the checkpoint's tokenizer (validation never reads S3).
        return self.window_target or get_spec(self.model, self.model_size).target_window

    def curriculum(self, total_steps: int) -> Curriculum:
        return Curriculum(total_steps=total_steps, window_start=self.window_start,
                          window_target=self.resolved_window_target(), tau_start=self.tau_start,
                          tau_end=self.tau_end, lr=self.lr, warmup_fraction=self.warmup_fraction)

    def run_name(self, stage: int) -> str:
        return f"{self.experiment}-stage{stage}"


# ----------------------------------------------------------------------------- driver side
def preflight(config: TrainConfig) -> tuple[dict, Curriculum]:
    """Everything that can be checked before training: shards, manifest, schedule. Raises with the field."""
    storage.require_credentials(config.shards, config.storage, config.teacher_source)
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


def _latest_checkpoint(config: TrainConfig, stage: int):
    """The newest good checkpoint a previous attempt or submission of this stage left (worker
    restart, driver restart), or None; corrupt or half-written ones are skipped with a warning
    (``pipeline.checkpoints``)."""
    from ray.train import Checkpoint

    fs, root = storage.resolve(config.storage, config.s3_endpoint)
    path = checkpoints.latest_good(fs, storage.join(root, config.run_name(stage)), config.num_workers)
    return None if path is None else Checkpoint(path, fs)


def run_stage(config: TrainConfig, stage_index: int, tracking: dict | None = None) -> dict:
    """Run (or resume, or skip if finished) curriculum stage ``stage_index`` (1-based); return its record.

    ``tracking``: ``{"uri", "run_id"}`` of the stage's MLflow run; rank 0 logs the step metrics
    into it at every checkpoint (``pipeline.tracking.Tracker.log_steps``, idempotent)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    manifest, curriculum = preflight(config)
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
    resumed = _latest_checkpoint(config, stage_index)
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
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                     resources_per_worker={"CPU": config.cpus_per_worker}),
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


# ----------------------------------------------------------------------------- worker side
def param_checksum(state_dict: dict[str, torch.Tensor]) -> str:
    """The same fingerprint the precompute manifest records for the teacher."""
    return fingerprint(state_dict)


def initial_model(config: TrainConfig, spec, init_checkpoint: str | None, filesystem):
    """Stage 1: the teacher's weights. Stage k + 1: stage k's consolidated model.safetensors."""
    if init_checkpoint is None:
        return teacher_weights(spec, config.teacher_source, config.teacher_seed, config.s3_endpoint)
    from ray.train import Checkpoint

    model = spec.build()
    with Checkpoint(init_checkpoint, filesystem).as_directory() as directory:
        state = read_safetensors(Path(directory, "model.safetensors"))
    load_tied(model, state, init_checkpoint, f"{config.experiment}: the previous stage's checkpoint")
    return model


def shard_topk(rows: list[dict], target_ids: torch.Tensor, k: int, value_dtype: str) -> SparseTeacher:
    """The teacher's top-k that the shards store with each row, in collate's position order."""
    values = decode_values(np.concatenate([np.asarray(r["topk_logprobs"]) for r in rows]).reshape(-1, k), value_dtype)
    compact = torch.as_tensor(np.concatenate([np.asarray(r["topk_indices"], dtype=np.int64) for r in rows]).reshape(-1, k))
    rest = torch.as_tensor(np.concatenate([np.asarray(r["rest_logprob"], dtype=np.float32) for r in rows]))
    return SparseTeacher(values, target_ids[compact], rest)


# Fault injection for tests (never a config field): "STEP:MARKER_FILE" makes worker rank 1 exit at
# STEP once, the way a killed process dies (no Python exception). Read by the driver (run_stage)
# and handed to the workers with the stage.
FAULT_ENV = "WAND_TEST_WORKER_EXIT"


def _maybe_fail(fault: str | None, step: int, rank: int, workers: int) -> None:
    if not fault or rank != min(1, workers - 1):
        return
    target, marker = fault.split(":", 1)
    if step == int(target) and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(f"worker {rank} died at step {step}\n")
        os._exit(1)  # a dead worker, not a Python error: Ray restarts the group from the checkpoint


def train_loop_per_worker(loop_config: dict) -> None:
    config = TrainConfig.model_validate(loop_config["config"])
    if not config.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed picks an accelerator
    import deepspeed
    import ray.train

    import wand

    stage = Stage(**loop_config["stage"])
    curriculum = config.curriculum(loop_config["total_steps"])
    k, value_dtype = loop_config["k"], loop_config["value_dtype"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = torch.device("cuda", context.get_local_rank()) if config.use_gpu else torch.device("cpu")
    fs, _ = storage.resolve(config.storage, config.s3_endpoint)
    checkpoint_fs = fs if loop_config["storage_is_s3"] else None

    spec = config.spec()
    target_ids = spec.target_ids()
    model = initial_model(config, spec, loop_config["init_checkpoint"], checkpoint_fs)
    init_checksum = param_checksum(model.state_dict())  # proves where the stage started from
    wand.enable_wand(model, config.window_start, backend=config.resolved_attention())
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    ds_config = {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": config.gradient_clipping,
        "zero_optimization": {"stage": config.zero_stage,
                              "stage3_gather_16bit_weights_on_model_save": True},
        "zero_allow_untested_optimizer": True,  # torch's AdamW: DeepSpeed's own ones JIT-compile
        "bf16": {"enabled": config.use_gpu},
        "steps_per_print": 10**9,
    }
    deepspeed.init_distributed(dist_backend="nccl" if config.use_gpu else "gloo")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)

    # The run's storage, not Ray's registry, says where to resume: it also holds what a resubmitted
    # driver left, and each checkpoint is checked against its workers' checksums first (a corrupt or
    # half-written newest one falls back to the one before it, with a warning naming it).
    checkpoint = _latest_checkpoint(config, stage.index)
    step, history, starts = stage.start, [], []
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            checkpoints.load_weights_only(engine, directory, "ds")
            with open(os.path.join(directory, "state.json")) as f:
                state = json.load(f)
        step, history, init_checksum = state["next_step"], state["metrics"], state["init_param_checksum"]
        starts = state["starts"]
    starts = starts + [step]  # where each (re)start of this stage began: resumes are visible

    # Each worker reads its own rows of each step from the shards (pipeline.row_order): the order is
    # a function of the seed and the step, so a restarted stage reads what it would have read.
    shard_fs, shard_root = storage.resolve(config.shards, config.s3_endpoint)
    order = RowOrder([rows for _, rows, _ in loop_config["shards"]], config.seed, config.shuffle_window)
    checksums = {storage.join(shard_root, name): sha for name, _, sha in loop_config["shards"]}
    limits = (spec.vocab_size, len(target_ids))  # a shard's contents are checked as it is read
    reader = ShardRows(lambda path: read_shard(shard_fs, path, checksums[path], limits), list(checksums), order,
                       cache=2 * config.shuffle_window)
    progress = Progress(f"{config.experiment} stage {stage.index}/{config.stages}", step, stage.end,
                        curriculum.total_steps, config.progress_every_s)
    while step < stage.end:
        values = curriculum.at(step)
        for group in engine.optimizer.param_groups:
            group["lr"] = values.lr
        start = time.perf_counter()
        rows = reader.take(order.batch(step, rank, config.batch_size, config.num_workers))
        batch = collate(spec, rows, device)
        teacher = shard_topk(rows, target_ids, k, value_dtype).to(device)
        out = distill_loss(spec, engine.module, batch, values.window, values.tau, teacher, forward=engine,
                           kind=config.kd_kind, kd_weight=config.kd_weight, temperature=config.temperature,
                           skew_alpha=config.skew_alpha, chunk_size=config.loss_chunk_size)
        engine.backward(out.loss)
        engine.step()
        seconds = time.perf_counter() - start
        tokens = int(batch.attention_mask.sum()) * config.num_workers
        history.append({"step": step, "loss": float(out.loss.detach()), "ce": float(out.ce), "kd": float(out.kd),
                        "window": values.window, "tau": values.tau, "lr": values.lr,
                        "tokens_per_s": tokens / seconds})
        line = progress.update(step, history[-1]["loss"], values.window, values.tau, tokens)
        if line and rank == 0:
            print(line, flush=True)  # a worker's stdout reaches `ray job logs` (its logging does not)
        _maybe_fail(loop_config["fault"], step, rank, config.num_workers)
        step += 1
        if (step - stage.start) % config.checkpoint_every == 0 or step == stage.end:
            _save_and_report(engine, config, stage, rank, next_step=step, history=history, init_checksum=init_checksum,
                             starts=starts, identity=loop_config["identity"])
            if rank == 0 and loop_config.get("tracking"):
                _log_progress(loop_config["tracking"], history)


def _log_progress(tracking: dict, history: list[dict]) -> None:
    """Rank 0 streams the checkpointed steps to MLflow. Logging after the checkpoint is reported
    means a restart never re-trains a logged step without it being in the checkpoint's history;
    a tracking outage must not stop training (the driver syncs the rest when the stage ends)."""
    from .tracking import Tracker

    try:
        Tracker(tracking["uri"], grace_s=0).log_steps(tracking["run_id"], history)
    except Exception as err:  # noqa: BLE001 - any MLflow/network error
        # The steps stay in the history (and the checkpoint): the next checkpoint's call, or the
        # driver when the stage ends, sends every step the server does not hold yet.
        print(f"WARNING: tracking: could not log steps to {tracking['uri']} ({str(err)[:200]}); "
              f"{len(history)} steps kept, sent when the server answers", flush=True)


def _save_and_report(engine, config: TrainConfig, stage: Stage, rank: int, *, next_step: int, history: list,
                     init_checksum: str, starts: list[int], identity: dict) -> None:
    """Every rank saves its DeepSpeed shard; rank 0 adds state.json (the step to resume at, the
    metrics so far, the run identity) and, at the stage's end, the consolidated model.safetensors."""
    step = next_step
    import deepspeed
    import ray.train
    from ray.train import Checkpoint
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as directory:
        engine.save_checkpoint(directory, tag="ds")
        final = step == stage.end
        state_dict = None
        if final:  # the consolidated student: every rank takes part in gathering ZeRO-3 shards
            params = list(engine.module.parameters())
            with deepspeed.zero.GatheredParameters(params, enabled=config.zero_stage == 3):
                if rank == 0:
                    state_dict = {n: t.detach().cpu().clone().contiguous()
                                  for n, t in engine.module.state_dict().items()}
        if rank == 0:
            state = {"next_step": step, "stage": stage.index, "metrics": history,
                     "init_param_checksum": init_checksum, "starts": starts, "identity": identity}
            if state_dict is not None:
                unique, seen = {}, set()
                for name, tensor in state_dict.items():  # tied weights are saved once
                    if tensor.data_ptr() not in seen:
                        seen.add(tensor.data_ptr())
                        unique[name] = tensor
                save_file(unique, os.path.join(directory, "model.safetensors"))
                state["param_checksum"] = param_checksum(state_dict)
            with open(os.path.join(directory, "state.json"), "w") as f:
                json.dump(state, f)
        checkpoints.write_checksums(directory, rank)  # last: its presence means this rank's files are whole
        last = history[-1] if history else {}
        ray.train.report({**{k: v for k, v in last.items() if v is not None}, "next_step": step},
                         checkpoint=Checkpoint.from_directory(directory))
