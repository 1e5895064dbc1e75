"""A killed results-table run continues from its journal: finished results are not measured again, and
the figures are those of an uninterrupted run."""

import json

import pytest
import torch

import pipeline.evals.ablation as ablation
import wand
from pipeline.evals.ablation import AblationConfig, run_ablation, variant_named
from pipeline.evals.journal import Journal
from pipeline.synthetic.law import synthetic_rows
from wand.models import get_spec

CONFIG = AblationConfig(window=4, window_start=8, steps=3, batch_size=2, lr=1e-2)


def test_a_journal_keeps_finished_lines_drops_a_cut_one_and_refuses_another_run(tmp_path, caplog):
    path = tmp_path / "runs" / "family.jsonl"
    journal = Journal(path, {"model": "m", "steps": (3, 4)})
    journal.add("teacher seed None", {"per": 0.25})
    journal.add("wand seed 0", {"per": 0.5, "per_row": [0.5, 0.5]})
    with open(path, "a") as f:
        f.write('{"context": {"model": "m", "steps": [3, 4]}, "key": "wand seed 1", "resu')  # killed mid-write
    again = Journal(path, {"model": "m", "steps": [3, 4]})
    assert again.results == {"teacher seed None": {"per": 0.25}, "wand seed 0": {"per": 0.5, "per_row": [0.5, 0.5]}}
    assert "cut short" in caplog.text and path.read_text().endswith("}\n")
    again.add("wand seed 1", {"per": 0.75})
    assert Journal(path, {"model": "m", "steps": [3, 4]})["wand seed 1"] == {"per": 0.75}
    with pytest.raises(ValueError, match=r"family\.jsonl was written by another run \(differs in steps\)"):
        Journal(path, {"model": "m", "steps": [3, 5]})
    path.write_text('{"context": {}, "key": "a", "result": {}}\nnot json\n{}\n')
    with pytest.raises(ValueError, match=r"family\.jsonl line 2: not a journal entry"):
        Journal(path, {})
    journal.remove()
    assert not path.exists() and Journal(path, {}).results == {}


def timeless(result: dict) -> dict:
    """A result without what the clock decides (seconds, latency ratios)."""
    return {k: v for k, v in result.items() if "seconds" not in k and "latency" not in k}


def test_a_table_run_killed_after_some_results_continues_to_the_same_figures(tmp_path, monkeypatch):
    spec = get_spec("sparktts", "tiny")
    torch.manual_seed(0)
    teacher = wand.enable_wand(spec.build().eval(), CONFIG.window)
    rows = synthetic_rows(spec, 6, seed=0, min_text=6, max_text=10)
    held = synthetic_rows(spec, 2, seed=1, min_text=14, max_text=18, split="heldout", alignment=True)
    variants = [variant_named(name) for name in ("teacher", "control", "wand")]

    def run(names, journal=None):
        return run_ablation(spec, teacher, rows, held, CONFIG, variants=[v for v in variants if v.name in names],
                            free_rows=2, seeds=(0, 1), journal=journal)

    whole = run({"teacher", "control", "wand"})
    journal = Journal(tmp_path / "sparktts.jsonl", {"model": "sparktts"})
    first = run({"teacher", "control"}, journal)  # the run that was killed once the control's seeds were done
    assert [(r["variant"], r["seed"]) for r in first] == [("teacher", None), ("control", 0), ("control", 1)]
    assert len((tmp_path / "sparktts.jsonl").read_text().splitlines()) == 3

    trained = []
    original = ablation.train_student
    monkeypatch.setattr(ablation, "train_student", lambda *a, **kw: trained.append(a[3].name) or original(*a, **kw))
    continued = run({"teacher", "control", "wand"}, Journal(tmp_path / "sparktts.jsonl", {"model": "sparktts"}))
    assert trained == ["wand", "wand"]  # the teacher's and control's results came from the journal
    assert [timeless(r) for r in continued] == [json.loads(json.dumps(timeless(r))) for r in whole]
    assert len((tmp_path / "sparktts.jsonl").read_text().splitlines()) == 5


def test_the_table_command_killed_midway_continues_when_run_again(tmp_path):
    """As a user runs it (subprocesses, clean environment), on a teacher of another backbone written by
    the teacher job: the table command is killed once two results are in its journal; the same command
    again takes them from there, measures the rest, writes the figures of an uninterrupted run, says how
    many it took and removes the journal; a journal of other settings is refused (exit 2, naming it)."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    teachers = tmp_path / "teachers"
    made = subprocess.run([sys.executable, "-m", "jobs.train_teachers", "--models", "sparktts", "--width", "48",
                           "--layers", "2", "--heads", "2", "--phases", "20:4:8:2", "--rows", "8", "--heldout", "3",
                           "--output", str(teachers)], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]

    def table(output, *extra):
        return [sys.executable, "-m", "benchmarks.ablation_table", "--models", "sparktts", "--teachers", str(teachers),
                "--steps", "4", "--batch-size", "2", "--train-rows", "8", "--heldout", "2", "--free-rows", "2",
                "--long-rows", "0", "--variants", "teacher", "control", "wand", "--seeds", "0", "1", "--threads", "1",
                "--no-readme", "--output", str(output), *extra]

    whole = subprocess.run(table(tmp_path / "whole.json"), cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    reference = json.loads((tmp_path / "whole.json").read_text())
    assert "resumed" not in reference and reference["teachers"]["sparktts"]["backbone"]["width"] == 48

    output = tmp_path / "killed.json"
    journal = tmp_path / "killed.json.partial" / "sparktts.jsonl"
    process = subprocess.Popen(table(output), cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline and (
            not journal.exists() or journal.read_text().count("\n") < 2):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    kept = journal.read_text().count("\n")
    assert 2 <= kept < 5 and not output.exists()

    other = subprocess.run(table(output, "--steps", "5"), cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and "sparktts.jsonl was written by another run (differs in config)" in other.stderr, \
        other.stderr[-2000:]

    again = subprocess.run(table(output), cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    saved = json.loads(output.read_text())
    assert saved["resumed"] == {"sparktts": kept} and again.stderr.count("taken from") == kept
    assert [timeless(r) for r in saved["results"]] == [timeless(r) for r in reference["results"]]
    assert not journal.parent.exists()
    assert "Teachers of another backbone: SparkTTS 48 wide x 2 layers. Measured on" in again.stdout  # the header says whose
