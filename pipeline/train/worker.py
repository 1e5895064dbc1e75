"""One curriculum stage from a Ray Train worker's side: ``deepspeed.initialize`` (ZeRO 1/2/3, torch
AdamW; gloo and DeepSpeed's CPU accelerator on CPU, bf16 on GPU) -> per global step t its rows of
the teacher top-k shards (``pipeline.data.row_order``), the curriculum's W(t), tau(t), lr(t),
``wand.batch.collate`` and ``wand.distill.distill_loss`` -> every ``checkpoint_every`` steps each
rank saves its DeepSpeed checkpoint and reports it with ``ray.train.report``. The per-step metrics
travel inside each checkpoint, so the final one holds every step exactly once.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from wand.batch import collate
from wand.curriculum import Stage
from wand.distill import distill_loss
from wand.models.weights import fingerprint, load_tied, read_safetensors, teacher_weights

from pipeline import storage
from pipeline.config import TrainConfig
from pipeline.data.row_order import RowOrder, ShardRows
from pipeline.data.shards import read_shard, shard_topk
from pipeline.train import checkpoints
from pipeline.train.ds_config import deepspeed_config
from pipeline.train.progress import Progress

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
    ds_config = deepspeed_config(config.batch_size, config.zero_stage, config.gradient_clipping, config.use_gpu)
    deepspeed.init_distributed(dist_backend="nccl" if config.use_gpu else "gloo")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)

    # The run's storage, not Ray's registry, says where to resume: it also holds what a resubmitted
    # driver left, and each checkpoint is checked against its workers' checksums first (a corrupt or
    # half-written newest one falls back to the one before it, with a warning naming it).
    checkpoint = checkpoints.latest_for_stage(config, stage.index)
    step, history, starts = stage.start, [], []
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            checkpoints.load_weights_only(engine, directory, "ds")
            with open(os.path.join(directory, "state.json")) as f:
                state = json.load(f)
        step, history, init_checksum = state["next_step"], state["metrics"], state["init_param_checksum"]
        starts = state["starts"]
    starts = starts + [step]  # where each (re)start of this stage began: resumes are visible

    # Each worker reads its own rows of each step from the shards (pipeline.data.row_order): the order is
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
            # Straight to the worker's stdout, which reaches `ray job logs` once. Not print(): Ray Train
            # patches print into the root logger, whose handlers wrote every line twice.
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
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
    from pipeline.tracking import Tracker

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
