"""jobs/choose_window.py against brute-force computations (the teacher's own attention weights; its
forward under a hand-built mask; the KV saving from the rows' lengths), and its record in MLflow."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from helpers import corpus_rows
from pipeline.evals.window_choice import MIN_AGREEMENT
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


def brute_force_mask_quality(spec, model, rows, window):
    """Top-1 agreement and mean KL of the model under a hand-built prefix + W mask against itself with
    full attention, over the target ids, at generated positions with >= W generated tokens before them."""
    targets = spec.target_ids()
    agree, kl = [], []
    for row in rows:
        ids, prefix = torch.tensor([row["input_ids"]]), row["prefix_length"]
        n = ids.shape[1]
        q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
        logits = []
        for allowed in (k <= q, (k <= q) & ((k < prefix) | (q - k < window))):
            mask = torch.zeros(1, 1, n, n).masked_fill(~allowed, float("-inf"))
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(n)[None])
            logits.append(torch.log_softmax(out.logits[0, prefix - 1 : -1][:, targets].float(), -1))
        full, masked = logits
        cut = torch.arange(n - prefix) >= window
        agree += (full.argmax(-1) == masked.argmax(-1))[cut].tolist()
        kl += (full.exp() * (full - masked)).sum(-1)[cut].tolist()
    return float(np.mean(agree)), float(np.mean(kl))


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
    assert "curriculum.window_target:" in out.stdout and "of the KV cache at the median row" in out.stdout

    torch.manual_seed(0)  # the teacher the job built: the tiny preset from teacher_seed 0
    teacher = spec.build().eval()
    teacher.set_attn_implementation("eager")
    sampled = [r for r in rows if r["id"] in set(result["rows"])]
    assert len(sampled) == 6
    for window, kept, layers in zip(result["windows"], result["kept"], result["layers"]):
        expected, expected_layers = brute_force_kept(teacher, sampled, window)
        assert kept == pytest.approx(expected, abs=1e-5)
        assert layers == pytest.approx(expected_layers, abs=1e-5)
    for i, window in enumerate(result["windows"]):
        agreement, kl = brute_force_mask_quality(spec, teacher, sampled, window)
        assert result["mask_agreement"][i] == pytest.approx(agreement, abs=1e-9)
        assert result["mask_kl"][i] == pytest.approx(kl, abs=1e-4)
        generated = [len(r["input_ids"]) - r["prefix_length"] for r in sampled]
        saved = [min(window, g) - g for g in generated]  # tokens, negative: what WAND leaves out
        assert result["kv_saving"][i] == pytest.approx(float(np.median(
            [-s / (r["prefix_length"] + g) for s, r, g in zip(saved, sampled, generated)])))
    assert result["mask_kl"][0] > 1e-6  # the smallest window does hide something from this teacher
    # The recommendation is the smallest W whose bare-mask agreement reaches the threshold (or the largest tried).
    reaching = [w for w, a in zip(result["windows"], result["mask_agreement"]) if a >= MIN_AGREEMENT]
    assert result["window_target"] == (reaching[0] if reaching else max(result["windows"]))
    assert result["window_start"] == 4 * result["window_target"]

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("choose-window-test")
    runs = client.search_runs([experiment.experiment_id])
    child = next(r for r in runs if r.data.tags.get("wand.stage") == "choose-window")
    assert child.data.metrics["recommended_window_target"] == result["window_target"]
    assert child.data.metrics["attn_kept_w8"] == pytest.approx(result["kept"][2])
    assert child.data.metrics["mask_agreement_w8"] == pytest.approx(result["mask_agreement"][2])
