"""jobs/choose_window.py against a brute-force computation from the teacher's own attention weights,
and its record in MLflow."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from helpers import corpus_rows
from wand.models import get_spec

ROOT = Path(__file__).resolve().parents[2]


def brute_force_kept(model, rows, window):
    """Overall and per-layer kept share by explicit loops over eager attention weights."""
    kept_by_layer, pairs = None, 0
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        prefix = row["prefix_length"]
        with torch.no_grad():
            attentions = model(input_ids=ids, output_attentions=True).attentions  # L x [1, H, T, T]
        if kept_by_layer is None:
            kept_by_layer = [0.0] * len(attentions)
        length = ids.shape[1]
        for layer, probs in enumerate(attentions):
            for head in range(probs.shape[1]):
                for q in range(prefix + window, length):
                    keys = [k for k in range(q + 1) if k < prefix or q - k < window]
                    kept_by_layer[layer] += float(probs[0, head, q, keys].sum())
        pairs += probs.shape[1] * max(0, length - prefix - window)
    return sum(kept_by_layer) / (pairs * len(kept_by_layer)), [k / pairs for k in kept_by_layer]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_choose_window_matches_brute_force_and_logs_to_mlflow(tmp_path, mlflow_server):
    from mlflow import MlflowClient

    spec = get_spec("llasa-3b", "tiny")
    rows = corpus_rows(spec, 10, seed=4, min_gen=20, max_gen=40)
    (tmp_path / "corpus").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "corpus" / "c.parquet")
    config = {"experiment": "cw", "model": "llasa-3b", "model_size": "tiny", "corpus": str(tmp_path / "corpus"),
              "shards": str(tmp_path / "topk"), "storage": str(tmp_path / "ckpt"), "evaluate": {"enabled": False},
              "tracking": {"uri": mlflow_server.uri, "experiment_name": "choose-window-test"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    out = subprocess.run([sys.executable, "-m", "jobs.choose_window", "--config", str(tmp_path / "c.yaml"),
                          "--rows", "6", "--windows", "2,4,8,16", "--device", "cpu", "--json", str(tmp_path / "cw.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "cw.json").read_text())
    assert "Recommended: curriculum.window_target:" in out.stdout

    torch.manual_seed(0)  # the teacher the job built: the tiny preset from teacher_seed 0
    teacher = spec.build().eval()
    teacher.set_attn_implementation("eager")
    sampled = [r for r in rows if r["id"] in set(result["rows"])]
    assert len(sampled) == 6
    for window, kept, layers in zip(result["windows"], result["kept"], result["layers"]):
        expected, expected_layers = brute_force_kept(teacher, sampled, window)
        assert kept == pytest.approx(expected, abs=1e-5)
        assert layers == pytest.approx(expected_layers, abs=1e-5)
    # The recommendation is the smallest W that keeps 95% (or the largest tried, with a note).
    reaching = [w for w, k in zip(result["windows"], result["kept"]) if k >= 0.95]
    assert result["window_target"] == (reaching[0] if reaching else max(result["windows"]))
    assert result["window_start"] == 4 * result["window_target"]

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("choose-window-test")
    runs = client.search_runs([experiment.experiment_id])
    child = next(r for r in runs if r.data.tags.get("wand.stage") == "choose-window")
    assert child.data.metrics["recommended_window_target"] == result["window_target"]
    assert child.data.metrics["attn_kept_w8"] == pytest.approx(result["kept"][2])
