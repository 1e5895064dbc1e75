"""Screenshots of the MLflow UI of a real `make demo` run, for the docs (docs/*.png).

    make demo && make screenshots
    python -m jobs.ui_screenshots --tracking-uri http://127.0.0.1:5000 --out docs

Drives headless Chromium (Debian's chromium + chromium-driver: `make browser`) against the demo's
MLflow server and writes docs/mlflow-runs.png (the runs table: one parent run per model),
mlflow-children.png (a parent with its precompute, stage and eval children), mlflow-compare.png
(the Compare view of the parents: their parameters and KV / latency / quality metrics),
mlflow-figure.png (an eval run's KV-memory figure), mlflow-registry.png (the first model's
registered student: versions, alias, gates) and mlflow-model.png (its logged model with the
metrics that scored it). Prints each file it writes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from pipeline.redaction import redact

__all__ = ["browser", "wait_for", "body", "close_side_panel"]


def browser():
    """Headless Chromium through its driver (never Selenium Manager's download)."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        raise RuntimeError("needs Debian's chromium and chromium-driver: run `make browser` "
                           "(apt-get install chromium chromium-driver)")
    os.environ["SE_OFFLINE"] = "true"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1600,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def wait_for(driver, check, timeout=60.0, what="the page"):
    """``check(driver)``'s first truthy answer within ``timeout`` seconds; else an AssertionError
    quoting what the page showed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = check(driver)
            if found:
                return found
        except Exception:  # noqa: BLE001 - the page is still rendering
            pass
        time.sleep(0.5)
    raise AssertionError(f"{what} did not show within {timeout} s; the page said:\n"
                         f"{driver.find_element('tag name', 'body').text[:2000]}")


def body(driver) -> str:
    return driver.find_element("tag name", "body").text


def close_side_panel(driver) -> None:
    """MLflow 3 opens an assistant panel beside every page; close it so screenshots show the page."""
    for button in driver.find_elements("xpath", "//*[text()='MLflow Assistant']/following::button"):
        if (button.get_attribute("aria-label") or "").lower().startswith("close"):
            button.click()
            return


def parents_of(uri: str, experiment_name: str) -> tuple[str, dict[str, str], dict[str, str]]:
    """(experiment id, experiment name -> parent run id, experiment name -> eval child run id)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise SystemExit(f"no MLflow experiment '{experiment_name}' at {redact(uri)}: run `make demo` first")
    parents, evals = {}, {}
    for run in client.search_runs([experiment.experiment_id], filter_string="tags.`wand.role` = 'parent'",
                                  order_by=["attributes.start_time ASC"]):
        name = run.data.tags.get("wand.experiment", run.info.run_name)
        parents[name] = run.info.run_id
        for child in client.search_runs([experiment.experiment_id],
                                        filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}' "
                                                      "and tags.`wand.stage` = 'eval'"):
            evals[name] = child.info.run_id
    if not parents:
        raise SystemExit(f"no wand-tts parent runs in '{experiment_name}' at {redact(uri)}: run `make demo` first")
    return experiment.experiment_id, parents, evals


def registry_shots(driver, uri: str, experiment_id: str, parent: str, shot) -> None:
    """The registered model of a parent's student (versions, alias, gates) and its logged model's page."""
    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri=uri).get_run(parent)
    registered = run.data.tags.get("wand.registered_model")
    if not registered or not run.outputs.model_outputs:
        print("no registered student on the first parent run: registry screenshots skipped")
        return
    name, version = registered.removeprefix("models:/").rsplit("/", 1)
    base = uri.rstrip("/")
    driver.get(f"{base}/#/models/{name}?workflowType=machine_learning")
    wait_for(driver, lambda d: f"Version {version}" in body(d), what=f"the versions of {name}")
    shot("mlflow-registry.png")
    driver.get(f"{base}/#/experiments/{experiment_id}/models/{run.outputs.model_outputs[0].model_id}"
               "?workflowType=machine_learning")
    wait_for(driver, lambda d: "gates_passed" in body(d), what="the logged model's linked metrics")
    shot("mlflow-model.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000"))
    parser.add_argument("--experiment-name", default="wand-tts")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="folder of the PNG files")
    args = parser.parse_args(argv)
    from pipeline.tracking import ui_links

    experiment_id, parents, evals = parents_of(args.tracking_uri, args.experiment_name)
    links = ui_links(args.tracking_uri, experiment_id, list(parents.values()))
    first = next(iter(parents))
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        driver = browser()
    except RuntimeError as err:
        raise SystemExit(f"ui_screenshots: {err}") from None

    def shot(name: str) -> None:
        close_side_panel(driver)
        driver.save_screenshot(str(args.out / name))
        print(f"wrote {args.out / name}")

    try:
        driver.get(links["experiment"])
        wait_for(driver, lambda d: all(name in body(d) for name in parents), what="the parent runs")
        shot("mlflow-runs.png")
        row = wait_for(driver, lambda d: d.find_element(
            "xpath", f"//*[text()='{first}']/ancestor::*[@role='row' or contains(@class,'row')][1]"),
            what=f"the {first} parent row")
        row.find_element("xpath", ".//button").click()
        wait_for(driver, lambda d: f"{first}/stage-1" in body(d) and f"{first}/eval" in body(d),
                 what=f"the stage and eval children of {first}")
        shot("mlflow-children.png")
        # The Compare view in one tall window: its parameter and metric tables render only the rows
        # in view, and scrolling them apart misaligns labels and values.
        driver.set_window_size(1600, 3000)
        driver.get(links["compare"])
        wait_for(driver, lambda d: d.find_elements("xpath", "//*[text()='kv_reduction_60s']")
                 and all(name in body(d) for name in parents),
                 what="the parameters and the KV, latency and quality metrics in the Compare view")
        time.sleep(2)  # the tables' last rows
        # (The tables scroll inside themselves, and scrolling one misaligns its labels and values: the
        # shot shows their first rows, the metrics' being FLOPs, the final loss and the gates.)
        shot("mlflow-compare.png")
        driver.set_window_size(1600, 1000)
        if first in evals:
            driver.get(f"{links['experiment'].split('/#/')[0]}/#/experiments/{experiment_id}/runs/{evals[first]}"
                       "/artifacts/evals/kv_memory.png?workflowType=machine_learning")
            wait_for(driver, lambda d: d.execute_script(
                "const i = [...document.images].find(i => i.src.startsWith('blob:') && i.complete);"
                "return i ? i.naturalWidth : 0;"), what="the kv_memory.png figure")
            shot("mlflow-figure.png")
        registry_shots(driver, args.tracking_uri, experiment_id, parents[first], shot)
    finally:
        driver.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
