"""The whole distillation chain: precompute -> curriculum stage 1..N -> final student -> evals.

Every step is skipped when its output already exists and matches the config, so resubmitting the
same command after a failure resumes where it stopped. With tracking on, each step is a child run
of the experiment's MLflow parent run (``pipeline.tracking``); a resubmission re-attaches to them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
import pickle
import re

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from wand.models import get_spec
from wand.models.weights import load_tied, read_safetensors, s3_endpoint

from . import storage
from .evaluate import EvalConfig, EvalResult, read_rows, run_evals
from .teacher_topk import PrecomputeConfig, run_precompute, teacher_weights
from .redaction import has_credentials
from .tracking import CREDENTIALS_FROM_ENV, Tracker, TrackingConfig, flatten, git_commit
from .train import TrainConfig, preflight, run_stage

__all__ = ["DistillConfig", "run_chain", "check_cluster_storage", "export_student", "load_student", "evaluate_experiment", "track_stage"]

log = logging.getLogger("wand.distill")
# Headline metrics copied from the eval child onto the parent run (the columns a user compares).
HEADLINE = ("kv_reduction_10s", "kv_reduction_60s", "kv_wand_bytes_60s", "kv_full_bytes_60s",
            "kv_wand_bytes_analytic_60s", "kv_full_bytes_analytic_60s",
            "latency_full_ratio_late_early", "latency_wand_ratio_late_early", "attn_flops_speedup_60s",
            "top1_agreement", "top1_agreement_near", "top1_agreement_mid", "top1_agreement_far",
            "kl_teacher_student", "kl_far", "per_teacher", "per_student", "speaker_accuracy_teacher",
            "speaker_accuracy_student", "law_consistency_teacher", "law_consistency_student")


def section(name: str, source: type[BaseModel], fields: tuple[str, ...], doc: str) -> type[BaseModel]:
    """A config class of ``source``'s own field definitions (type, default, limits, description): a
    fact is defined once, in the stage config that uses it, and the experiment config reuses it."""
    picked = {n: (source.model_fields[n].annotation, source.model_fields[n]) for n in fields}
    model = create_model(name, __config__=ConfigDict(extra="forbid", hide_input_in_errors=True, allow_inf_nan=False), **picked)
    model.__doc__ = doc
    return model


# The facts every step shares sit at the top of an experiment; each stage's own settings in its section.
SHARED = ("experiment", "model", "model_size", "teacher_source", "teacher_seed", "corpus", "shards", "storage",
          "s3_endpoint")
CURRICULUM = ("stages", "epochs", "window_start", "window_target", "tau_start", "tau_end", "lr", "warmup_fraction")
PRECOMPUTE = tuple(n for n in PrecomputeConfig.model_fields if n not in SHARED)
TRAIN = tuple(n for n in TrainConfig.model_fields if n not in SHARED + CURRICULUM + ("k", "temperature"))
_SOURCES = {"corpus": PrecomputeConfig}

Shared = create_model("Shared", __config__=ConfigDict(extra="forbid", hide_input_in_errors=True, allow_inf_nan=False), **{
    n: (cls.model_fields[n].annotation, cls.model_fields[n])
    for n in SHARED for cls in [_SOURCES.get(n, TrainConfig)]})
PrecomputeSection = section("PrecomputeSection", PrecomputeConfig, PRECOMPUTE,
                            "The teacher top-k stage (pipeline.teacher_topk): k, temperature, shards, actors.")
CurriculumSection = section("CurriculumSection", TrainConfig, CURRICULUM,
                            "The schedule: stages, epochs, W from window_start to window_target, tau, lr.")
TrainSection = section("TrainSection", TrainConfig, TRAIN,
                       "The student's training: batch, loss, DeepSpeed ZeRO, workers, checkpoints, row order.")
SECTION_OF = {**{n: "precompute" for n in PRECOMPUTE}, **{n: "curriculum" for n in CURRICULUM},
              **{n: "train" for n in TRAIN}}


class DistillConfig(Shared):
    """One experiment: the shared facts (model and teacher, data and storage) at the top, then one
    typed section per step. The stage configs (``PrecomputeConfig``, ``TrainConfig``) are derived from
    it, never written by hand; errors name the section (``precompute.k``, ``curriculum.stages``)."""

    precompute: PrecomputeSection = Field(default_factory=PrecomputeSection)
    curriculum: CurriculumSection = Field(default_factory=CurriculumSection)
    train: TrainSection = Field(default_factory=TrainSection)
    evaluate: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _sections(self) -> "DistillConfig":
        for field, value in flatten(self.model_dump()).items():  # configs get logged: no credentials in them
            if isinstance(value, str) and has_credentials(value):
                raise ValueError(f"{field}: a URL with user-info (user:password@) or a credential in its query "
                                 f"(password=, token=, sig=, X-Amz-*): {CREDENTIALS_FROM_ENV}")
        held_out = self.evaluate.corpus
        if self.evaluate.enabled and not self.evaluate.allow_training_corpus and (
                held_out is None or storage.overlaps(held_out, self.corpus)):
            raise ValueError(
                "evaluate.corpus: the evals would score the training corpus (rows the student learned); "
                "point evaluate.corpus at held-out rows, or set evaluate.allow_training_corpus: true")
        self.precompute_config()
        self.train_config()
        return self

    @property
    def temperature(self) -> float:
        return self.precompute.temperature

    def precompute_config(self) -> PrecomputeConfig:
        shared = self.model_dump(include=set(PrecomputeConfig.model_fields) & set(SHARED))
        return _typed(PrecomputeConfig, {**shared, **self.precompute.model_dump()})

    def train_config(self) -> TrainConfig:
        shared = self.model_dump(include=set(TrainConfig.model_fields) & set(SHARED))
        return _typed(TrainConfig, {**shared, **self.curriculum.model_dump(), **self.train.model_dump(),
                                    "k": self.precompute.k, "temperature": self.precompute.temperature})


def _typed(model: type[BaseModel], values: dict):
    """A stage config; its cross-field errors are named by the section the field sits in."""
    try:
        return model.model_validate(values)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        where = f"{SECTION_OF[field]}.{field}" if field in SECTION_OF else field
        message = first["msg"].removeprefix("Value error, ")
        if not where:  # a cross-field check: its message opens with the field it is about
            name = re.match(r"\w+", message)
            if name and name.group() in SECTION_OF:
                raise ValueError(f"{SECTION_OF[name.group()]}.{message}") from None
        raise ValueError(f"{where}: {message}" if where else message) from None


def run_chain(config: DistillConfig) -> dict:
    """Run or resume the whole chain; return a summary (stage records, student path, evals)."""
    precompute = config.precompute_config()
    train = config.train_config()
    tracker = Tracker.from_config(config.tracking)
    parent = tracker.parent_run(config.experiment, parent_tags(config)) if tracker else None
    try:
        child = tracker.child_run(parent, "precompute") if tracker else None
        try:
            # Always through the stage: it reuses finished shards only when the settings, the corpus
            # (a fingerprint of every row) and the teacher's files are the ones they were made from.
            log.info("precompute: %s -> %s", config.corpus, config.shards)
            manifest = run_precompute(precompute)
        except BaseException:
            if tracker:
                tracker.mark_failed(child)
            raise
        if tracker:
            _log_precompute(tracker, child, precompute, manifest)
        _, curriculum = preflight(train)
        if tracker:
            tracker.log_params(parent, _parent_params(config, manifest, curriculum.total_steps))
            tracker.log_dataset(parent, _dataset_name(config.corpus), config.corpus, manifest["input"]["fingerprint"],
                                "training", manifest["rows"])
            tracker.log_dataset(parent, _dataset_name(config.shards), config.shards, _shards_fingerprint(manifest),
                                "teacher-top-k", manifest["rows"])
        records = []
        for index in range(1, train.stages + 1):
            log.info("stage %d/%d", index, train.stages)
            records.append(track_stage(tracker, parent, train, index))
        student = export_student(config, records[-1]["checkpoint"])
        if tracker:
            tracker.set_tags(parent, {"wand.student_uri": student})
            if config.tracking.log_student:
                _log_student(tracker, parent, config, student)
            tracker.log_metrics(parent, {"final_loss": records[-1]["metrics"][-1]["loss"],
                                         "total_steps": records[-1]["total_steps"]})
        evals = {}
        checksum = records[-1]["param_checksum"]
        done = tracker.find_child(parent, "eval") if tracker else None
        if done is not None and done.info.status == "FINISHED" and done.data.tags.get("wand.student_checksum") == checksum:
            log.info("evals: already logged for this student in run %s; skipped", done.info.run_id)
            evals = dict(done.data.metrics)
        elif config.evaluate.enabled:
            results = evaluate_experiment(config, student)
            evals = {k: v for r in results for k, v in r.metrics.items()}
            if tracker:
                log_evals(tracker, parent, results, config, checksum)
        if tracker:
            tracker.finish(parent)
    except BaseException:
        if tracker:
            tracker.mark_failed(parent)
        raise
    return {"stages": records, "student": student, "evals": evals, "parent_run_id": parent,
            "tracking_uri": tracker.uri if tracker else None, "experiment_id": tracker.experiment_id if tracker else None}


def check_cluster_storage(config: DistillConfig) -> None:
    """On a cluster of more than one node, every path must be shared storage (s3://): a worker on
    another node cannot read shards or checkpoints from the driver's local disk."""
    nodes = _cluster_size().get("nodes")
    if not isinstance(nodes, int) or nodes <= 1:
        return
    fields = {"corpus": config.corpus, "shards": config.shards, "storage": config.storage,
              "evaluate.corpus": config.evaluate.corpus}
    local = [f"{name}={value}" for name, value in fields.items() if value and not storage.is_remote(value)]
    if local:
        raise ValueError(f"{config.experiment}: this Ray cluster has {nodes} nodes, so shards and checkpoints must "
                         f"live on shared storage (s3://bucket/prefix), not a node's local disk: {', '.join(local)}. "
                         "Set them in the config or with --set storage=s3://... (see README, Running on a cluster)")


def parent_tags(config: DistillConfig) -> dict:
    import sys

    spec = get_spec(config.model, config.model_size)  # the family is the preset's (no tokenizer needed)
    commit = git_commit()
    # The runs table's Source column: the entry point that ran the chain (jobs/distill.py under
    # `ray job submit`) and its commit.
    source = os.path.relpath(os.path.abspath(sys.argv[0])) if sys.argv and sys.argv[0] else "pipeline.chain"
    return {"wand.model": config.model, "wand.family": spec.family, "wand.model_size": config.model_size,
            "wand.git_commit": commit, "mlflow.source.name": source, "mlflow.source.type": "JOB",
            **({"mlflow.source.git.commit": commit} if commit and commit != "unknown" else {})}


def _parent_params(config: DistillConfig, manifest: dict, total_steps: int) -> dict:
    train = config.train_config()
    params = {
        "model": config.model, "model_size": config.model_size, "teacher_source": config.teacher_source,
        "teacher_seed": config.teacher_seed, "teacher_fingerprint": manifest["teacher"]["fingerprint"],
        "data_fingerprint": manifest["input"]["fingerprint"], "corpus": config.corpus, "rows": manifest["rows"],
        "k": manifest["k"], "temperature": config.temperature, "storage": config.storage,
        "curriculum": {**config.curriculum.model_dump(), "window_target": train.resolved_window_target(),
                       "total_steps": total_steps},
        "kd": {"kind": train.kd_kind, "weight": train.kd_weight, "skew_alpha": train.skew_alpha},
        "zero_stage": train.zero_stage, "num_workers": train.num_workers, "batch_size": train.batch_size,
        "use_gpu": train.use_gpu,
    }
    params["cluster"] = _cluster_size()
    return params


def _cluster_size() -> dict:
    import ray

    if not ray.is_initialized():
        return {"nodes": "unknown"}
    resources = ray.cluster_resources()
    return {"nodes": len([n for n in ray.nodes() if n.get("Alive")]), "cpus": resources.get("CPU", 0),
            "gpus": resources.get("GPU", 0)}


def _dataset_name(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1] or uri


def _shards_fingerprint(manifest: dict) -> str:
    """The shards' own content: every shard's sha256, in order."""
    import hashlib

    return hashlib.sha256("".join(s["sha256"] for s in manifest["shards"]).encode()).hexdigest()


def _log_precompute(tracker: Tracker, run_id: str, precompute: PrecomputeConfig, manifest: dict) -> None:
    tracker.log_params(run_id, {"k": precompute.k, "rows_per_shard": precompute.rows_per_shard,
                                "value_dtype": manifest["value_dtype"], "index_dtype": manifest["index_dtype"],
                                "corpus": precompute.corpus, "shards": precompute.shards})
    tracker.set_tags(run_id, {"wand.shards_uri": precompute.shards})
    tracker.log_metrics(run_id, {"rows": manifest["rows"], "shards": len(manifest["shards"]),
                                 "generated_tokens": manifest["generated_tokens"],
                                 "bad_rows": manifest["bad_rows"]["count"]})
    tracker.finish(run_id)


def track_stage(tracker: Tracker | None, parent: str | None, train: TrainConfig, index: int) -> dict:
    """Run curriculum stage ``index`` in its child run: rank 0 streams the step metrics while it
    trains; afterwards the run gets the checkpoint URI and any step not yet logged."""
    if tracker is None:
        return run_stage(train, index)
    run_id = tracker.child_run(parent, f"stage-{index}")
    tracker.log_params(run_id, {"stage": index, "stages": train.stages})
    try:
        record = run_stage(train, index, tracking={"uri": tracker.uri, "run_id": run_id})
    except BaseException:
        tracker.mark_failed(run_id)
        raise
    tracker.log_steps(run_id, record["metrics"])
    tracker.log_params(run_id, {"start_step": record["start"], "end_step": record["end"]})
    tracker.set_tags(run_id, {"wand.checkpoint_uri": record["checkpoint"], "wand.param_checksum": record["param_checksum"],
                              "wand.init_param_checksum": record["init_param_checksum"],
                              "wand.restarts": len(record["starts"]) - 1})
    tracker.finish(run_id)
    return record


def _log_student(tracker: Tracker, parent: str, config: DistillConfig, student: str) -> None:
    import tempfile

    describe = {"model": config.model, "model_size": config.model_size, "experiment": config.experiment,
                "window": config.train_config().resolved_window_target()}
    if not storage.is_remote(student):
        uri = tracker.log_student(parent, student, describe)
    else:
        fs, root = storage.resolve(student, config.s3_endpoint)
        with tempfile.TemporaryDirectory() as local:
            for path in storage.list_files(fs, root, ("",)):
                with open(os.path.join(local, os.path.basename(path)), "wb") as f:
                    f.write(storage.read_bytes(fs, path))
            uri = tracker.log_student(parent, local, describe)
    tracker.set_tags(parent, {"wand.student_artifact": uri})


def evaluate_experiment(config: DistillConfig, student_dir: str | None = None) -> list[EvalResult]:
    """The evals of ``pipeline.evaluate`` on an experiment's teacher and final student: in a Ray task
    with ``evaluate.num_gpus`` / ``num_cpus`` when Ray is up (so on a GPU node of a cluster whose head
    has none), else in this process."""
    import ray

    if not ray.is_initialized():
        return _evaluate(config, student_dir)
    gpus = config.evaluate.resolved_gpus(config.train_config().use_gpu, ray.cluster_resources().get("GPU", 0))
    log.info("evals: a Ray task with %g CPU(s) and %g GPU(s)", config.evaluate.num_cpus, gpus)
    task = ray.remote(num_cpus=config.evaluate.num_cpus, num_gpus=gpus, max_retries=0)(_evaluate_pickled)
    # Pickled by the task and unpickled here: Ray would hand back the figures' numpy arrays as
    # read-only views of its object store, and matplotlib writes to them when it saves a figure.
    return pickle.loads(ray.get(task.remote(config, student_dir)))


def _evaluate_pickled(config: DistillConfig, student_dir: str | None) -> bytes:
    return pickle.dumps(_evaluate(config, student_dir))


def _evaluate(config: DistillConfig, student_dir: str | None) -> list[EvalResult]:
    train = config.train_config()
    spec = train.spec()
    rows = read_rows(config.evaluate.corpus or config.corpus, config.s3_endpoint, config.evaluate.rows)
    teacher = teacher_weights(spec, config.teacher_source, config.teacher_seed, config.s3_endpoint)  # the shards' teacher
    student = load_student(config, student_dir)
    return run_evals(spec, teacher, student, train.resolved_window_target(), rows, config.evaluate)


def log_evals(tracker: Tracker, parent: str, results: list[EvalResult], config: DistillConfig,
              student_checksum: str) -> str:
    """Log the evals into a fresh ``eval`` child of the parent; copy the headline metrics onto the parent."""
    from .evaluate import device_name, resolve_device

    run_id = tracker.child_run(parent, "eval", fresh=True)
    ran_on = results[0].device if results and results[0].device else device_name(resolve_device(config.evaluate.device))
    tracker.set_tags(run_id, {"wand.device": ran_on,  # where the evals ran (their latencies are its)
                              "wand.eval_host": results[0].host if results else "",
                              "wand.heldout": config.evaluate.corpus is not None,
                              "wand.student_checksum": student_checksum})
    tracker.log_params(run_id, {"corpus": config.evaluate.corpus or config.corpus, "rows": config.evaluate.rows,
                                "seconds": config.evaluate.seconds, "windows": config.evaluate.windows})
    for result in results:
        tracker.log_eval(run_id, result)
    merged = {k: v for r in results for k, v in r.metrics.items()}
    tracker.log_metrics(parent, {k: merged[k] for k in HEADLINE if k in merged})
    tracker.finish(run_id)
    return run_id


def export_student(config: DistillConfig, checkpoint_path: str) -> str:
    """Write the final student in its model's release format (loadable with ``spec.load``)."""
    from ray.train import Checkpoint

    fs, root = storage.resolve(config.storage, config.s3_endpoint)
    target = storage.join(root, config.experiment, "student")
    spec = config.train_config().spec()
    model = spec.build()
    ckpt_fs = fs if storage.is_remote(config.storage) else None
    with Checkpoint(checkpoint_path, ckpt_fs).as_directory() as directory:
        weights = Path(directory, "model.safetensors")
        load_tied(model, read_safetensors(weights), checkpoint_path, "student")
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


def load_student(config: DistillConfig, path: str | None = None) -> torch.nn.Module:
    """The final student of an experiment, as a model of its spec (one call)."""
    spec = config.train_config().spec()
    if path is None:
        fs, root = storage.resolve(config.storage, config.s3_endpoint)
        path = storage.join(root, config.experiment, "student")
        if storage.is_remote(config.storage):
            path = f"s3://{path}"
    with s3_endpoint(config.s3_endpoint):
        return spec.load(path)
