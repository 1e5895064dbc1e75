"""The evals, each against an independent computation (brute-force loops, direct softmax/KL)."""

import math

import numpy as np
import pytest
import torch

import wand
from conftest import tiny_model
from helpers import corpus_rows
from pipeline.config import EvalConfig
from pipeline.evals.quality import distance_bucket, position_scores
from pipeline.evals.run import run_evals
from wand.attention_mass import attention_mass, mass_shares, record_attention
from wand.kv import attention_flops_per_token
from wand.models import get_spec


def test_probe_attention_is_the_models_attention(family):
    model = tiny_model(family)
    ids = torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(0))
    reference = model(input_ids=ids).logits
    wand.enable_wand(model, 4)
    with record_attention(model) as layers:
        probed = model(input_ids=ids, prefix_lengths=torch.tensor([6]), window=None).logits
    assert torch.allclose(probed, reference, atol=1e-5)
    assert len(layers) == model.config.num_hidden_layers if family != "gpt2" else len(layers) == model.config.n_layer
    probs = layers[0][0]  # [H, T, T]
    assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-5)
    assert float(probs.triu(1).abs().max()) == 0.0  # causal
    assert model.config._attn_implementation == "sdpa"  # restored


def brute_force_shares(probs, prefix, length, window):
    layers, heads = probs.shape[:2]
    pre = win = 0.0
    count = 0
    for l in range(layers):
        for h in range(heads):
            for q in range(prefix + window, length):
                pre += sum(float(probs[l, h, q, k]) for k in range(prefix))
                win += sum(float(probs[l, h, q, k]) for k in range(q - window + 1, q + 1))
                count += 1
    return pre, win, count


@pytest.mark.parametrize("window", [1, 3, 7])
def test_mass_shares_match_brute_force(window):
    g = torch.Generator().manual_seed(window)
    probs = torch.softmax(torch.randn(2, 3, 20, 20, generator=g).masked_fill(torch.ones(20, 20).triu(1).bool(), -1e9), -1)
    got = mass_shares(probs, 5, 20, window)
    want = brute_force_shares(probs, 5, 20, window)
    assert got[2] == want[2]
    assert got[0] == pytest.approx(want[0], rel=1e-5) and got[1] == pytest.approx(want[1], rel=1e-5)
    assert mass_shares(probs, 5, 20, 15) == (0.0, 0.0, 0)  # no query farther than W


def test_attention_mass_of_a_wrapper_model():
    spec = get_spec("cosyvoice2", "tiny")
    torch.manual_seed(0)
    model = spec.build().eval()
    rows = corpus_rows(spec, 2, seed=4, min_gen=30, max_gen=40)
    sequences = [{"input_ids": torch.tensor([r["input_ids"]]), "prefix_length": r["prefix_length"]} for r in rows]
    masses = attention_mass(model, sequences, [2, 8, 16])
    kept = [m.kept for m in masses]
    assert all(0 < k <= 1 + 1e-6 for k in kept) and kept == sorted(kept)  # a wider window keeps more
    assert all(m.queries > 0 for m in masses)


def test_attention_flops_match_a_direct_sum():
    config = get_spec("sparktts", "tiny").backbone_config()
    per_key = 4 * config.num_hidden_layers * config.num_attention_heads * (config.hidden_size // config.num_attention_heads)
    prefix, generated, window = 17, 90, 12
    full = sum(per_key * (prefix + g) for g in range(1, generated + 1)) / generated
    ours = sum(per_key * (prefix + min(g, window)) for g in range(1, generated + 1)) / generated
    assert attention_flops_per_token(config, prefix, generated, None) == pytest.approx(full)
    assert attention_flops_per_token(config, prefix, generated, window) == pytest.approx(ours)
    assert attention_flops_per_token(config, prefix, 5, window) == pytest.approx(
        attention_flops_per_token(config, prefix, 5, None))


def test_distance_buckets():
    assert [distance_bucket(d, 8) for d in (0, 7, 8, 31, 32, 500)] == ["near", "near", "mid", "mid", "far", "far"]


def test_position_scores_against_a_direct_computation():
    spec = get_spec("indextts", "tiny")
    torch.manual_seed(0)
    teacher = wand.enable_wand(spec.build().eval(), 4)
    torch.manual_seed(1)
    student = wand.enable_wand(spec.build().eval(), 4)
    row = corpus_rows(spec, 1, seed=2, min_gen=30, max_gen=30)[0]
    same = position_scores(spec, teacher, teacher, 4, row, torch.device("cpu"))
    near = same["distance"] < 4
    assert same["agree"][near].all() and np.abs(same["kl"][near]).max() < 1e-6  # W covers everything there
    got = position_scores(spec, teacher, student, 4, row, torch.device("cpu"))
    # Direct: dense logits, restricted to the target ids, KL by the definition.
    ids = torch.tensor([row["input_ids"]])
    latents = torch.tensor(row["conditioning_latents"]).reshape(1, spec.extra["num_latents"], -1)
    p = row["prefix_length"]
    with torch.no_grad():
        t = teacher(input_ids=ids, prefix_lengths=torch.tensor([p]), window=None, conditioning_latents=latents).logits
        s = student(input_ids=ids, prefix_lengths=torch.tensor([p]), window=4, conditioning_latents=latents).logits
    targets = spec.target_ids()
    for i in (0, 5, len(got["kl"]) - 1):
        pt = torch.softmax(t[0, p - 1 + i, targets], -1)
        ps = torch.softmax(s[0, p - 1 + i, targets], -1)
        assert got["kl"][i] == pytest.approx(float((pt * (pt.log() - ps.log())).sum()), rel=1e-4, abs=1e-7)
        assert got["agree"][i] == (int(pt.argmax()) == int(ps.argmax()))
    assert len(got["kl"]) == len(row["input_ids"]) - p


def test_run_evals_tables_and_measured_memory():
    spec = get_spec("cosyvoice2", "tiny")
    torch.manual_seed(0)
    teacher = spec.build()
    torch.manual_seed(1)
    student = spec.build()
    rows = corpus_rows(spec, 3, seed=5, min_gen=40, max_gen=60)
    cfg = EvalConfig(seconds=[1.0, 2.0, 4.0], windows=[4, 8, 400])
    results = {r.name: r for r in run_evals(spec, teacher, student, 8, rows, cfg)}
    assert set(results) == {"kv_memory", "decode_latency", "attention_flops", "quality", "window_chooser"}
    kv = results["kv_memory"].table
    assert kv["generated_tokens"] == [25, 50, 100]
    per_token = spec.kv_bytes_per_token(torch.float32)
    prefix = max(rows, key=lambda r: len(r["input_ids"]))["prefix_length"]
    for g, full, ours in zip(kv["generated_tokens"], kv["full_bytes"], kv["wand_bytes"]):
        assert full == per_token * (prefix + g)  # measured from the DynamicCache
        assert ours == per_token * (prefix + 8)  # measured from the WandCache: prefix + W
    curve_full = dict(results["kv_memory"].curves["kv_bytes_full"])
    assert curve_full[50] - curve_full[25] == 25 * per_token
    assert len(set(v for _, v in results["kv_memory"].curves["kv_bytes_wand"] if _ >= 8)) == 1
    assert len(results["attention_flops"].table["seconds"]) == 3
    assert results["quality"].table["bucket"] == ["near", "mid", "far"]
    assert sum(results["quality"].table["positions"]) == sum(len(r["input_ids"]) - r["prefix_length"] for r in rows)
    assert results["window_chooser"].table["window"] == [4, 8]  # 400 > every generation: left out, noted
    assert results["window_chooser"].notes
    lat = results["decode_latency"].table
    assert len(lat["bucket_start"]) == cfg.latency_buckets and all(x > 0 for x in lat["wand_p90_ms"])
    assert all(math.isfinite(v) for r in results.values() for v in r.metrics.values())


def test_the_content_eval_transcribes_what_each_model_says():
    from pipeline.evals.quality import content
    from pipeline.synthetic.law import synthetic_rows, SyntheticTask
    from pipeline.synthetic.transcribe import score, speech_codes_of

    spec = get_spec("cosyvoice2", "tiny")
    torch.manual_seed(0)
    teacher = wand.enable_wand(spec.build().eval(), None)
    student = wand.enable_wand(spec.build().eval(), 4)
    rows = synthetic_rows(spec, 2, seed=1, min_text=6, max_text=8, alignment=True)
    assert content(spec, teacher, student, 4, corpus_rows(spec, 2, seed=1), torch.device("cpu")) is None  # no text
    result = content(spec, teacher, student, 4, rows, torch.device("cpu"))
    assert result.table["model"] == ["teacher", "student"] and result.metrics["content_rows"] == 2
    # Independently for the teacher: decode each row with plain greedy argmax steps (no cache), cut at
    # the stop id, transcribe against the row's own text and speaker.
    pers = []
    for row in rows:
        ids = torch.tensor([row["input_ids"][: row["prefix_length"]]])
        reference = len(row["input_ids"]) - row["prefix_length"]
        with torch.no_grad():
            for _ in range(2 * reference):
                logits = teacher(input_ids=ids, prefix_lengths=torch.tensor([row["prefix_length"]]), window=None).logits
                ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
                if int(ids[0, -1]) in spec.stop_token_ids:
                    break
        tokens = speech_codes_of(spec, ids[0, row["prefix_length"]:].tolist())
        pers.append(score(SyntheticTask(), len(spec.target_ids()) - 3, tokens, row["text"], row["speaker"])["per"])
    assert result.metrics["per_teacher"] == pytest.approx(sum(pers) / len(pers))
    assert all(0 <= result.metrics[f"speaker_accuracy_{m}"] <= 1 for m in ("teacher", "student"))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_evals_run_as_a_ray_task_with_their_resources(ray_local, tmp_path):
    """On a cluster the evals go where evaluate.num_gpus / num_cpus say (a GPU node, not the driver's
    CPU head): here, a Ray task on the local cluster's CPUs, in another process than the driver."""
    import io
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    from helpers import corpus_rows
    from pipeline.chain import evaluate_experiment
    from pipeline.config import DistillConfig
    from wand.models import get_spec

    spec = get_spec("cosyvoice2", "tiny")
    (tmp_path / "heldout").mkdir()
    pq.write_table(pa.Table.from_pylist(corpus_rows(spec, 4, seed=9, min_gen=20, max_gen=30)),
                   tmp_path / "heldout" / "h.parquet")
    torch.manual_seed(1)
    spec.save(spec.build(), str(tmp_path / "student"))
    config = DistillConfig(experiment="ev", model="cosyvoice2", model_size="tiny", corpus=str(tmp_path / "train"),
                           shards=str(tmp_path / "topk"), storage=str(tmp_path / "ckpt"),
                           curriculum={"window_start": 8, "window_target": 4},
                           evaluate={"corpus": str(tmp_path / "heldout"), "rows": 4, "seconds": [2.0],
                                     "windows": [4, 8], "num_cpus": 1.5, "num_gpus": "auto"})
    assert config.evaluate.resolved_gpus(False, 0) == 0 and config.evaluate.resolved_gpus(True, 0) == 1
    results = evaluate_experiment(config, str(tmp_path / "student"))
    names = {r.name for r in results}
    assert {"kv_memory", "decode_latency", "quality", "window_chooser"} <= names
    hosts = {r.host for r in results}
    assert len(hosts) == 1 and not hosts.pop().endswith(f":{os.getpid()}")  # a Ray worker, not this process
    assert all(r.device.startswith("CPU") for r in results)
    for result in results:  # the figures came back whole: they can be saved (logged) here
        if result.figure is not None:
            buffer = io.BytesIO()
            result.figure.savefig(buffer, format="png")
            assert buffer.tell() > 1000


def test_the_training_corpus_is_refused_as_held_out_unless_allowed():
    from pipeline.config import DistillConfig

    base = dict(experiment="e", model="cosyvoice2", model_size="tiny", corpus="runs/corpus/x/", shards="s", storage="st")
    for evaluate in ({}, {"corpus": "runs/corpus/x"}):
        with pytest.raises(ValueError, match="evaluate.corpus: the evals would score the training corpus"):
            DistillConfig(**base, evaluate=evaluate)
    DistillConfig(**base, evaluate={"allow_training_corpus": True})
    DistillConfig(**base, evaluate={"corpus": "runs/corpus/x-heldout"})
    DistillConfig(**base, evaluate={"enabled": False})


def test_a_busy_spell_in_one_decode_does_not_tilt_the_latency_ratio():
    from pipeline.evals.memory import fastest_steps
    from wand.profiling import bucket_stats

    flat = [0.004] * 100
    busy = flat[:80] + [0.009] * 20  # another process took the CPU late in this decode
    slow_start = [0.007] * 20 + flat[20:]
    steps = fastest_steps([busy, slow_start, flat])
    assert steps == [min(a, b, c) for a, b, c in zip(busy, slow_start, flat)]
    stats = bucket_stats(steps, 10)
    assert stats[-1][1] / stats[1][1] == 1.0
    assert bucket_stats(busy, 10)[-1][1] / bucket_stats(busy, 10)[1][1] > 2  # one decode alone would miss the gate
    with pytest.raises(ValueError):
        fastest_steps([flat, flat[:50]])  # repeats of one greedy decode have one length
