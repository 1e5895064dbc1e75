"""A teacher run killed midway continues from its checkpoint to the weights an uninterrupted run reaches."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.synthetic.law import synthetic_rows
from pipeline.synthetic.teachers import Resume, teacher_forced_accuracy, train_teacher
from wand.models import get_spec

ROOT = Path(__file__).resolve().parents[2]


class Killed(Exception):
    """Stands for the process dying: raised from inside the loop, after some checkpoints were written."""


def test_a_run_that_dies_midway_continues_to_the_same_weights_and_curve(tmp_path):
    spec = get_spec("sparktts", "tiny")
    rows = synthetic_rows(spec, 32, seed=0, min_text=4, max_text=12)
    held = synthetic_rows(spec, 4, seed=1, min_text=4, max_text=12, split="heldout")
    phases = [(rows, 6, 4), (rows, 6, 4)]
    recipe = {"phases": "6x4 6x4", "lr": 1e-2}
    calls = []

    def curve(model, die_at=None):
        calls.append(1)
        if len(calls) == die_at:
            raise Killed
        return {"accuracy": teacher_forced_accuracy(spec, model, held)["accuracy"]}

    def train(resume, **kw):
        calls.clear()
        return train_teacher(spec, phases, lr=1e-2, log_every=0, curve_every=4, resume=resume,
                             curve=lambda m: curve(m, **kw))

    plain, plain_curve = train(None)  # no checkpoints at all
    whole = Resume(tmp_path / "whole.pt", recipe, every=3)
    model, points = train(whole)
    assert whole.resumed_at == [] and torch.load(whole.path, weights_only=True)["step"] == 12
    assert points == plain_curve and len(points) == 4  # steps 4, 6 (phase end), 8, 12
    for a, b in zip(plain.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)  # checkpointing changes nothing

    broken = Resume(tmp_path / "broken.pt", recipe, every=3)
    with pytest.raises(Killed):
        train(broken, die_at=3)  # dies measuring the curve at step 8: the last checkpoint is step 6
    assert torch.load(broken.path, weights_only=True)["step"] == 6
    again = Resume(broken.path, recipe, every=3)
    resumed, resumed_curve = train(again)
    assert again.resumed_at == [6] and again.seconds > 0
    assert resumed_curve == plain_curve  # the curve before the death comes back from the checkpoint
    for (name, a), b in zip(plain.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name  # the optimizer, schedule and batch order continued exactly

    with pytest.raises(ValueError, match=r"broken\.pt was written by another recipe \(differs in lr\)"):
        train(Resume(broken.path, {**recipe, "lr": 3e-3}))


def test_the_teacher_job_killed_midway_continues_when_run_again(tmp_path):
    """As a user runs it (subprocesses, clean environment): the job is killed once its first checkpoint
    exists; the same command again continues from it and writes the weights an uninterrupted run
    writes, records where it continued and removes the checkpoint; a checkpoint of another recipe is
    refused (exit 2, naming the file) before anything trains."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    flags = ["--models", "sparktts", "--width", "48", "--layers", "2", "--heads", "2", "--phases", "60:4:8:2",
             "--rows", "8", "--heldout", "3", "--curve-every", "20", "--checkpoint-every", "2"]

    def job(out, *extra):
        return [sys.executable, "-m", "jobs.train_teachers", *flags, "--output", str(out), *extra]

    whole = subprocess.run(job(tmp_path / "whole"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    reference = json.loads((tmp_path / "whole" / "sparktts" / "teacher.json").read_text())
    assert "resumed_at" not in reference["train"] and not (tmp_path / "whole" / "sparktts" / "resume.pt").exists()

    out = tmp_path / "killed"
    checkpoint = out / "sparktts" / "resume.pt"
    process = subprocess.Popen(job(out), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert checkpoint.exists() and not (out / "sparktts" / "teacher.json").exists()

    other = subprocess.run(job(out, "--lr", "0.01"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and "resume.pt was written by another recipe (differs in train)" in other.stderr, \
        other.stderr[-2000:]
    assert not (out / "sparktts" / "teacher.json").exists()

    again = subprocess.run(job(out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    record = json.loads((out / "sparktts" / "teacher.json").read_text())
    (continued,) = record["train"]["resumed_at"]
    assert 0 < continued < 60 and f"continuing at step {continued}/60" in again.stderr
    assert record["files"] == reference["files"]  # sha256 of the weights: the same as the uninterrupted run's
    assert record["curve"] == reference["curve"] and record["heldout"] == reference["heldout"]
    assert not checkpoint.exists()
