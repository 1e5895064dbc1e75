"""The benchmark scripts run (small shapes on CPU) and write what the docs' tables are read from."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wand.models import get_spec

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_serving_benchmark_runs_on_cpu_and_reports_every_point(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.serving", "--device", "cpu",
                          "--models", "cosyvoice2,llasa-3b", "--seconds", "10,60", "--batches", "1,2,3", "--steps", "3",
                          "--fuse", "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=540)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "serving_cpu.json").read_text())
    assert (tmp_path / "serving_cpu.png").stat().st_size > 1000
    for name in ("cosyvoice2", "llasa-3b"):
        rows = result["models"][name]["rows"]
        # --fuse: Q/K/V and gate/up fused in every layer of the preset (2 groups per layer), and its
        # norms (2 per layer and the final one).
        layers = get_spec(name, "tiny").config["num_hidden_layers"]
        assert (result["models"][name]["fused_groups"], result["models"][name]["fused_norms"]) == (2 * layers,
                                                                                                   2 * layers + 1)
        assert [(r["seconds"], r["batch"]) for r in rows] == [(s, b) for s in (10, 60) for b in (1, 2, 3)]
        # One compiled baseline step per model: batch 3 reuses batch 2's dynamic graph at each length.
        points = len(rows)
        assert 0 < result["models"][name]["full_graphs_compiled"] < 2 * points  # (2 graphs per compile)
        assert all(r["full_launches"]["aten_ops"] >= 0 and r["wand_launches"]["aten_ops"] >= 0 for r in rows)
        assert all(r["full_ms"] > 0 and r["wand_ms"] > 0 for r in rows)
        # WAND's measured KV per stream is the same at 10 and 60 s; full attention's grows.
        assert len({r["wand_kv_per_stream"] for r in rows}) == 1
        assert rows[3]["full_kv_per_stream"] > rows[0]["full_kv_per_stream"] > rows[0]["wand_kv_per_stream"]
    assert result["wand"] == "StaticDecoder (compile)"
    for name, data in result["models"].items():  # the floor: the model's weight bytes at the measured bandwidth
        assert data["floor_ms"] == pytest.approx(1e3 * data["weight_read_bytes"] / (result["copy_bandwidth_gb_s"] * 1e9),
                                                 rel=1e-12)
        assert all(r[f"{side}_over_floor"] == r[f"{side}_ms"] / data["floor_ms"] for r in data["rows"]
                   for side in ("full", "wand"))
    # A CUDA graph on the CPU is refused before anything runs.
    for flag, mode in (("--wand-mode", "graph"), ("--wand-mode", "compile-graph"), ("--full-mode", "graph")):
        bad = subprocess.run([sys.executable, "-m", "benchmarks.serving", "--device", "cpu", flag, mode,
                              "--out-dir", str(tmp_path / "bad")], capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and f"{flag} {mode} captures a CUDA graph" in bad.stderr, bad.stderr
        assert not (tmp_path / "bad").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_length_groups_benchmark_times_both_settings_and_the_students_agree(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.length_groups", "--models", "indextts", "--steps", "2",
                          "--repeats", "1", "--output", str(tmp_path / "groups.json"), "--no-docs"],
                         capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr[-3000:]
    (result,) = json.loads((tmp_path / "groups.json").read_text())["results"]
    for key in ("student_seconds_per_step", "teacher_loop_seconds_per_step"):
        assert set(result[key]) == {"1", "2"} and all(v > 0 for v in result[key].values())
    assert result["student_speedup"] == round(result["student_seconds_per_step"]["1"]
                                              / result["student_seconds_per_step"]["2"], 2)
    assert result["student_weights_max_abs_difference"] < 1e-3  # the same training, up to rounding
    for args, said in ((["--steps", "0"], "--steps"), (["--docs", str(tmp_path / "none.md")], "needs the markers")):
        bad = subprocess.run([sys.executable, "-m", "benchmarks.length_groups", *args, "--output",
                              str(tmp_path / "bad.json")], capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and said in bad.stderr and not (tmp_path / "bad.json").exists(), bad.stderr


def test_block_mask_benchmark_checks_the_masks_agree_and_records_every_length(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.block_mask", "--device", "cpu", "--lengths", "256,640",
                          "--tokens", "1280", "--repeats", "1", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "block_mask_cpu.json").read_text())["rows"]
    assert [(r["length"], r["batch"]) for r in rows] == [(256, 5), (640, 2)]
    assert all(r["dense_ms"] > 0 and r["tiles_ms"] > 0 and r["cached_ms"] > 0 for r in rows)
    bad = subprocess.run([sys.executable, "-m", "benchmarks.block_mask", "--lengths", "200", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "multiples of 128" in bad.stderr


def test_gpu_check_names_every_cuda_test_file_and_benchmark():
    script = (ROOT / "benchmarks/gpu_check.sh").read_text()
    cuda_files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                        if p.name != Path(__file__).name and "pytest.mark.cuda" in p.read_text())
    assert cuda_files == ["tests/method/test_cuda.py"] and "-m cuda tests/method/test_cuda.py" in script
    for bench in ("decode_latency", "train_step", "block_mask", "deepspeed_step", "serving"):
        assert f"-m benchmarks.{bench} " in script and "--device cuda" in script


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_train_step_benchmark_times_the_step_and_the_attention_op_on_cpu(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--device", "cpu", "--lengths", "256,512", "--tokens", "512",
           "--repeats", "1", "--out-dir", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((tmp_path / "train_step_cpu.json").read_text())
    assert [(r["length"], r["batch"]) for r in record["rows"]] == [(256, 2), (512, 1)]
    for r in record["rows"]:
        for kind in ("", "_soft"):
            assert r[f"op_wand{kind}_s"] > 0 and r[f"op{kind}_ratio"] == r[f"op_wand{kind}_s"] / r["op_full_s"]
        assert r["op_full_s"] < r["full_s"]  # one layer's attention, not the step
    from benchmarks.train_step import table

    assert table(record) in out.stdout
    for bad, said in ((["--gqa", "tiled"], "invalid choice"), ([], "WAND_FLEX_GQA")):
        env = {**os.environ, "WAND_FLEX_GQA": "tiled"} if not bad else None
        refused = subprocess.run(cmd + bad, capture_output=True, text=True, timeout=120, env=env)
        assert refused.returncode == 2 and said in refused.stderr, refused.stderr[-2000:]
    assert json.loads((tmp_path / "train_step_cpu.json").read_text()) == record  # nothing written by a refusal


def test_the_recorded_attention_call_is_the_one_the_model_makes():
    """The op timed alone is the model's own first attention call: replayed on the recorded tensors
    and mask it gives what the layer handed its output projection (full; hard and soft WAND, dense
    mask and FlexAttention's BlockMask with its score_mod)."""
    import copy

    from transformers import Qwen2Config, Qwen2ForCausalLM

    import wand
    from benchmarks.train_step import VOCAB, recorded_attention

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    cases = [(Qwen2ForCausalLM(config).eval(), None, None)]
    for backend in ("sdpa", "flex"):  # (the CPU has no Flex backward: its forward is recorded without grad)
        # Its own config: enable_wand sets the attention on the config, which a shared one would
        # switch for the full-attention model too.
        wand_model = wand.enable_wand(Qwen2ForCausalLM(copy.deepcopy(config)).eval(), 8, backend=backend)
        cases += [(wand_model, 8, None), (wand_model, 8, 2.0)]
    for model, window, tau in cases:
        seen = []
        hook = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        flex = model.config._attn_implementation == "wand_flex"
        try:
            with torch.set_grad_enabled(not flex):
                function, module, query, key, value, mask, kwargs = recorded_attention(
                    model, 2, 48, window, 10, torch.device("cpu"), tau)
        finally:
            hook.remove()
        assert (type(mask).__name__ == "BlockMask") == flex
        assert query.requires_grad and query.shape == (2, 4, 48, 16) and key.shape == (2, 2, 48, 16)
        with torch.no_grad():
            replay = function(module, query, key, value, mask, **kwargs)[0]
        torch.testing.assert_close(replay.reshape(2, 48, -1), seen[0].detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["cosyvoice2", "llasa-3b", "orpheus-3b"])
def test_the_baseline_step_that_full_mode_graph_captures_reads_nothing_back(name):
    """`serving.py --full-mode graph` captures the baseline's eager step as a CUDA graph: that step
    must not read a device value back (a capture would fail, a replay would skip it). Checked on the
    CPU by dispatch, the wrappers' one-token id checks on the device as on CUDA, over a few steps."""
    from transformers import StaticCache

    from benchmarks.serving import full_step, prompt_ids
    from wand.generation import cache_kwarg_name
    from wand.models import get_spec
    from wand.models.spec import device_side_id_checks
    from wand.profiling import host_reads

    spec = get_spec(name, "tiny")
    torch.manual_seed(0)
    model = spec.build().eval()
    model.set_attn_implementation("sdpa")
    cache = StaticCache(config=model.config, max_cache_len=40)
    ids = prompt_ids(spec, 2, 20, torch.device("cpu"))
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{cache_kwarg_name(model): cache})
    step, token = full_step(model, None), ids[:, -1]
    with device_side_id_checks():
        for position in range(20, 24):
            assert host_reads(step, token, torch.full((2, 1), position), cache) == {}


def gpu_check_stages() -> list[tuple[int, str, list[str]]]:
    """(time limit, benchmark module, its arguments) of every benchmark stage of gpu_check.sh, read
    from the script (continuation lines joined, ``${VAR:-default}`` read as its default)."""
    import re
    import shlex

    script = (ROOT / "benchmarks/gpu_check.sh").read_text().replace("\\\n", " ")
    script = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", script)
    stages = []
    for line in script.splitlines():
        if line.startswith("timeout ") and " -m benchmarks." in line:
            words = shlex.split(line.split("||")[0])
            module = words[words.index("-m") + 1]
            stages.append((int(words[1]), module, words[words.index("-m") + 2:]))
    return stages


def test_every_gpu_check_stage_passes_its_benchmark_arguments_parsing(monkeypatch):
    """A device call is scarce: each stage's command line must parse with its benchmark's own parser
    (a renamed flag would cost the whole call), and the stages with the test stage fit the 8 minutes."""
    import argparse
    import importlib
    import re

    class Parsed(Exception):
        pass

    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    stages = gpu_check_stages()
    assert [m for _, m, _ in stages] == [f"benchmarks.{b}" for b in
                                         ("decode_latency", "train_step", "block_mask", "deepspeed_step", "serving")]
    for _, module, args in stages:
        monkeypatch.setattr(sys, "argv", [module, *args])
        with pytest.raises(Parsed) as parsed:
            importlib.import_module(module).main()
        assert parsed.value.args[0].device == "cuda", module
    script = (ROOT / "benchmarks/gpu_check.sh").read_text()
    limits = [int(kill or 0) + int(n) for kill, n in
              re.findall(r"^timeout (?:--signal=\w+ )?(?:--kill-after=(\d+) )?(\d+) ", script, re.M)]
    assert len(limits) == len(stages) + 1 and sum(limits) <= 8 * 60, limits


def test_the_readme_counts_the_cuda_tests_that_exist():
    import re

    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "cuda",
                          str(ROOT / "tests/method/test_cuda.py")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    collected = len([line for line in out.stdout.splitlines() if "::" in line])
    said = {int(n) for n in re.findall(r"(\d+) (?:tests\)|`cuda` tests|tests marked\s+`cuda`)",
                                       "\n".join(p.read_text() for p in (ROOT / "docs").glob("*.md")))}
    assert collected > 20 and said == {collected}, (collected, said)


def test_the_train_step_table_in_the_docs_is_rendered_from_its_results_file():
    from benchmarks.train_step import table

    record = json.loads((ROOT / "benchmarks/results/train_step_cpu.json").read_text())
    assert record["device"].startswith("CPU") and len(record["rows"]) == 3
    for r in record["rows"]:  # the ratios are the file's own times divided
        assert r["ratio"] == r["wand_s"] / r["full_s"] and r["op_ratio"] == r["op_wand_s"] / r["op_full_s"]
    assert table(record) in (ROOT / "docs/benchmarks.md").read_text()


def test_the_corpus_scale_table_in_the_docs_is_rendered_from_its_results_file():
    """docs/benchmarks.md shows benchmarks/results/corpus_scale.json as the script renders it, and
    the file's derived figures agree with its measured ones."""
    from benchmarks.corpus_scale import summarize, table

    summary = json.loads((ROOT / "benchmarks/results/corpus_scale.json").read_text())
    big = json.loads((ROOT / "benchmarks/results/corpus_scale_3m.json").read_text())
    docs = (ROOT / "docs/benchmarks.md").read_text()
    assert table(summary) in docs and table(big) in docs
    assert [r["records"] for r in summary["sizes"]] == [100_000, 300_000, 1_000_000]
    assert [r["records"] for r in big["sizes"]] == [3_000_000]
    for saved in (summary, big):  # the goals and growth are the script's reading of the sizes
        assert saved == summarize(saved["sizes"]) | {"device": saved["device"]}
    for r in summary["sizes"] + big["sizes"]:
        for step in ("build", "baseline", "check", "sample"):
            assert abs(r[step]["records_per_s"] - r["records"] / r[step]["seconds"]) < 0.1
        assert abs(r["build_vs_baseline"] - r["build"]["records_per_s"] / r["baseline"]["records_per_s"]) < 1e-3
    first, last = summary["sizes"][0], summary["sizes"][-1]
    assert summary["peak_growth"]["build"] == round(last["build"]["peak_mb"] / first["build"]["peak_mb"], 3)


def test_the_length_groups_table_in_the_docs_is_rendered_from_its_results_file():
    from benchmarks.length_groups import END, START, table
    from pipeline.docblocks import read_block

    saved = json.loads((ROOT / "benchmarks/results/length_groups.json").read_text())
    assert {r["model"] for r in saved["results"]} == {"cosyvoice2", "indextts", "sparktts"}
    assert read_block(ROOT / "docs/benchmarks.md", START, END) == table(saved)


def test_teacher_slips_benchmark_counts_every_phoneme_start_and_checks_its_inputs_first(tmp_path):
    """As a user runs it (a subprocess, clean environment): the kinds of one committed teacher add up
    to its phoneme starts (the stop excluded), recomputed here; a folder without teacher.json and a
    document without markers are refused (exit 2, naming them) before anything is measured."""
    import numpy as np

    from pipeline.synthetic.law import phoneme_starts, synthetic_rows, SyntheticTask
    from pipeline.synthetic.teachers import read_teacher_record, record_spec

    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    out = tmp_path / "slips.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks.teacher_slips", "teachers/sparktts", "--rows", "4",
                          "--output", str(out), "--no-docs"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (result,) = json.loads(out.read_text())["results"]
    record = read_teacher_record(ROOT / "teachers" / "sparktts")
    rows = synthetic_rows(record_spec(record), 4, SyntheticTask(**record["task"]), seed=record["heldout"]["seed"],
                          split="heldout", alignment=True)
    assert sum(result["all"].values()) == sum(int(np.sum(phoneme_starts(r)[:-1])) for r in rows)
    assert result["teacher"] == "teachers/sparktts" and result["files"] == record["files"]
    for args, said in ((["teachers"], "teacher folder teachers: "),
                       (["teachers/sparktts", "--docs", str(tmp_path / "none.md")], "needs the markers")):
        bad = subprocess.run([sys.executable, "-m", "benchmarks.teacher_slips", *args, "--output", str(tmp_path / "bad.json")],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and said in bad.stderr and not (tmp_path / "bad.json").exists(), bad.stderr


def test_the_teacher_slips_tables_in_the_docs_are_rendered_from_their_results_files():
    """The main table (the committed teachers among others) and the position-init experiment's own."""
    from benchmarks.teacher_slips import markers, table
    from pipeline.docblocks import read_block

    saved = json.loads((ROOT / "benchmarks/results/teacher_slips.json").read_text())
    assert {r["teacher"] for r in saved["results"]} >= {f"teachers/{m}" for m in ("cosyvoice2", "indextts", "sparktts")}
    assert read_block(ROOT / "docs/results.md", *markers()) == table(saved)
    sinusoidal = json.loads((ROOT / "benchmarks/results/teacher_slips_sinusoidal.json").read_text())
    assert all(r["label"].endswith(", sinusoidal positions") for r in sinusoidal["results"])
    assert read_block(ROOT / "docs/results.md", *markers("teacher-slips-sinusoidal")) == table(sinusoidal)


def test_the_block_mask_figures_in_the_docs_are_the_committed_record():
    record = json.loads((ROOT / "benchmarks/results/block_mask_cpu.json").read_text())
    text = " ".join((ROOT / "docs/benchmarks.md").read_text().split())
    for row in record["rows"]:
        said = (f"T = {row['length']:,} (batch {row['batch']}) dense {row['dense_ms']:,.0f} ms, tiles "
                f"{row['tiles_ms']:.1f} ms, cached {row['cached_ms']:.3f} ms")
        assert said in text, said


def test_the_full_attention_baseline_step_leaves_its_inputs_alone_and_decodes_as_the_model_does():
    """The baseline's step writes only the StaticCache (static addresses): a position mutated inside
    it made torch's CUDA-graph trees skip the graph. Its greedy tokens equal the model's own decode
    with a DynamicCache, and the profiler record counts the host operators it dispatched."""
    import functools

    import torch
    from transformers import DynamicCache, StaticCache

    from benchmarks.serving import full_step, prompt_ids
    from wand.models import get_spec
    from wand.profiling import launches_per_step

    spec = get_spec("cosyvoice2", "tiny")
    torch.manual_seed(0)
    model = spec.build().eval()
    model.set_attn_implementation("sdpa")
    with torch.no_grad():  # peaked attention, so positions (RoPE) change the logits visibly
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(8)
    ids = prompt_ids(spec, 2, 12, torch.device("cpu"))
    static, dynamic = StaticCache(config=model.config, max_cache_len=24), DynamicCache()
    ours = []
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, cache=static).logits[:, -1]
        expected = model(input_ids=ids, use_cache=True, cache=dynamic).logits[:, -1]
        step, position = functools.partial(full_step(model, None), cache=static), torch.full((2, 1), 12)
        for _ in range(6):
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
            token = out.argmax(-1)
            ours.append(token)
            before = (token.clone(), position.clone())
            out = step(token, position)
            assert torch.equal(token, before[0]) and torch.equal(position, before[1])
            position = position + 1
            expected = model(input_ids=token.view(-1, 1), use_cache=True, cache=dynamic).logits[:, -1]
        assert len({tuple(t.tolist()) for t in ours}) > 1  # the decode moves: not one token repeated
        counts = launches_per_step(step, token, position, device=torch.device("cpu"))
    assert counts["aten_ops"] > 4 * model.config.num_hidden_layers  # eager: every layer's operators


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-5), ("bfloat16", 1e-2)])
def test_deepspeed_zero2_steps_equal_the_plain_steps_on_one_process(tmp_path, dtype, tolerance):
    """The worker's DeepSpeed configuration (ZeRO-2, torch AdamW) on one process without Ray, as gpu-check
    runs it on a GPU: each step's loss against plain torch steps, recomputed here from the record."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.deepspeed_step", "--device", "cpu", "--dtype", dtype,
                          "--steps", "3", "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=360)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    record = json.loads((tmp_path / "deepspeed_step_cpu.json").read_text())
    plain, ds = record["plain_losses"], record["deepspeed_losses"]
    assert record["zero_stage"] == 2 and record["dtype"] == dtype and len(plain) == len(ds) == 3
    assert all(abs(a - b) <= tolerance * abs(a) for a, b in zip(plain, ds))
    assert plain[-1] < plain[0]  # the steps train


def test_the_deepspeed_check_refuses_a_single_step():
    bad = subprocess.run([sys.executable, "-m", "benchmarks.deepspeed_step", "--steps", "1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--steps" in bad.stderr
