"""Entry points run the way a new user runs them: ``python jobs/<job>.py`` in a fresh shell, with no
RAY_* variables, no ~/.ray/auth_token (an empty HOME) and nothing from this test process's
environment (the suite's own Ray token stays here). Each job that starts a local Ray must make its
own token, never print it, and leave nothing of it behind; no secret of the environment may reach
any output or file of the run."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import _files_with, corpus_rows
from pipeline.services import free_port
from wand.models import get_spec

ROOT = Path(__file__).resolve().parents[1]
SECRETS = {"MLFLOW_TRACKING_PASSWORD": "plainrun-mlflow-secret-7c1f", "AWS_SECRET_ACCESS_KEY": "plainrun-aws-secret-93be",
           "HF_TOKEN": "plainrun-hf-token-5d20"}


def fresh_shell(home: Path, tmp: Path, **extra: str) -> dict[str, str]:
    """What a new login shell on a fresh machine has: PATH, HOME (empty), a temp folder, a locale.
    TORCH_EXTENSIONS_DIR only spares the test DeepSpeed's 70 s JIT build (nothing of Ray's)."""
    return {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(home), "TMPDIR": str(tmp),
            "LANG": "C.UTF-8", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
            "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions"), **extra}


def run(job: str, args: list[str], env: dict, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """``python <repo>/jobs/<job>.py`` from the user's own folder ``cwd``."""
    return subprocess.run([sys.executable, str(ROOT / "jobs" / f"{job}.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def shell():
    """A short temp folder (Ray puts its sockets under TMPDIR: pytest's paths are too long for them)
    and an empty HOME."""
    tmp = Path(tempfile.mkdtemp(prefix="wpr-", dir="/tmp"))
    (tmp / "home").mkdir()
    (tmp / "tmp").mkdir()
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


def experiment_args(tmp: Path, mlflow_uri: str | None = None) -> list[str]:
    """Paths relative to ``tmp``, the folder the jobs run from (no --root: the current directory)."""
    spec = get_spec("sparktts", "tiny")
    for name, rows, seed in (("corpus", 12, 3), ("heldout", 4, 4)):
        (tmp / name).mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_pylist(corpus_rows(spec, rows, seed=seed, min_gen=6, max_gen=12)),
                       tmp / name / "c.parquet")
    sets = {"model_size": "tiny", "teacher_source": "null", "corpus": "corpus", "shards": "topk",
            "storage": "checkpoints", "evaluate.corpus": "heldout", "precompute.k": 8,
            "curriculum.stages": 1, "curriculum.window_start": 8, "curriculum.window_target": 4,
            "train.num_workers": 1, "train.batch_size": 4, "evaluate.rows": 2, "evaluate.seconds": "[1]",
            "evaluate.windows": "[4]", "evaluate.latency_buckets": 2, "tracking.uri": mlflow_uri or "null"}
    args = ["--config", str(ROOT / "jobs/configs/tiny.yaml"), "--only", "sparktts"]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    return args


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_every_job_that_starts_ray_runs_from_a_fresh_shell(shell, mlflow_server):
    env = fresh_shell(shell / "home", shell / "tmp", **SECRETS)
    args = experiment_args(shell, mlflow_server.uri)
    # What a `ray start` cluster gone without `ray stop` leaves: Ray's pointer (under TMPDIR) to a
    # GCS that no longer answers. The jobs' own local clusters must not ask it anything.
    (shell / "tmp" / "ray").mkdir()
    (shell / "tmp" / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
    outputs = []
    for job, extra in (("distill", []), ("precompute", []), ("train_stage", ["--stage", "1"]), ("evaluate", [])):
        out = run(job, args + extra, env, shell)
        outputs += [out.stdout, out.stderr]
        assert out.returncode == 0, f"{job}: {out.stderr[-3000:]}"
        assert "Started a local Ray instance" in out.stderr, job  # its own, not one it found
    assert "nothing to compute" in outputs[3]  # the precompute resumed: shards of the chain reused
    # Ray Train's cleaner asked this run's cluster, not the dead one (else each fit ends 10-12 s late).
    assert not any("Failed to stop PlacementGroupCleaner" in text for text in outputs)
    progress = [line.split(")", 1)[-1] for line in (outputs[0] + outputs[1]).splitlines() if "stage 1/1: step " in line]
    assert progress and len(progress) == len(set(progress)), progress  # each progress line once in the log
    assert (shell / "checkpoints" / "tiny-sparktts" / "student").is_dir()
    # The token lived in a private folder that is gone; nothing was put in HOME.
    assert not list((shell / "tmp").glob("wand-ray-auth-*"))
    assert not (shell / "home" / ".ray" / "auth_token").exists()
    # No secret of the environment in any output, in any file the run wrote (shards, checkpoints,
    # the student, Ray's session logs under TMPDIR) or in the MLflow server's store and artifacts.
    for name, secret in SECRETS.items():
        assert not any(secret in text for text in outputs), name
        scanned, hits = _files_with(secret.encode(), [shell, mlflow_server.root])
        assert scanned > 20 and not hits, (name, hits)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("setting, message", [
    ("precompute.num_cpus_per_actor=1000", "precompute.num_cpus_per_actor: asks for 1000 CPU, but any node of this "
                                           "Ray cluster has"),
    ("precompute.label_selector={wand-role: precompute}", "precompute.label_selector {'wand-role': 'precompute'}: "
                                                          "no node of this Ray cluster has these labels")])
def test_a_request_no_node_can_hold_is_refused_before_anything_is_written(shell, setting, message):
    args = experiment_args(shell) + ["--set", setting]
    out = run("precompute", args, fresh_shell(shell / "home", shell / "tmp"), shell, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr
    assert "Traceback" not in out.stderr and not (shell / "topk").exists()


def test_an_unreachable_ray_address_fails_in_bounded_time_naming_it(shell):
    port = free_port()  # nothing listens there
    env = fresh_shell(shell / "home", shell / "tmp", RAY_ADDRESS=f"127.0.0.1:{port}", WAND_RAY_CONNECT_S="2")
    start = time.monotonic()
    out = run("precompute", experiment_args(shell), env, shell, timeout=120)
    assert out.returncode != 0 and time.monotonic() - start < 60
    assert f"RAY_ADDRESS=127.0.0.1:{port}: no Ray cluster answered at 127.0.0.1:{port} within 2 s" in out.stderr
    assert "Traceback" not in out.stderr and not (shell / "topk").exists()
