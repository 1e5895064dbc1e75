"""Log an experiment's student as an MLflow model, register it under its family's name and move the
champion alias to it only when the evals' gates pass (``pipeline.evals.gates``).

One model version per (parent run, student): a resubmitted experiment whose student did not change
finds its version and registers nothing new; a changed student (new teacher, new data) is a new
version. A version that misses a gate is registered without the alias and tagged with what it missed.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import wand

from pipeline.evals.gates import check_gates, missed, passed
from pipeline.registry.pyfunc import DESCRIBE, default_params, prompt_of

log = logging.getLogger("wand.registry")
CHECKSUM_TAG = "wand.student_checksum"


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    model_id: str
    champion: bool
    alias: str
    missed: str  # "" when every gate passed

    @property
    def uri(self) -> str:
        """The URI to load: the alias when this version holds it, else the version."""
        return f"models:/{self.name}@{self.alias}" if self.champion else f"models:/{self.name}/{self.version}"


def registered(registration: Registration | None) -> dict:
    """What a summary row says of a registration (``pipeline.evals.report.registry_lines`` prints it)."""
    if registration is None:
        return {"registered_model": None, "champion": None, "missed": None}
    return {"registered_model": f"models:/{registration.name}/{registration.version}",
            "champion": registration.alias if registration.champion else None, "missed": registration.missed}


def registered_name(config) -> str:
    return config.tracking.registered_model or f"wand-{config.model}"


def describe(config) -> dict:
    """``wand_model.json``: what ``pipeline.registry.pyfunc`` needs to rebuild the student."""
    return {"model": config.model, "model_size": config.model_size, "experiment": config.experiment,
            "window": config.train_config().resolved_window_target()}


def register_student(tracker, parent: str, config, student_dir: str, checksum: str, metrics: dict,
                     example_row: dict) -> Registration:
    """Log (or find) the student model of ``parent``, register it, and promote it if its gates pass.

    ``student_dir``: the exported student on local disk; ``metrics``: the evals' metrics;
    ``example_row``: a held-out corpus row (its prompt is the model's input example)."""
    client = tracker.client
    name = registered_name(config)
    alias = config.tracking.champion_alias
    found = _version_of(client, name, parent, checksum)
    results = check_gates(metrics)
    ok, what = passed(results), missed(results)
    if found is not None:
        log.info("registry: %s version %s already holds this run's student; nothing new registered", name, found.version)
        version = found
        _apply_verdict(client, name, alias, str(found.version), ok, what)  # the evals may have been rerun
    else:
        model_id = _log_model(tracker, parent, config, student_dir, checksum, example_row)
        _ensure_registered_model(client, name, config)
        version = client.create_model_version(
            name, source=f"models:/{model_id}", run_id=parent, model_id=model_id,
            tags={CHECKSUM_TAG: checksum, "wand.experiment": config.experiment, "wand.gates": "passed" if ok else "failed",
                  **({"wand.missed": what} if what else {})},
            description=_description(config, results, ok))
        if ok:
            client.set_registered_model_alias(name, alias, version.version)
    holder = _alias_version(client, name, alias)
    registration = Registration(name, str(version.version), _model_id(version), holder == str(version.version),
                                alias, what)
    tracker.set_tags(parent, {"wand.registered_model": f"models:/{name}/{registration.version}",
                              "wand.champion": alias if registration.champion else "", "wand.missed": what})
    if ok:
        log.info("registry: %s version %s passed every gate: %s", name, registration.version, registration.uri)
    else:
        log.warning("registry: %s version %s registered without '%s': %s", name, registration.version, alias, what)
    return registration


def update_verdict(tracker, parent: str, config, checksum: str, metrics: dict) -> Registration | None:
    """After the evals of a registered student were run again (``jobs/evaluate.py``): its version's
    gate tags and the alias follow the new figures (the alias leaves a version that now misses a
    gate). None when this run's student is not registered."""
    client, name, alias = tracker.client, registered_name(config), config.tracking.champion_alias
    found = _version_of(client, name, parent, checksum)
    if found is None:
        return None
    results = check_gates(metrics)
    ok, what = passed(results), missed(results)
    _apply_verdict(client, name, alias, str(found.version), ok, what)
    return Registration(name, str(found.version), _model_id(found), _alias_version(client, name, alias) == str(found.version),
                        alias, what)


def _model_id(version) -> str:
    """The logged model of a version: its source is models:/<model id> (the server does not always
    echo model_id back)."""
    return version.model_id or version.source.removeprefix("models:/")


def _apply_verdict(client, name: str, alias: str, version: str, ok: bool, what: str) -> None:
    client.set_model_version_tag(name, version, "wand.gates", "passed" if ok else "failed")
    client.set_model_version_tag(name, version, "wand.missed", what)
    if ok:
        client.set_registered_model_alias(name, alias, version)
    elif _alias_version(client, name, alias) == version:
        log.warning("registry: %s version %s now misses a gate (%s): '%s' removed from it", name, version, what, alias)
        client.delete_registered_model_alias(name, alias)


def _log_model(tracker, parent: str, config, student_dir: str, checksum: str, example_row: dict) -> str:
    """The student as a logged model of the parent run (pyfunc with ``pipeline.registry.pyfunc`` as its
    loader, the release-format weights as its data); the run's step-0 metrics (the evals' headline and
    gates) are linked to it. Returns its model id."""
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature, Model

    spec = config.train_config().spec()
    example = pd.DataFrame([prompt_of(spec, example_row)])
    output = pd.DataFrame([{"speech_ids": [int(spec.speech_range[0])], "stopped": True, "generated_tokens": 1}])
    signature = infer_signature(example, output, params=default_params(spec))
    # Model.log takes the server and the experiment from MLflow's global settings: the parent run's.
    mlflow.set_tracking_uri(tracker.uri)
    mlflow.set_experiment(experiment_id=tracker.client.get_run(parent).info.experiment_id)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp, "student")
        shutil.copytree(student_dir, folder)
        (folder / DESCRIBE).write_text(json.dumps(describe(config), indent=2))
        info = Model.log(
            artifact_path=None, name="student", flavor=mlflow.pyfunc, run_id=parent,
            loader_module="pipeline.registry.pyfunc", data_path=str(folder), signature=signature,
            # a short generation: MLflow loads the model and predicts on the example to check it
            input_example=(example, {"max_new_tokens": 4}),
            pip_requirements=[f"wand-tts=={wand.__version__}"], model_type="wand-student",
            tags={CHECKSUM_TAG: checksum, "wand.model": config.model, "wand.experiment": config.experiment})
    return info.model_id


def _version_of(client, name: str, parent: str, checksum: str):
    try:
        versions = client.search_model_versions(f"name = '{name}' and run_id = '{parent}'")
    except Exception as err:  # noqa: BLE001 - a registered model that does not exist yet
        if "RESOURCE_DOES_NOT_EXIST" in str(err):
            return None
        raise
    return next((v for v in versions if v.tags.get(CHECKSUM_TAG) == checksum), None)


def _ensure_registered_model(client, name: str, config) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(
            name, tags={"wand.model": config.model},
            description=(f"WAND students of {config.model}: one version per finished experiment; the "
                         f"'{config.tracking.champion_alias}' alias marks the latest that passed every gate "
                         "(pipeline/evals/gates.py). Load: mlflow.pyfunc.load_model('models:/"
                         f"{name}@{config.tracking.champion_alias}')."))


def _alias_version(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _description(config, results, ok: bool) -> str:
    lines = [f"Experiment {config.experiment} (W={config.train_config().resolved_window_target()}): "
             + ("passed every gate." if ok else "missed a gate.")]
    lines += [f"- {r.gate.what}: " + (f"{r.value:.3f} {'ok' if r.passed else 'MISSED'}" if r.applies else
                                      ("not measured (MISSED)" if not r.passed else "not measured"))
              for r in results]
    return "\n".join(lines)
