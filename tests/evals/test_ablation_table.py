"""The results table's harness (benchmarks/ablation_table.py): files run apart merged as one table,
window-sweep variants by name."""

import pytest

from benchmarks.ablation_table import merged, seeds_text, variant_order, wand_variants
from pipeline.evals.ablation import VARIANTS, variant_named, wand_at
from pipeline.evals.common import FAMILIES


def result(model, variant, seed=None, window=32):
    return {"model": model, "variant": variant, "seed": seed, "window": window}


def saved(minutes, *results):
    return {"device": "cpu", "minutes": minutes, "teachers": {}, "results": list(results)}


def test_variants_by_name_include_wand_at_any_window():
    assert variant_named("control") is next(v for v in VARIANTS if v.name == "control")
    w64 = variant_named("wand_w64")
    assert (w64.name, w64.window, w64.window_start, w64.train, w64.attends, w64.kd_weight) == (
        "wand_w64", 64, 256, True, "prefix", 1.0)
    listed = variant_named("wand_w8")  # the stress row keeps its own entry, the same schedule as wand_at(8)
    assert (listed.window, listed.window_start) == (wand_at(8).window, wand_at(8).window_start)
    held, hold = variant_named("wand_hold_w64"), variant_named("wand_hold")  # the sweep with wand_hold's schedule
    assert (held.name, held.window, held.window_start, held.hold, held.train) == ("wand_hold_w64", 64, 256, hold.hold, True)
    assert hold.hold > 0 and w64.hold == 0
    assert variant_order("wand_hold_w8") > variant_order("wand_w128") > variant_order("wand_w64")
    for bad in ("wand_w", "wand_w0", "wand_wx", "wand_hold_w", "wand_hold_w0", "nope"):
        with pytest.raises(ValueError, match="unknown variant"):
            variant_named(bad)


def test_files_of_one_family_run_apart_merge_in_table_order():
    first = saved({"sparktts": 3.0, "cosyvoice2": 10.0}, result("sparktts", "teacher"),
                  result("cosyvoice2", "teacher"), result("cosyvoice2", "wand", 0), result("cosyvoice2", "wand", 1))
    later = saved({"cosyvoice2": 5.5}, result("cosyvoice2", "wand_w64", 0, 64), result("cosyvoice2", "sinks", 0),
                  result("cosyvoice2", "wand_w8", 0, 8))
    out = merged([later, first])
    assert [(r["model"], r["variant"], r["seed"]) for r in out["results"]] == [
        ("cosyvoice2", "teacher", None), ("cosyvoice2", "wand", 0), ("cosyvoice2", "wand", 1),
        ("cosyvoice2", "sinks", 0), ("cosyvoice2", "wand_w8", 0), ("cosyvoice2", "wand_w64", 0),
        ("sparktts", "teacher", None)]
    assert out["minutes"] == {"cosyvoice2": 15.5, "sparktts": 3.0}
    assert wand_variants(out["results"]) == ["wand", "wand_w8", "wand_w64"]
    assert variant_order("wand_w128") > variant_order("wand_w64") > variant_order("wand_w8")


def test_the_header_names_the_students_with_fewer_seeds():
    runs = [result("cosyvoice2", "teacher"), result("cosyvoice2", "wand", 0), result("cosyvoice2", "wand", 1),
            result("cosyvoice2", "wand", 2), result("sparktts", "wand_hold_w64", 2, 64)]
    assert seeds_text(runs) == "each trained student with 3 seed(s) (0, 1, 2), fewer where named (sparktts wand_hold_w64: 1)"
    assert seeds_text(runs[:4]) == "each trained student with 3 seed(s) (0, 1, 2)"


def test_a_run_in_two_files_is_refused():
    with pytest.raises(SystemExit, match="more than once"):
        merged([saved({"cosyvoice2": 1.0}, result("cosyvoice2", "wand", 0)),
                saved({"cosyvoice2": 1.0}, result("cosyvoice2", "wand", 0))])


def claimed(model, variant, window, per, seeds=(0, 1), stopped=1.0, rows=8):
    """Results of one variant whose every row has PER ``per`` (a list: one per row)."""
    return [{"model": model, "variant": variant, "seed": seed, "window": window, "per": sum(per) / rows,
             "substitutions": 0.0, "deletions": 0.0, "insertions": 0.0, "speaker_accuracy_tokens": 1.0,
             "stopped": stopped, "length_ratio_median": 1.0,
             "per_row": [{"id": f"r{i}", "per": p} for i, p in enumerate(per)]} for seed in seeds]


def test_the_chooser_is_judged_by_the_smallest_w_whose_student_passes():
    from benchmarks.window_chooser import SWEEPS, side_by_side, smallest_passing, table_verdicts

    base = [0.1 * (i % 3) for i in range(8)]
    results = (claimed("cosyvoice2", "teacher", None, base, seeds=(None,)) + claimed("cosyvoice2", "control", None, base)
               + claimed("cosyvoice2", "wand_w8", 8, [p + 0.5 for p in base])  # clearly worse: fails
               + claimed("cosyvoice2", "wand", 32, base, stopped=0.9)  # same PER, but stops too rarely
               + claimed("cosyvoice2", "wand_w64", 64, base)  # passes
               + claimed("cosyvoice2", "wand_w128", 128, base))
    verdicts = table_verdicts(results)
    assert verdicts["cosyvoice2"] == {
        8: {"passed": False, "missed": ["control_gap_per"], "passed_but_teacher": False},
        32: {"passed": False, "missed": ["stops"], "passed_but_teacher": False},
        64: {"passed": True, "missed": [], "passed_but_teacher": True},
        128: {"passed": True, "missed": [], "passed_but_teacher": True}}
    assert smallest_passing(verdicts["cosyvoice2"]) == 64
    chooser = {"cosyvoice2": {"windows": [8, 32, 64, 128], "mask_agreement": [0.7, 0.8, 0.95, 0.99],
                              "window_target": 64, "kv_saving_at_target": 0.5}}
    row = side_by_side(chooser, verdicts).splitlines()[-1]
    assert row.startswith("| CosyVoice 2 | 64, 50% | 0.700 / 0.800 / 0.950 / 0.990 | fail (control_gap_per) / "
                          "fail (stops) / pass / pass | 64 | yes |")
    chooser["cosyvoice2"]["window_target"] = 32
    assert side_by_side(chooser, verdicts).endswith("| no (chooser 32, table 64) |")
    none_pass = {"cosyvoice2": {w: {"passed": False, "missed": ["speaker"], "passed_but_teacher": False}
                                for w in (8, 32, 64, 128)}}
    chooser["cosyvoice2"]["window_target"] = 256
    assert side_by_side(chooser, none_pass).endswith("| none up to 128 | yes: none up to 128 passes, the chooser asks for more |")
    # A check the teacher misses too does not count against its students.
    slow_teacher = results[:1] + [dict(r, stopped=0.9) for r in results[1:]]
    slow_teacher[0] = dict(slow_teacher[0], stopped=0.9)
    verdicts = table_verdicts(slow_teacher)
    assert verdicts["cosyvoice2"][32] == {"passed": False, "missed": ["stops"], "passed_but_teacher": True}
    assert smallest_passing(verdicts["cosyvoice2"]) == 32
    assert "pass* (stops: teacher too)" in side_by_side(chooser, verdicts)
    # The hold schedule's sweep is judged on its own students only.
    held = [dict(r, variant="wand_hold" if r["variant"] == "wand" else r["variant"].replace("wand_w", "wand_hold_w"))
            for r in results if r["variant"].startswith("wand")]
    assert table_verdicts(results[:3] + held, SWEEPS["hold"]) == table_verdicts(results)
    assert table_verdicts(results[:3] + held) == {}
    assert "WAND student (hold schedule) at W" in side_by_side(chooser, verdicts, "hold")


def test_make_ablation_and_its_sweep_run_every_variant_and_the_sweep_the_chooser_reads():
    import os
    import re
    import subprocess
    from pathlib import Path

    from benchmarks.window_chooser import SWEEP

    root = Path(__file__).resolve().parents[2]
    makefile = (root / "Makefile").read_text()
    table = re.search(r"^ABLATION_VARIANTS \?= (.+)$", makefile, re.M).group(1).split()
    sweep = re.search(r"^SWEEP_VARIANTS \?= (.+)$", makefile, re.M).group(1).split()
    assert not set(table) & set(sweep)  # a (variant, seed) in both parts would be refused when they are merged
    assert {v.name for v in VARIANTS} | set(SWEEP) <= set(table) | set(sweep)
    assert all(variant_named(name).name == name for name in table + sweep)
    # What make would run (-n): each part trains its own variants; the sweep renders both parts, then the chooser.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}  # not a sub-make's
    dry = {target: subprocess.run(["make", "-n", "-s", "--no-print-directory", target], cwd=root, env=env,
                                  capture_output=True, text=True, check=True).stdout
           for target in ("ablation", "ablation-sweep")}
    assert f"--variants {' '.join(table)} --output runs/ablation/" in dry["ablation"]
    assert f"--variants {' '.join(sweep)} --output runs/ablation-sweep/" in dry["ablation-sweep"]
    parts = [f"runs/{part}/{m}.json" for part in ("ablation", "ablation-sweep") for m in FAMILIES]
    assert f"--from-json {' '.join(parts)}" in dry["ablation-sweep"]
    assert dry["ablation-sweep"].rstrip().splitlines()[-1].split()[1:3] == ["-m", "benchmarks.window_chooser"]


def test_make_ablation_gate_trains_each_seed_in_its_own_process_and_the_teacher_once(tmp_path):
    """`make ablation-gate` run for real with PY=echo (each process's command line lands in its log):
    one process per seed with the control and both WAND schedules, the teacher in the first seed's
    process only (a (model, variant, seed) twice would be refused by the merge), all from GATE_TEACHER,
    then one render of the seeds' files into the results page's ablation-gate blocks."""
    import os
    import re
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    makefile = (root / "Makefile").read_text()
    seeds = re.search(r"^STRONG_SEEDS \?= (.+)$", makefile, re.M).group(1).split()
    teacher = re.search(r"^GATE_TEACHER \?= (\S+)$", makefile, re.M).group(1)
    assert (root / teacher / "cosyvoice2" / "teacher.json").is_file()
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    out = subprocess.run(["make", "-s", "--no-print-directory", "-o", "install", "ablation-gate", "PY=echo",
                          f"GATE_RUNS={tmp_path}"], cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for n, seed in enumerate(seeds):
        line = (tmp_path / f"seed{seed}.log").read_text().split()
        variants = line[line.index("--variants") + 1:line.index("--steps")]
        assert variants == (["teacher"] if n == 0 else []) + ["control", "wand", "wand_hold"]
        assert all(variant_named(v).name == v for v in variants)
        assert line[line.index("--seeds") + 1] == seed and line[line.index("--teachers") + 1] == teacher
    render = out.stdout.split()
    assert render[render.index("--from-json") + 1:render.index("--output")] == [f"{tmp_path}/seed{s}.json" for s in seeds]
    assert render[render.index("--block") + 1] == "ablation-gate"


def test_length_groups_are_checked_before_a_run_and_named_in_the_table_header():
    import subprocess
    import sys

    from benchmarks.ablation_table import markdown
    from pipeline.evals.ablation import AblationConfig

    for bad in (0, 9):  # at least one part, at most one row per part
        with pytest.raises(ValueError, match="length_groups must be in"):
            AblationConfig(batch_size=8, length_groups=bad)
    out = subprocess.run([sys.executable, "-m", "benchmarks.ablation_table", "--length-groups", "0", "--no-readme"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "length_groups" in out.stderr
    import json
    from pathlib import Path

    rows = json.loads((Path(__file__).resolve().parents[2] / "benchmarks/results/ablation_table.json").read_text())["results"]
    header = lambda groups: markdown(rows, AblationConfig(length_groups=groups), "cpu").splitlines()[0]  # noqa: E731
    assert "2 parts of neighbouring lengths" in header(2) and "parts" not in header(1)
    from benchmarks.ablation_table import teachers_text
    from pipeline.synthetic.teachers import MINI_BACKBONE

    assert teachers_text({"cosyvoice2": {"size": "mini"}, "sparktts": {"size": "mini", "backbone": MINI_BACKBONE}}) == ""
    wide = {"width": 128, "layers": 4, "heads": 4}
    assert teachers_text({"indextts": {"size": "mini", "backbone": wide}}) == \
        "Teachers of another backbone: IndexTTS 1.5 128 wide x 4 layers. "


def test_a_second_table_goes_into_its_own_block_and_a_missing_block_is_refused_before_a_run(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from pipeline.docblocks import read_block

    saved = Path(__file__).resolve().parents[2] / "benchmarks/results/ablation_table.json"
    docs, readme = tmp_path / "results.md", tmp_path / "README.md"
    docs.write_text("# results\n<!-- ablation-table:start -->\nmain\n<!-- ablation-table:end -->\n")
    readme.write_text("<!-- headline-table:start -->\nheadline\n<!-- headline-table:end -->\n")
    run = lambda *args: subprocess.run([sys.executable, "-m", "benchmarks.ablation_table", "--docs", str(docs),  # noqa: E731
                                        "--readme", str(readme), *args], capture_output=True, text=True, timeout=300)
    out = run("--block", "ablation-strong", "--models", "sparktts", "--teachers", str(tmp_path / "none"))
    assert out.returncode == 2 and "no <!-- ablation-strong:start --> ... <!-- ablation-strong:end --> block" in out.stderr
    docs.write_text(docs.read_text() + "<!-- ablation-strong:start -->\n<!-- ablation-strong:end -->\n")
    out = run("--block", "ablation-strong", "--from-json", str(saved))
    assert out.returncode == 2 and "no <!-- ablation-strong-headline:start -->" in out.stderr  # the README's too
    readme.write_text(readme.read_text() + "<!-- ablation-strong-headline:start -->\n<!-- ablation-strong-headline:end -->\n")
    out = run("--block", "ablation-strong", "--from-json", str(saved))
    assert out.returncode == 0, out.stderr
    table = read_block(docs, "<!-- ablation-strong:start -->", "<!-- ablation-strong:end -->")
    assert table.startswith("Measured on") and "| sparktts | wand |" in table and "**Claims**" in table
    short = read_block(readme, "<!-- ablation-strong-headline:start -->", "<!-- ablation-strong-headline:end -->")
    assert short.startswith("| family | WAND recipe |") and "| SparkTTS (W = 32) | paper's schedule |" in short
    assert read_block(docs, "<!-- ablation-table:start -->", "<!-- ablation-table:end -->") == "main"
    assert read_block(readme, "<!-- headline-table:start -->", "<!-- headline-table:end -->") == "headline"
    assert json.loads(saved.read_text())["results"]  # the committed file is only read
    # A table without a headline recipe (control and a window-sweep student only) needs no headline block.
    long_saved = saved.with_name("ablation_table_long_sparktts.json")
    docs.write_text(docs.read_text() + "<!-- ablation-long:start -->\n<!-- ablation-long:end -->\n")
    out = run("--block", "ablation-long", "--from-json", str(long_saved))
    assert out.returncode == 0, out.stderr
    assert "| sparktts | wand_hold_w128 |" in read_block(docs, "<!-- ablation-long:start -->", "<!-- ablation-long:end -->")
    assert "ablation-long-headline" not in readme.read_text()


def test_the_chooser_beside_a_second_table_goes_into_its_own_block(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from pipeline.docblocks import read_block

    root = Path(__file__).resolve().parents[2]
    docs, readme = tmp_path / "results.md", tmp_path / "README.md"
    docs.write_text("<!-- chooser-table:start -->\nmain\n<!-- chooser-table:end -->\n")
    readme.write_text("<!-- chooser-table:start -->\nmain\n<!-- chooser-table:end -->\n")
    run = lambda: subprocess.run([sys.executable, "-m", "benchmarks.window_chooser", "--docs", str(docs),  # noqa: E731
                                  "--readme", str(readme), "--block", "chooser-strong", "--from-json",
                                  str(root / "benchmarks/results/window_chooser.json")],
                                 capture_output=True, text=True, timeout=300)
    out = run()
    assert out.returncode == 2 and "no <!-- chooser-strong:start -->" in out.stderr
    docs.write_text(docs.read_text() + "<!-- chooser-strong:start -->\n<!-- chooser-strong:end -->\n")
    out = run()
    assert out.returncode == 0, out.stderr
    assert read_block(docs, "<!-- chooser-strong:start -->", "<!-- chooser-strong:end -->").startswith("| family | chooser")
    assert read_block(docs, "<!-- chooser-table:start -->", "<!-- chooser-table:end -->") == "main"
    assert readme.read_text() == "<!-- chooser-table:start -->\nmain\n<!-- chooser-table:end -->\n"
    # --models: a teachers folder holding one family (the sinusoidal IndexTTS teacher's); the others are not read.
    one = lambda *models: subprocess.run([  # noqa: E731
        sys.executable, "-m", "benchmarks.window_chooser", "--no-readme", *models, "--rows", "8",
        "--teachers", str(root / "benchmarks/teachers/sinusoidal-continued3"),
        "--table", str(root / "benchmarks/results/ablation_table_sinusoidal.json"),
        "--output", str(tmp_path / "chooser.json")], capture_output=True, text=True, timeout=300)
    out = one()  # every family asked of a one-family folder: refused up front, naming the way out
    assert out.returncode == 2 and "no teacher.json for cosyvoice2, sparktts" in out.stderr and "--models" in out.stderr
    assert not (tmp_path / "chooser.json").exists()
    out = one("--models", "indextts")
    assert out.returncode == 0, out.stderr
    import json

    assert list(json.loads((tmp_path / "chooser.json").read_text())) == ["indextts"]
    assert "| IndexTTS 1.5 |" in out.stdout and "CosyVoice 2" not in out.stdout


def test_a_fine_tune_on_longer_texts_is_checked_trained_on_named_and_kept_apart():
    """--finetune-text: the students' rows of those lengths, the headers say so (the long-form one then
    says its rows lie within them), and students of another recipe are not merged into one table."""
    import json
    import subprocess
    import sys
    from dataclasses import asdict
    from pathlib import Path

    from benchmarks.ablation_table import markdown
    from pipeline.evals.ablation import AblationConfig, finetune_rows
    from pipeline.evals.long_form import long_form_markdown
    from pipeline.synthetic.law import SyntheticTask, TEXT_LENGTHS
    from wand.models import get_spec

    assert AblationConfig(finetune_text=[40, 240]).finetune_text == (40, 240)  # as read back from JSON
    for bad in ((0, 10), (50, 40), (40,)):
        with pytest.raises(ValueError, match="finetune_text"):
            AblationConfig(finetune_text=bad)
    out = subprocess.run([sys.executable, "-m", "benchmarks.ablation_table", "--finetune-text", "50", "40",
                          "--no-readme"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "finetune_text" in out.stderr

    spec, task = get_spec("sparktts", "mini"), SyntheticTask()
    generated = lambda config: [len(r["input_ids"]) - r["prefix_length"]  # noqa: E731  (grows with the text)
                                for r in finetune_rows(spec, 32, task, config, seed=2)]
    longer = AblationConfig(finetune_text=(2 * TEXT_LENGTHS[1], 3 * TEXT_LENGTHS[1]))
    assert min(generated(longer)) > max(generated(AblationConfig()))  # longer than any of the corpus's lengths

    root = Path(__file__).resolve().parents[2]
    results = json.loads((root / "benchmarks/results/ablation_table_long_sparktts.json").read_text())["results"]
    assert "on texts of" not in markdown(results, AblationConfig(), "cpu")
    assert "on texts of 40-240 phonemes" in markdown(results, AblationConfig(finetune_text=(40, 240)), "cpu")
    assert "1.5-2.0x the longest fine-tuning text" in "\n".join(long_form_markdown(results))
    within = [{**r, "config": {**r["config"], "finetune_text": [40, 240]}} for r in results]
    text = "\n".join(long_form_markdown(within))
    assert "within the lengths the students were fine-tuned on, 40-240" in text and "longest fine-tuning" not in text
    partly = [{**r, "config": {**r["config"], "finetune_text": [40, 200]}} for r in results]
    assert "partly past the lengths the students were fine-tuned on, 40-200" in "\n".join(long_form_markdown(partly))

    from benchmarks.ablation_table import merged

    other = [{**r, "seed": None if r["seed"] is None else r["seed"] + 10} for r in within]
    with pytest.raises(SystemExit, match=r"different settings \(finetune_text\)"):
        merged([saved({"sparktts": 1.0}, *results), saved({"sparktts": 1.0}, *other)])
    assert asdict(longer)["finetune_text"] == longer.finetune_text  # what the journal and the results record


def test_two_length_groups_change_the_committed_table_only_by_rounding_as_the_results_page_says():
    """The table's part run again with two length groups (benchmarks/results/ablation_table_lg2.json)
    against the committed record: how many trained students score row for row the same, the largest
    change of a student's PER and WAND's verdicts, derived here and checked against docs/results.md."""
    import json
    import re
    from pathlib import Path

    from pipeline.evals.claims import claims, interval

    root = Path(__file__).resolve().parents[2]
    old, new = (json.loads((root / "benchmarks/results" / name).read_text())["results"]
                for name in ("ablation_table.json", "ablation_table_lg2.json"))
    assert {r["config"].get("length_groups", 1) for r in old} == {1} and {r["config"]["length_groups"] for r in new} == {2}
    committed = {(r["model"], r["variant"], r["seed"]): r for r in old}
    trained = [(r, committed[r["model"], r["variant"], r["seed"]]) for r in new if r["seed"] is not None]
    same = sum(r["per_row"] == c["per_row"] for r, c in trained)
    largest = max(abs(r["per"] - c["per"]) for r, c in trained)
    untrained = [(r, committed[r["model"], r["variant"], None]) for r in new if r["seed"] is None]
    assert untrained and all(r["per_row"] == c["per_row"] for r, c in untrained)  # nothing trained: to the bit
    text = " ".join((root / "docs/results.md").read_text().split())
    assert f"**{same} of the {len(trained)} trained students score row for row as the committed ones**" in text
    assert f"the other {len(trained) - same} differ by at most {largest:.3f} in a student's PER" in text
    before, after = claims(old), claims(new)
    assert before.keys() == after.keys() == set(FAMILIES)
    for model in FAMILIES:
        assert after[model]["checks"] == before[model]["checks"]
    stated = re.search(r"CosyVoice 2's WAND - control (\S+ \[\S+ \S+\]) against \[(\S+ \S+\]); SparkTTS's "
                       r"(\S+ \[\S+ \S+\]) against (\S+ \[\S+ \S+\])", text).groups()
    assert stated == (interval(after["cosyvoice2"]["minus_control"]), interval(before["cosyvoice2"]["minus_control"])
                      .split("[")[1], interval(after["sparktts"]["minus_control"]),
                      interval(before["sparktts"]["minus_control"]))
