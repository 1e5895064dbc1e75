"""The window chooser's fine-tune probe (pipeline/evals/window_probe.py) against brute force: each
probe's far KL recomputed from hand-built masks on a student trained with the schedule the probe
names, its choice from those figures, and its mark against the results table it was set on."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipeline.evals.ablation import AblationConfig, teacher_targets, train_student, variant_named, wand_at
from pipeline.evals.window_probe import kl_gaps, MAX_KL_GAP, probe_windows
from pipeline.synthetic.law import synthetic_rows
from test_ablation import brute_force_logits, setup  # the harness's tiny teacher and rows (W = 4)

ROOT = Path(__file__).resolve().parents[2]
CONFIG = AblationConfig(window=4, window_start=16, steps=3, batch_size=2, lr=1e-2)


def brute_force_far_kl(spec, teacher, student, rows, window, far):
    """Mean KL(teacher || student) over the target ids at generated positions >= ``far`` from the
    prefix: the teacher with full attention, the student with a hand-built prefix + W mask (None: full)."""
    targets = spec.target_ids()
    kls = []
    for row in rows:
        full, prefix = brute_force_logits(spec, teacher, row, row["prefix_length"], None)
        masked, _ = brute_force_logits(spec, student, row, row["prefix_length"], window)
        log_t = torch.log_softmax(full[prefix - 1 : -1][:, targets].float(), -1)
        log_s = torch.log_softmax(masked[prefix - 1 : -1][:, targets].float(), -1)
        for d in range(far, len(log_t)):
            kls.append(float((log_t[d].exp() * (log_t[d] - log_s[d])).sum()))
    return sum(kls) / len(kls), len(kls)


@pytest.mark.parametrize("name", ["cosyvoice2", "indextts"])
def test_each_probe_is_the_far_kl_of_a_student_trained_with_its_own_schedule(name):
    spec, teacher, rows, held = setup(name)
    choice = probe_windows(spec, teacher, rows, held, [8, 2, 8], CONFIG, steps=3)
    assert choice.control.window is None and [p.window for p in choice.probes] == [2, 8]  # sorted, once each
    shard = teacher_targets(spec, teacher, rows, CONFIG.k)
    config = replace(CONFIG, steps=3)
    far = 4 * CONFIG.window  # where every candidate W cuts
    expected = [(choice.control, variant_named("control"), None)]
    expected += [(p, wand_at(p.window, hold=True), p.window) for p in choice.probes]
    for probe, variant, window in expected:
        student = train_student(spec, teacher, shard, variant, config)
        kl, positions = brute_force_far_kl(spec, teacher, student, held, window, far)
        assert probe.positions == positions > 0
        assert probe.kl_far == pytest.approx(kl, rel=1e-4, abs=1e-7), (variant.name, probe.kl_far, kl)
    assert len({p.kl_far for p in choice.probes} | {choice.control.kl_far}) == 3  # three different students
    gaps = {p.window: p.kl_far - choice.control.kl_far for p in choice.probes}
    assert choice.window_target == next((w for w, g in sorted(gaps.items()) if g <= MAX_KL_GAP), None)
    saved = choice.to_json()
    assert saved["gap"] == [gaps[2], gaps[8]] and saved["window_target"] == choice.window_target
    if choice.window_target is None:
        assert "no W tried" in saved["notes"][0]
    for probe in choice.probes:  # the median held-out row's saving, by hand
        savings = sorted(1 - (r["prefix_length"] + min(probe.window, len(r["input_ids"]) - r["prefix_length"]))
                         / len(r["input_ids"]) for r in held)
        assert probe.kv_saving == pytest.approx((savings[0] + savings[1]) / 2)  # two rows: the median is their mean


def test_the_probe_refuses_held_out_rows_too_short_to_have_far_positions():
    spec, teacher, rows, _ = setup("sparktts")
    short = synthetic_rows(spec, 2, seed=1, min_text=1, max_text=1, split="heldout")
    config = replace(CONFIG, window=64, window_start=64)
    with pytest.raises(ValueError, match="no held-out row has a generated position 256 tokens from its prefix"):
        probe_windows(spec, teacher, rows, short, [2], config, steps=1)
    with pytest.raises(ValueError, match="windows must be a non-empty list"):
        probe_windows(spec, teacher, rows, short, [], config, steps=1)


def test_the_mark_separates_the_passing_and_failing_windows_of_the_table_it_was_set_on():
    """The module says MAX_KL_GAP lies between the far-KL gaps of the passing and the failing WAND students
    of the 1,200-step window sweep: recomputed here from the record's rows by a plain loop, and the
    verdicts from the claims."""
    from benchmarks.window_chooser import SWEEPS, table_verdicts

    results = json.loads((ROOT / "benchmarks/results/ablation_table_strong_1200.json").read_text())["results"]
    sums: dict = {}
    for row in results:
        if row["variant"] == "control" or row["variant"] in SWEEPS["hold"]:
            key = (row["model"], row["window"])  # the control's window is None
            total, n = sums.get(key, (0.0, 0))
            sums[key] = (total + row["kl_far"], n + 1)
    gaps = kl_gaps(results, SWEEPS["hold"])
    for model, by_w in gaps.items():
        control = sums[(model, None)][0] / sums[(model, None)][1]
        for w, gap in by_w.items():
            assert gap == pytest.approx(sums[(model, w)][0] / sums[(model, w)][1] - control, abs=1e-12)
    verdicts = table_verdicts(results, SWEEPS["hold"])
    passed = [gaps[m][w] for m in verdicts for w, v in verdicts[m].items() if v["passed_but_teacher"]]
    failed = [gaps[m][w] for m in verdicts for w, v in verdicts[m].items() if not v["passed_but_teacher"]]
    assert len(passed) == 3 and len(failed) == 5  # one passing W per family, the sweep's other rows fail
    assert max(passed) < MAX_KL_GAP < min(failed), (passed, failed)


def test_a_chosen_window_that_saves_nothing_says_so(monkeypatch):
    import pipeline.evals.window_probe as window_probe

    spec, teacher, rows, held = setup("sparktts")
    longest = max(len(r["input_ids"]) - r["prefix_length"] for r in held)
    monkeypatch.setattr(window_probe, "MAX_KL_GAP", float("inf"))  # any W passes: the smallest is chosen
    choice = probe_windows(spec, teacher, rows, held, [longest + 1], CONFIG, steps=1)
    assert choice.window_target == longest + 1 and choice.probes[0].kv_saving == 0.0
    assert choice.notes == [f"W = {longest + 1} saves only 0% of the KV cache at the median held-out row: "
                            "on utterances this short, full attention costs about as much"]


def test_a_probe_run_is_never_rendered_into_the_bare_mask_blocks(tmp_path, capsys):
    """`--probe` or a probe run's JSON without `--block` is refused before anything is written."""
    from benchmarks.window_chooser import main

    docs, readme = tmp_path / "results.md", tmp_path / "README.md"
    docs.write_text((ROOT / "docs/results.md").read_text())
    readme.write_text((ROOT / "README.md").read_text())
    saved = ["--table", str(ROOT / "benchmarks/results/ablation_table_strong_1200.json"), "--schedule", "hold",
             "--docs", str(docs), "--readme", str(readme)]
    for args in (["--from-json", str(ROOT / "benchmarks/results/window_chooser_probe.json")], ["--probe"]):
        with pytest.raises(SystemExit) as exit_:
            main([*args, *saved])
        assert exit_.value.code == 2 and "give --block or --no-readme" in capsys.readouterr().err
    assert docs.read_text() == (ROOT / "docs/results.md").read_text()
    assert readme.read_text() == (ROOT / "README.md").read_text()
    main(["--from-json", str(ROOT / "benchmarks/results/window_chooser_probe.json"), *saved, "--block", "chooser-probe"])
    assert docs.read_text() == (ROOT / "docs/results.md").read_text()  # rendered again: the committed block


def test_the_probe_trains_with_the_recipe_of_the_table_it_is_set_against():
    """benchmarks.window_chooser's PROBE_CONFIG (kept by hand) equals the config every student of the
    1,200-step sweep was trained with, but for the steps (the probe's are fewer) and the seed."""
    from dataclasses import asdict

    from benchmarks.window_chooser import PROBE_CONFIG

    results = json.loads((ROOT / "benchmarks/results/ablation_table_strong_1200.json").read_text())["results"]
    probe = {k: v for k, v in asdict(PROBE_CONFIG).items() if k not in ("steps", "seed")}
    for row in results:
        table = {k: v for k, v in row["config"].items() if k not in ("steps", "seed")}
        table.setdefault("finetune_text", list(PROBE_CONFIG.finetune_text))  # recorded later than this run
        assert {**probe, "finetune_text": list(probe["finetune_text"])} == table, (row["variant"], table)
