"""The whole distillation chain: precompute -> curriculum stage 1..N -> final student -> evals.

Every step is skipped when its output already exists and matches the config, so resubmitting the
same command after a failure resumes where it stopped. With tracking on, each step is a child run
of the experiment's MLflow parent run (``pipeline.tracking``); a resubmission re-attaches to them.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import torch

from wand.models import get_spec
from wand.models.weights import load_tied, read_safetensors, s3_endpoint, teacher_weights

from pipeline import resources, storage
from pipeline.config import DistillConfig, PrecomputeConfig, TrainConfig
from pipeline.data.corpus_io import read_rows
from pipeline.data.precompute import run_precompute
from pipeline.evals.common import EvalResult
from pipeline.evals.gates import check_gates, gate_metrics, missed, passed
from pipeline.evals.run import run_evals
from pipeline.tracking import git_commit, NullTracker, Tracker, tracker_for
from pipeline.train.driver import preflight, run_stage

log = logging.getLogger("wand.distill")


# Headline metrics copied from the eval child onto the parent run (the columns a user compares).
HEADLINE = ("kv_reduction_10s", "kv_reduction_60s", "kv_wand_bytes_60s", "kv_full_bytes_60s",
            "kv_wand_bytes_analytic_60s", "kv_full_bytes_analytic_60s",
            "latency_full_ratio_late_early", "latency_wand_ratio_late_early", "attn_flops_speedup_60s",
            "top1_agreement", "top1_agreement_near", "top1_agreement_mid", "top1_agreement_far",
            "kl_teacher_student", "kl_far", "per_teacher", "per_student", "speaker_accuracy_teacher",
            "speaker_accuracy_student", "law_consistency_teacher", "law_consistency_student",
            "stopped_student", "length_ratio_student")


def run_chain(config: DistillConfig) -> dict:
    """Run or resume the whole chain; return a summary (stage records, student path, evals)."""
    precompute = config.precompute_config()
    train = config.train_config()
    tracker = tracker_for(config.tracking)
    parent = tracker.parent_run(config.experiment, parent_tags(config))
    try:
        child = tracker.child_run(parent, "precompute")
        try:
            # Always through the stage: it reuses finished shards only when the settings, the corpus
            # (a fingerprint of every row) and the teacher's files are the ones they were made from.
            log.info("precompute: %s -> %s", config.corpus, config.shards)
            manifest = run_precompute(precompute)
        except BaseException:
            tracker.mark_failed(child)
            raise
        _log_precompute(tracker, child, precompute, manifest)
        _, curriculum = preflight(train, manifest)
        tracker.log_params(parent, _parent_params(config, manifest, curriculum.total_steps))
        tracker.log_dataset(parent, _dataset_name(config.corpus), config.corpus, manifest["input"]["fingerprint"],
                            "training", manifest["rows"])
        tracker.log_dataset(parent, _dataset_name(config.shards), config.shards, _shards_fingerprint(manifest),
                            "teacher-top-k", manifest["rows"])
        records = []
        for index in range(1, train.stages + 1):
            log.info("stage %d/%d", index, train.stages)
            records.append(track_stage(tracker, parent, train, index, manifest))
        student = export_student(config, records[-1]["checkpoint"])
        tracker.set_tags(parent, {"wand.student_uri": student})
        tracker.log_metrics(parent, {"final_loss": records[-1]["metrics"][-1]["loss"],
                                     "total_steps": records[-1]["total_steps"]})
        evals = {}
        checksum = records[-1]["param_checksum"]
        done = tracker.find_child(parent, "eval")
        if done is not None and done.info.status == "FINISHED" and done.data.tags.get("wand.student_checksum") == checksum:
            log.info("evals: already logged for this student in run %s; skipped", done.info.run_id)
            evals = dict(done.data.metrics)
        elif config.evaluate.enabled:
            results = evaluate_experiment(config, student)
            evals = {k: v for r in results for k, v in r.metrics.items()}
            log_evals(tracker, parent, results, config, checksum)
        registration = None
        if tracker.enabled and config.tracking.log_student:
            registration = _register(tracker, parent, config, student, checksum, evals)
        tracker.finish(parent)
    except BaseException:
        tracker.mark_failed(parent)
        raise
    return {"stages": records, "student": student, "evals": evals, "parent_run_id": parent,
            "tracking_uri": tracker.uri, "experiment_id": tracker.experiment_id, "registration": registration}


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
                         "Set them in the config or with --set storage=s3://... (see docs/cluster.md)")


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


def track_stage(tracker: Tracker | NullTracker, parent: str | None, train: TrainConfig, index: int,
                manifest: dict | None = None) -> dict:
    """Run curriculum stage ``index`` in its child run: rank 0 streams the step metrics while it
    trains; afterwards the run gets the checkpoint URI and any step not yet logged. ``manifest``:
    the shards' manifest when the caller has read it already."""
    run_id = tracker.child_run(parent, f"stage-{index}")
    tracker.log_params(run_id, {"stage": index, "stages": train.stages})
    try:
        record = run_stage(train, index, tracking={"uri": tracker.uri, "run_id": run_id} if tracker.enabled else None,
                           manifest=manifest)
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


def _register(tracker: Tracker, parent: str, config: DistillConfig, student: str, checksum: str, evals: dict):
    """The student as an MLflow model of the parent run, a version of its family's registered model,
    promoted when the gates pass (``pipeline.registry``); a held-out row's prompt is its input example."""
    import contextlib
    import tempfile

    from pipeline.registry.register import register_student

    example = read_rows(config.evaluate.corpus or config.corpus, config.s3_endpoint, 1)[0]
    with contextlib.ExitStack() as stack:
        local = student
        if storage.is_remote(student):
            local = stack.enter_context(tempfile.TemporaryDirectory())
            fs, root = storage.resolve(student, config.s3_endpoint)
            for path in storage.list_files(fs, root, ("",)):
                with open(os.path.join(local, os.path.basename(path)), "wb") as f:
                    f.write(storage.read_bytes(fs, path))
        return register_student(tracker, parent, config, local, checksum, evals, example)


def evaluate_experiment(config: DistillConfig, student_dir: str | None = None) -> list[EvalResult]:
    """The evals of ``pipeline.evals`` on an experiment's teacher and final student: in a Ray task
    with ``evaluate.num_gpus`` / ``num_cpus`` when Ray is up (so on a GPU node of a cluster whose head
    has none), else in this process."""
    import ray

    if not ray.is_initialized():
        return _evaluate(config, student_dir)
    request = resources.evaluate(config.evaluate, config.train_config().use_gpu, ray.cluster_resources().get("GPU", 0))
    log.info("evals: a Ray task with %g CPU(s) and %g GPU(s)", request.cpus, request.gpus)
    task = ray.remote(num_cpus=request.cpus, num_gpus=request.gpus, max_retries=0, **request.selector())(_evaluate_pickled)
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
    from pipeline.evals.common import resolve_device
    from wand.profiling import device_name

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
    # Pass/fail against the promotion gates, beside the figures they read (eval run and parent's columns).
    gates = check_gates(merged)
    tracker.log_metrics(run_id, gate_metrics(gates))
    tracker.set_tags(run_id, {"wand.gates": "passed" if passed(gates) else f"missed: {missed(gates)}"})
    tracker.log_metrics(parent, {**{k: merged[k] for k in HEADLINE if k in merged}, **gate_metrics(gates)})
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
