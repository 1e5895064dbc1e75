"""MLflow tracking: one parent run per experiment (one model), one child run per stage.

Layout in the MLflow experiment (default ``wand-tts``)::

    <experiment>                 parent: params (preset, fingerprints, curriculum, ZeRO, cluster),
    |                                    tags (family, git commit), summary metrics, the student
    |-- precompute               child:  shard counts, bytes, where the shards are
    |-- stage-1 .. stage-N       child:  per-step loss, CE, KD, window, tau, lr, tokens/s;
    |                                    the stage's checkpoint URI (a tag, not a copy)
    `-- eval                     child:  metrics, tables and figures of pipeline.evals

Runs are found again by tags (``wand.experiment``, ``wand.stage``), so a resubmitted job, or a
stage submitted on its own, re-attaches to its runs instead of making new ones. Step metrics are
logged idempotently: only steps past the last one the server holds are sent, so a resumed stage
never logs a step twice. Inside Ray Train only rank 0 logs.

Secrets: values come from configs and code, never from the environment, and every param, tag and
text artifact goes through ``redact`` (values of secret-looking environment variables and URL
user-info are replaced) as a second line of defence.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable

from pipeline.checks import flatten
from pipeline.config import TrackingConfig
from pipeline.redaction import redact

__all__ = ["Tracker", "NullTracker", "tracker_for", "TrackingUnavailable", "redact", "git_commit",
           "load_logged_student", "ui_links"]

log = logging.getLogger("wand.tracking")
BATCH = 1000  # MLflow's log_batch limit on metrics per call


def git_commit() -> str:
    """The commit of the code that runs (a `ray job submit --working-dir` upload has no .git:
    ``make demo`` passes WAND_GIT_COMMIT then)."""
    if os.environ.get("WAND_GIT_COMMIT"):
        return os.environ["WAND_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parents[1])
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


EXPERIMENT_KIND = "custom_model_development"
DIGEST_CHARS = 16


def ui_links(uri: str, experiment_id: str, parent_run_ids: list[str]) -> dict[str, str]:
    """The MLflow UI pages a person opens: the experiment, and the Compare view of the parent runs."""
    import json
    import urllib.parse

    # workflowType: MLflow 3 opens experiments in its GenAI view unless told (or a browser remembers).
    base = f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    runs = urllib.parse.quote(json.dumps(parent_run_ids, separators=(",", ":")))
    experiments = urllib.parse.quote(json.dumps([experiment_id], separators=(",", ":")))
    return {"experiment": base,
            "compare": f"{uri.rstrip('/')}/#/compare-runs?runs={runs}&experiments={experiments}"
                       "&workflowType=machine_learning"}


class NullTracker:
    """Tracking off: every call does nothing, so the chain has one way through with or without MLflow."""

    enabled = False
    uri = None
    experiment_id = None

    def parent_run(self, *args, **kwargs) -> None:
        return None

    def child_run(self, *args, **kwargs) -> None:
        return None

    def find_child(self, *args, **kwargs) -> None:
        return None

    def __getattr__(self, name: str):  # log_params, log_metrics, set_tags, finish, mark_failed, ...
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None


def tracker_for(config) -> "Tracker | NullTracker":
    """The tracker of a ``tracking:`` section: MLflow when it names a URI (or $MLFLOW_TRACKING_URI), else one
    that records nothing."""
    return Tracker.from_config(config) or NullTracker()


class TrackingUnavailable(RuntimeError):
    """The MLflow server did not answer within the grace period."""


# Signs that a request never reached a working server (refused, reset, a proxy's 502-504 while it
# restarts): worth waiting for. Anything else (a bad request, a missing run) is raised at once.
UNREACHABLE = ("Max retries exceeded", "Connection refused", "Connection aborted", "Connection reset",
               "RemoteDisconnected", "NewConnectionError", "error code 502", "error code 503", "error code 504")


def _unreachable(err: BaseException) -> bool:
    while err is not None:
        if isinstance(err, ConnectionError) or any(marker in str(err) for marker in UNREACHABLE):
            return True
        err = err.__cause__ or err.__context__
    return False


class PatientClient:
    """An ``MlflowClient`` whose calls wait out a server that does not answer, retrying with
    backoff for up to ``grace_s`` seconds, then raise ``TrackingUnavailable`` naming the URI."""

    def __init__(self, client, uri: str, grace_s: float):
        self._client, self._uri, self._grace = client, uri, grace_s

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            deadline, delay = time.monotonic() + self._grace, 1.0
            while True:
                try:
                    return attr(*args, **kwargs)
                except Exception as err:  # noqa: BLE001 - MLflow wraps network errors in its own types
                    if not _unreachable(err):
                        raise
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TrackingUnavailable(
                            f"tracking: the MLflow server at {redact(self._uri)} did not answer for {self._grace:.0f} s "
                            f"(tracking.grace_s) during {name}: start it again, or point tracking.uri at a running one, "
                            "and resubmit the job: finished stages and checkpoints are kept, and it resumes") from err
                    log.warning("tracking: %s at %s failed (server unreachable); retrying in %.0f s",
                                name, redact(self._uri), min(delay, remaining))
                    time.sleep(min(delay, remaining))
                    delay = min(2 * delay, 15.0)

        return call


class Tracker:
    enabled = True
    """Thin wrapper over ``MlflowClient`` with the layout above. All methods take run ids, so
    workers can log into a run the driver created.

    ``grace_s``: how long each call waits for an unreachable server (the driver waits; a training
    worker, which must not stall, uses 0 and sends what it could not at its next checkpoint)."""

    def __init__(self, uri: str, experiment_name: str | None = None, grace_s: float = 300.0):
        # MLflow's own retries (7, with backoff up to 2 min) would hold each failed call for minutes
        # before the grace period above even starts counting: one retry, then ours.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        from mlflow import MlflowClient

        self.uri = uri
        self.client = PatientClient(MlflowClient(tracking_uri=uri), uri, grace_s)
        self.experiment_id = None
        if experiment_name is None:  # a worker logging into runs the driver made
            return
        experiment = self.client.get_experiment_by_name(experiment_name)
        self.experiment_id = (experiment.experiment_id if experiment is not None
                              else self.client.create_experiment(experiment_name))
        # MLflow 3 opens an experiment of unknown kind in its GenAI view (traces, prompts); this
        # one is model training: its runs table, charts and Compare view.
        self.client.set_experiment_tag(self.experiment_id, "mlflow.experimentKind", EXPERIMENT_KIND)

    @classmethod
    def from_config(cls, config: TrackingConfig) -> "Tracker | None":
        uri = config.resolved_uri()
        if not uri:
            log.info("tracking off: set tracking.uri or MLFLOW_TRACKING_URI to record runs in MLflow")
            return None
        return cls(uri, config.experiment_name, grace_s=config.grace_s)

    # ------------------------------------------------------------------ runs
    def find_run(self, **tags: str):
        clauses = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([self.experiment_id], filter_string=clauses, max_results=2,
                                       order_by=["attributes.start_time ASC"])
        return runs[0] if runs else None

    def parent_run(self, experiment: str, tags: dict[str, str]) -> str:
        """The experiment's parent run: found by name if an earlier submission made it, else new."""
        found = self.find_run(**{"wand.experiment": experiment, "wand.role": "parent"})
        if found is not None:
            self.client.update_run(found.info.run_id, status="RUNNING")
            log.info("tracking: re-attached to parent run %s", found.info.run_id)
            return found.info.run_id
        run = self.client.create_run(self.experiment_id, run_name=experiment, tags={
            **{k: redact(v) for k, v in tags.items()}, "wand.experiment": experiment, "wand.role": "parent"})
        log.info("tracking: parent run %s at %s", run.info.run_id, self.run_url(run.info.run_id))
        return run.info.run_id

    def find_child(self, parent_id: str, stage: str):
        return self.find_run(**{"wand.parent": parent_id, "wand.stage": stage})

    def child_run(self, parent_id: str, stage: str, run_name: str | None = None, tags: dict | None = None,
                  fresh: bool = False) -> str:
        """The child run ``stage`` of a parent (nested in the UI through ``mlflow.parentRunId``).

        An existing one is re-attached; with ``fresh=True`` it is deleted and made anew instead
        (for results that are not step series, such as eval tables, which MLflow would append to)."""
        found = self.find_child(parent_id, stage)
        if found is not None and fresh:
            self.client.delete_run(found.info.run_id)
        elif found is not None:
            self.client.update_run(found.info.run_id, status="RUNNING")
            return found.info.run_id
        parent = self.client.get_run(parent_id)
        run = self.client.create_run(self.experiment_id, run_name=run_name or f"{parent.info.run_name}/{stage}", tags={
            **{k: redact(v) for k, v in (tags or {}).items()}, "mlflow.parentRunId": parent_id,
            "wand.parent": parent_id, "wand.stage": stage,
            "wand.experiment": parent.data.tags.get("wand.experiment", "")})
        return run.info.run_id

    def finish(self, run_id: str, ok: bool = True) -> None:
        self.client.set_terminated(run_id, "FINISHED" if ok else "FAILED")

    def mark_failed(self, run_id: str | None) -> None:
        """On the way out of a failure: mark the run FAILED if the server answers now; never wait
        for it or hide the error that is being raised."""
        if run_id is None:
            return
        try:
            PatientClient(self.client._client, self.uri, 0).set_terminated(run_id, "FAILED")
        except Exception as err:  # noqa: BLE001
            log.warning("tracking: could not mark run %s failed: %s", run_id, redact(err))

    def run_url(self, run_id: str) -> str:
        if self.uri.startswith("http"):
            return (f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"
                    "?workflowType=machine_learning")
        return run_id

    def log_dataset(self, run_id: str, name: str, uri: str, fingerprint: str, context: str, rows: int | None = None) -> None:
        """Record ``uri`` as a dataset input of the run (the runs table's Dataset column): its digest
        is our content fingerprint (shortened; the full one is in the source), so two runs on the same
        rows show the same dataset."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        have = {(d.dataset.name, d.dataset.digest) for d in self.client.get_run(run_id).inputs.dataset_inputs}
        digest = fingerprint[:DIGEST_CHARS]
        if (redact(name), digest) in have:
            return
        source = json.dumps({"uri": redact(uri), "fingerprint": fingerprint})
        profile = json.dumps({"num_rows": rows}) if rows is not None else None
        dataset = Dataset(name=redact(name), digest=digest, source_type="s3" if uri.startswith("s3://") else "local",
                          source=source, profile=profile)
        self.client.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])

    # ------------------------------------------------------------------ values
    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Log flattened params once; values already on the run are left (MLflow params are immutable)."""
        from mlflow.entities import Param

        have = self.client.get_run(run_id).data.params
        fresh = [Param(k, redact(v)[:6000]) for k, v in flatten(params).items() if k not in have]
        for start in range(0, len(fresh), 100):
            self.client.log_batch(run_id, params=fresh[start : start + 100])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, redact(v)) for k, v in tags.items()])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = _now_ms()
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        for start in range(0, len(items), BATCH):
            self.client.log_batch(run_id, metrics=items[start : start + BATCH])

    def last_step(self, run_id: str, key: str = "loss") -> int:
        history = self.client.get_metric_history(run_id, key)
        return max((m.step for m in history), default=-1)

    def log_steps(self, run_id: str, history: Iterable[dict], key: str = "loss") -> int:
        """Log each step's metrics (a dict with ``step``) after the last step the run holds; returns
        how many steps were sent. Idempotent, so restarts and the driver's final sync add nothing twice."""
        from mlflow.entities import Metric

        last = self.last_step(run_id, key)
        now = _now_ms()
        batch: list = []
        steps = 0
        for record in history:
            if record["step"] <= last:
                continue
            items = [Metric(k, float(v), now, int(record["step"])) for k, v in record.items()
                     if k != "step" and v is not None]
            if batch and len(batch) + len(items) > BATCH:  # calls hold whole steps only
                self.client.log_batch(run_id, metrics=batch)
                batch = []
            batch.extend(items)
            steps += 1
        if batch:
            self.client.log_batch(run_id, metrics=batch)
        return steps

    def log_curves(self, run_id: str, curves: dict[str, list[tuple[int, float]]]) -> None:
        """Series as metric histories (x as the step), e.g. KV bytes vs generated tokens."""
        from mlflow.entities import Metric

        now = _now_ms()
        items = [Metric(name, float(v), now, int(x)) for name, points in curves.items() for x, v in points]
        have = {name for name in curves if self.client.get_metric_history(run_id, name)}
        items = [m for m in items if m.key not in have]
        for start in range(0, len(items), BATCH):
            self.client.log_batch(run_id, metrics=items[start : start + BATCH])

    def log_eval(self, run_id: str, result) -> None:
        """One ``pipeline.evals.common.EvalResult``: metrics, ``evals/<name>.json`` table, ``evals/<name>.png``."""
        self.log_metrics(run_id, result.metrics)
        self.log_curves(run_id, result.curves)
        self.client.log_table(run_id, data=result.table, artifact_file=f"evals/{result.name}.json")
        self.client.log_figure(run_id, result.figure, f"evals/{result.name}.png")
        if result.notes:
            self.set_tags(run_id, {f"wand.note.{result.name}": "; ".join(result.notes)})

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, redact(text), artifact_file)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def load_logged_student(uri: str, tracking_uri: str | None = None):
    """The student an experiment logged as an MLflow model (``models:/wand-cosyvoice2@champion``,
    ``models:/<name>/<version>``, ``models:/<model id>``), as a plain model of its spec: the
    family's own loader on the release-format weights the model carries (``pipeline.registry``)."""
    import json

    import mlflow

    from pipeline.registry.pyfunc import DESCRIBE
    from wand.models import get_spec

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri))
    folder = next((f for f in (local / "data" / "student", local) if (f / DESCRIBE).is_file()), None)
    if folder is None:
        raise ValueError(f"{uri}: no {DESCRIBE}; is this a student model a wand-tts experiment logged?")
    meta = json.loads((folder / DESCRIBE).read_text())
    return get_spec(meta["model"], meta["model_size"]).load(str(folder))
