"""Which of a stage's checkpoints can be resumed from: each worker records a checksum of every file
it wrote, and a checkpoint is taken only when every worker's list is there and every file matches.

A checkpoint half written when the disk filled, cut short by a killed upload, or with bytes flipped
on storage is skipped with a warning that names it; the stage resumes from the one before it (Ray
keeps two), or from the stage's start when none is good.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

from pipeline import storage

log = logging.getLogger(__name__)

CHECKSUMS = "checksums"
STATE = "state.json"


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(directory: str, rank: int) -> None:
    """After a worker has written its part of a checkpoint into ``directory``: record each file's
    size and sha256 in ``checksums/rank-<rank>.json`` (written last, so its presence means the
    worker's files are complete)."""
    files = {}
    for folder, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, directory)
            if not relative.startswith(CHECKSUMS + os.sep):
                files[relative.replace(os.sep, "/")] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
    os.makedirs(os.path.join(directory, CHECKSUMS), exist_ok=True)
    with open(os.path.join(directory, CHECKSUMS, f"rank-{rank}.json"), "w") as handle:
        json.dump(files, handle, sort_keys=True)


def problem(fs, path: str, workers: int) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed from, or None when it can."""
    lists = [info for info in storage.list_dir(fs, storage.join(path, CHECKSUMS)) if info.path.endswith(".json")]
    if len(lists) < workers:
        return f"checksums of {len(lists)} of {workers} workers (written before checksums, or cut short)"
    for item in lists:
        try:
            files = json.loads(storage.read_bytes(fs, item.path))
        except ValueError as err:
            return f"{os.path.basename(item.path)} is unreadable ({err})"
        if not isinstance(files, dict):
            return f"{os.path.basename(item.path)} is not a checksum list"
        for name, expected in sorted(files.items()):
            try:
                target = storage.confined(path, name, fs, f"{os.path.basename(item.path)}")
            except ValueError as err:
                return str(err)
            if not isinstance(expected, dict) or not isinstance(expected.get("sha256"), str):
                return f"{os.path.basename(item.path)}: the entry of {name} is malformed"
            if not storage.exists(fs, target):
                return f"{name} is missing"
            if storage.sha256_file(fs, target) != expected["sha256"]:
                return f"{name} does not match its checksum ({expected['bytes']} bytes expected)"
    try:
        json.loads(storage.read_bytes(fs, storage.join(path, STATE)))
    except (OSError, ValueError) as err:
        return f"{STATE} is unreadable ({err})"
    return None


def latest_good(fs, run_dir: str, workers: int) -> str | None:
    """The newest checkpoint under ``run_dir`` that passes ``problem``; warns about every newer one
    it skips (naming it and why), so a resume from an older checkpoint is never silent."""
    if not storage.exists(fs, run_dir):
        return None
    import pyarrow.fs as pafs

    # Ray names checkpoint folders by their time (checkpoint_<date>_<time>): the name orders them.
    candidates = sorted((i.path for i in storage.list_dir(fs, run_dir)
                         if i.type == pafs.FileType.Directory and os.path.basename(i.path).startswith("checkpoint_")),
                        reverse=True)
    for path in candidates:
        reason = problem(fs, path, workers)
        if reason is None:
            return path
        message = f"checkpoint {path} is unusable: {reason}; resuming from the one before it"
        log.warning(message)
        print(f"WARNING: {message}", flush=True)  # a worker's stdout reaches `ray job logs`
    return None


# DeepSpeed pickles these few classes of its own into ZeRO optimizer states (measured with
# torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO-2/3 checkpoints: the loss scaler,
# the ZeRO stage enum, the fragment address of a flattened parameter).
DEEPSPEED_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)
TRUST_ENV = "WAND_TRUST_CHECKPOINTS"


def load_weights_only(engine, directory: str, tag: str) -> None:
    """``engine.load_checkpoint``, with DeepSpeed's own ``torch.load(..., weights_only=False)``
    replaced by a weights-only load that admits only ``DEEPSPEED_GLOBALS``: a checkpoint folder
    someone else could write to cannot run code in the workers that resume from it.
    ``WAND_TRUST_CHECKPOINTS=1`` restores DeepSpeed's loader (for a DeepSpeed version that pickles
    another class; the error names it)."""
    if os.environ.get(TRUST_ENV) == "1":
        engine.load_checkpoint(directory, tag=tag)
        return
    import importlib
    import pickle

    import torch

    allowed = [getattr(importlib.import_module(module), name) for module, name in DEEPSPEED_GLOBALS]
    checkpoint_engine = engine.checkpoint_engine
    deepspeed_load = checkpoint_engine.load

    def load(path: str, map_location=None):
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            lines = str(err).splitlines() or [""]
            detail = next((line for line in lines if "global" in line.lower()), lines[-1]).strip()
            raise RuntimeError(
                f"checkpoint {path}: refused by the weights-only loader ({detail[:300]}). "
                f"If this run wrote it and its storage is private, set {TRUST_ENV}=1 to load it with DeepSpeed's "
                "own loader (weights_only=False)") from err

    checkpoint_engine.load = load
    try:
        engine.load_checkpoint(directory, tag=tag)
    finally:
        checkpoint_engine.load = deepspeed_load


def latest_for_stage(config, stage: int):
    """The newest good checkpoint a previous attempt or submission of this stage left (worker
    restart, driver restart), or None; corrupt or half-written ones are skipped with a warning
    (``latest_good``)."""
    from ray.train import Checkpoint

    fs, root = storage.resolve(config.storage, config.s3_endpoint)
    path = latest_good(fs, storage.join(root, config.run_name(stage)), config.num_workers)
    return None if path is None else Checkpoint(path, fs)
