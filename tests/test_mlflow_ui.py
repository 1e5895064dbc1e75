"""The MLflow UI as a user sees it: a real `mlflow server` with the three families' parent runs, their
stage and eval children, driven by headless Chromium (Debian's chromium + chromium-driver, `make browser`).

The tracking layout is written by the pipeline's own code (``Tracker``: parent and child runs, the
step metrics of a few real WAND distillation steps, ``log_evals`` with the real evals of tiny models).
Screenshots go to $WAND_UI_SCREENSHOTS (default: the test's tmp folder); docs/ holds three of them.
"""

import json
import os
import urllib.parse
from pathlib import Path

import pytest
import torch

import wand
from helpers import corpus_rows
from jobs.ui_screenshots import body, close_side_panel, wait_for
from pipeline.chain import log_evals
from pipeline.config import DistillConfig
from pipeline.evals.run import run_evals
from pipeline.registry.register import register_student
from pipeline.tracking import Tracker, ui_links
from wand.batch import collate
from wand.distill import distill_loss
from wand.models import get_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
FAMILIES = ("cosyvoice2", "indextts", "sparktts")


def browser():
    """Headless Chromium (jobs.ui_screenshots, which makes the docs' screenshots the same way); a
    missing one fails the test with how to install it."""
    from jobs.ui_screenshots import browser as chromium

    try:
        return chromium()
    except RuntimeError as err:
        pytest.fail(f"the MLflow UI test {err}")


@pytest.fixture(scope="module")
def layout(mlflow_server, tmp_path_factory):
    """Three parent runs (one per family) with a stage child (real distillation steps), an eval child
    and the student registered as an MLflow model."""
    tracker = Tracker(mlflow_server.uri, "wand-tts-ui")
    tmp = tmp_path_factory.mktemp("ui-students")
    parents, evals, registrations = {}, {}, {}
    for name in FAMILIES:
        spec = get_spec(name, "tiny")
        torch.manual_seed(0)
        teacher = wand.enable_wand(spec.build().eval(), None)
        student = wand.enable_wand(spec.build(), 8)
        rows = corpus_rows(spec, 3, seed=5, min_gen=40, max_gen=60)
        config = DistillConfig(experiment=f"ui-{name}", model=name, model_size="tiny", corpus=f"runs/corpus/ui-{name}",
                               shards=f"runs/topk/ui-{name}", storage="runs/checkpoints",
                               evaluate={"seconds": [10.0], "windows": [4, 8], "allow_training_corpus": True},
                               curriculum={"window_target": 8}, tracking={"registered_model": f"wand-{name}-ui"})
        parent = tracker.parent_run(config.experiment, {"wand.model": name, "wand.family": spec.family})
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
        steps = []
        for step in range(4):
            out = distill_loss(spec, student, collate(spec, rows), 8)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            steps.append({"step": step, "loss": float(out.loss.detach()), "ce": float(out.ce), "kd": 0.0,
                          "window": 8, "tau": None, "lr": 1e-3})
        child = tracker.child_run(parent, "stage-1")
        tracker.log_steps(child, steps)
        tracker.finish(child)
        tracker.log_dataset(parent, f"ui-{name}", config.corpus, f"{len(rows):064x}", "training", len(rows))
        results = run_evals(spec, teacher, student.eval(), 8, rows, config.evaluate)
        evals[name] = log_evals(tracker, parent, results, config, "checksum")
        # The student as a registered MLflow model, the way the chain registers it (the family's release files).
        spec.save(student, tmp / name)
        registrations[name] = register_student(tracker, parent, config, str(tmp / name), f"ui-{name}",
                                               {k: v for r in results for k, v in r.metrics.items()}, rows[0])
        tracker.finish(parent)
        parents[name] = parent
    return tracker, parents, evals, registrations


def test_the_mlflow_ui_shows_parents_children_compare_and_figures(layout, tmp_path):
    tracker, parents, evals, registrations = layout
    shots = Path(os.environ.get("WAND_UI_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    links = ui_links(tracker.uri, tracker.experiment_id, list(parents.values()))
    driver = browser()
    try:
        # The experiment opens as model training (its runs table), one parent run per model.
        driver.get(links["experiment"])
        wait_for(driver, lambda d: all(f"ui-{n}" in body(d) for n in FAMILIES), what="the three parent runs")
        text = body(driver)
        assert "Runs" in text and "Traces\n0" not in text  # not MLflow 3's GenAI overview
        assert "ui-cosyvoice2 (" in text or "ui-cosyvoice2" in text
        assert "Training" in text  # the Dataset column: each parent's corpus as a training input
        # The Models column: each parent's student, by its registered name and version.
        wait_for(driver, lambda d: all(f"wand-{n}-ui\nv{registrations[n].version}" in body(d) for n in FAMILIES),
                 what="the registered students in the runs table's Models column")
        close_side_panel(driver)
        driver.save_screenshot(str(shots / "mlflow-runs.png"))

        # Expanding a parent shows its stage and eval children.
        row = wait_for(driver, lambda d: d.find_element(
            "xpath", "//*[text()='ui-cosyvoice2']/ancestor::*[@role='row' or contains(@class,'row')][1]"),
            what="the cosyvoice2 parent row")
        row.find_element("xpath", ".//button").click()
        wait_for(driver, lambda d: "ui-cosyvoice2/stage-1" in body(d) and "ui-cosyvoice2/eval" in body(d),
                 what="the stage and eval children of the cosyvoice2 parent")
        driver.save_screenshot(str(shots / "mlflow-children.png"))

        # The Compare view of the three parents holds the KV-memory and latency metrics.
        # (its metric table renders the first rows only, alphabetically: the gates, KL, KV, latency)
        driver.get(links["compare"])
        wait_for(driver, lambda d: "kv_reduction_10s" in body(d) and "latency_full_ratio_late_early" in body(d)
                 and "gates_passed" in body(d), what="the KV-memory, latency and gate metrics in the Compare view")
        assert all(f"ui-{n}" in body(driver) for n in FAMILIES)
        close_side_panel(driver)
        metrics = driver.find_elements("xpath", "//*[text()='kv_reduction_10s']")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", metrics[-1])  # the metrics table
        driver.save_screenshot(str(shots / "mlflow-compare.png"))

        # The registered model's page: its versions, the alias on the one that passed, the gates' tag.
        # Random tiny students: only the KV and latency gates apply. KV is deterministic; the latency
        # gate times a few ms per step on a shared 2-core machine, so a family may miss it by noise
        # (measured once: 1.37 > 1.25 under the suite's load). The page shown is a family that passed.
        for family, registration in registrations.items():
            only_latency = registration.missed.startswith("latency_flat") and ";" not in registration.missed
            assert registration.champion or only_latency, (family, registration)
        promoted = next((r for r in registrations.values() if r.champion), None)
        assert promoted is not None, {f: r.missed for f, r in registrations.items()}
        family = next(f for f, r in registrations.items() if r is promoted)
        driver.get(f"{tracker.uri}/#/models/{promoted.name}?workflowType=machine_learning")
        wait_for(driver, lambda d: f"Version {promoted.version}" in body(d) and "@ champion" in body(d)
                 and "wand.gates\n: passed" in body(d), what="the registered model's version, alias and gates")
        close_side_panel(driver)
        driver.save_screenshot(str(shots / "mlflow-registry.png"))
        # The logged model's page: the eval figures and gates that scored it, linked to its run.
        driver.get(f"{tracker.uri}/#/experiments/{tracker.experiment_id}/models/{promoted.model_id}"
                   "?workflowType=machine_learning")
        wait_for(driver, lambda d: "kv_reduction_10s" in body(d) and "gates_passed" in body(d)
                 and f"ui-{family}" in body(d), what="the logged model's linked metrics and source run")
        close_side_panel(driver)
        driver.save_screenshot(str(shots / "mlflow-model.png"))

        # The eval run's figure (KV bytes against generated length) loads as an image.
        eval_run = evals["cosyvoice2"]
        driver.get(f"{tracker.uri}/#/experiments/{tracker.experiment_id}/runs/{eval_run}/artifacts/evals/kv_memory.png"
                   "?workflowType=machine_learning")
        # The UI fetches the artifact and shows it from a blob: URL once the bytes have arrived.
        width = wait_for(driver, lambda d: "evals/kv_memory.png" in body(d) and d.execute_script(
            "const i = [...document.images].find(i => i.src.startsWith('blob:') && i.complete);"
            "return i ? i.naturalWidth : 0;"), what="the kv_memory.png figure")
        assert width >= 600  # the figure is 640 pixels wide (6.4 in x 100 dpi)
        close_side_panel(driver)
        driver.save_screenshot(str(shots / "mlflow-figure.png"))
    finally:
        driver.quit()


def test_the_links_printed_for_users_name_the_runs(layout):
    tracker, parents, _, _ = layout
    links = ui_links(tracker.uri, tracker.experiment_id, list(parents.values()))
    assert links["experiment"].endswith(f"/#/experiments/{tracker.experiment_id}/runs?workflowType=machine_learning")
    query = urllib.parse.parse_qs(links["compare"].split("?", 1)[1])
    assert json.loads(query["runs"][0]) == list(parents.values())
    assert json.loads(query["experiments"][0]) == [tracker.experiment_id]
