"""Entry points: every shipped config loads; bad values fail before any work, naming the field."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from helpers import corpus_rows
from pipeline.config import DistillConfig
from wand.models import get_spec

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    values = yaml.safe_load(path.read_text())
    from pipeline.cli import _merge

    entries = [_merge(values.get("defaults") or {}, e) for e in values["experiments"]] if "experiments" in values else [values]
    configs = [DistillConfig.model_validate(e) for e in entries]
    if path.name == "paper.yaml":  # the paper's three models
        assert [c.model for c in configs] == ["cosyvoice2", "indextts", "sparktts"]
    for config in configs:
        train = config.train_config()
        assert train.resolved_window_target() <= train.window_start
        if config.model_size == "real":  # the paper's settings
            assert (train.window_start, train.lr, train.epochs) == (128, 1e-5, 1.0)
            assert train.resolved_window_target() == {"cosyvoice2": 32, "indextts": 32, "sparktts": 64}[config.model]


def run_job(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "jobs.precompute", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_bad_config_fails_naming_the_field(tmp_path):
    out = run_job("--config", "jobs/configs/tiny.yaml", "--only", "cosyvoice2", "--set", "precompute.k=0",
                  "--set", "precompute.on_bad_rows=skip")
    assert out.returncode == 2
    assert "precompute.k: Input should be greater than or equal to 1" in out.stderr
    assert "precompute.on_bad_rows: Input should be 'fail' or 'quarantine'" in out.stderr
    out = run_job("--config", "jobs/configs/tiny.yaml", "--only", "cosyvoice2", "--k", "8")  # one override syntax
    assert out.returncode == 2 and "unrecognized arguments: --k" in out.stderr
    out = run_job("--config", str(tmp_path / "missing.yaml"))
    assert out.returncode == 2 and "no such file" in out.stderr


@pytest.mark.slow
def test_precompute_job_runs_from_the_command_line(tmp_path):
    spec = get_spec("sparktts", "tiny")
    (tmp_path / "in").mkdir()
    pq.write_table(pa.Table.from_pylist(corpus_rows(spec, 9, seed=7)), tmp_path / "in" / "a.parquet")
    out = run_job("--config", "jobs/configs/tiny.yaml", "--only", "sparktts", "--root", str(ROOT),
                  "--set", "model_size=tiny", "--set", "teacher_source=null", "--set", f"corpus={tmp_path / 'in'}",
                  "--set", f"shards={tmp_path / 'out'}", "--set", "precompute.rows_per_shard=4", "--set", "precompute.k=8")
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout[out.stdout.index("{"):])
    assert summary["rows"] == 9 and summary["shards"] == 3 and summary["k"] == 8
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["rows"] == 9
