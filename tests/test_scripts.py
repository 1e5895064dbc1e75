"""Every entry point answers --help without running anything, and an image build copies no local state."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(str(p.relative_to(ROOT)) for folder in ("jobs", "benchmarks") for p in (ROOT / folder).glob("*.py")
                 if p.name != "__init__.py")


def snapshot() -> dict:
    """Every file under the folders a script could write to, with its modification time."""
    found = {}
    for folder in ("runs", "benchmarks/results", "teachers"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file():
                found[str(path)] = path.stat().st_mtime_ns
    return found


@pytest.mark.timeout(900)
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_answers_help_without_running(script):
    before = snapshot()
    module = script.removesuffix(".py").replace("/", ".")
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, env={**os.environ, "RAY_ADDRESS": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.lstrip().startswith("usage:"), out.stdout[:500]
    # The first line of the help is the module docstring's first line, which says what it does; then
    # the exact command that runs it, and what it writes (files, runs) or prints.
    assert len(out.stdout.splitlines()) > 3
    assert f"python -m {module}" in out.stdout, "no exact command"
    assert any(word in out.stdout.lower() for word in ("writ", "print", "logs")), "does not say what it writes"
    assert snapshot() == before, "--help wrote or changed files"
    for example in re.findall(r"--set[ =]([a-z_][a-z0-9_.]*=[^\s,;)\]]+)", out.stdout):  # not the usage's FIELD=VALUE
        assert_real_field(example, script)


def assert_real_field(example: str, where: str) -> None:
    """A ``--set FIELD=VALUE`` example, applied to the embedded default, passes validation."""
    import argparse
    import contextlib
    import io

    from pipeline.config import DistillConfig
    from pipeline.cli import load_experiments

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            load_experiments(DistillConfig, argparse.ArgumentParser(), ["--config", str(ROOT / "jobs/configs/tiny.yaml"),
                                                                        "--set", example, "--root", str(ROOT)])
    except SystemExit:
        pytest.fail(f"{where}: --set {example} is not a valid override: {stderr.getvalue()[-500:]}")


def test_an_image_build_copies_no_local_state():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for heavy_or_secret in (".venv/", "runs/", ".cache/", ".git/", ".whl/"):
        assert heavy_or_secret in ignored
    assert "COPY" in (ROOT / "cluster/Dockerfile").read_text()  # the context the file above filters
