"""The docs site builds with no broken link or missing page (mkdocs --strict), and the README stays a
one-screen front page whose links and file references all lead somewhere."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_site_builds_strict(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").exists() and (tmp_path / "site" / "faults-and-bad-input" / "index.html").exists()


def test_every_page_is_in_the_nav_and_every_nav_entry_is_a_page():
    def pages(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            for item in node:
                yield from pages(item)
        elif isinstance(node, dict):
            for value in node.values():
                yield from pages(value)

    nav = set(pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]))
    assert nav == {p.name for p in (ROOT / "docs").glob("*.md")}


def test_the_readme_is_a_front_page_whose_links_lead_somewhere():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "make demo" in readme and "make test" in readme
    links = re.findall(r"\]\(([^)#\s]+)", readme)
    assert len(links) >= 10
    for link in links:
        assert (ROOT / link).exists(), link


@pytest.mark.parametrize("saved_file, block, readme", [
    ("ablation_table.json", None, "README.md"),  # on the committed teachers
    ("ablation_table_strong.json", "ablation-strong", "README.md"),  # on the stronger ones
    ("ablation_table_strong_1200.json", "ablation-strong-1200", "docs/results.md"),  # a longer fine-tune
    ("ablation_table_strong_2400.json", "ablation-strong-2400", "docs/results.md"),  # and longer again
    ("ablation_table_gate.json", "ablation-gate", "docs/results.md"),  # on the CosyVoice 2 teacher that meets the gate
    ("ablation_table_sinusoidal.json", "ablation-sinusoidal", "docs/results.md"),  # on the sinusoidal IndexTTS teacher
    ("ablation_table_long_sparktts.json", "ablation-long", "docs/results.md")])  # long form (no headline recipe)
def test_the_results_tables_are_rendered_from_the_saved_results(saved_file, block, readme):
    """The docs' results tables and the README's headlines are what the harness renders from its own
    output file (re-render: python -m benchmarks.ablation_table --from-json <file> [--block ...]), not hand-kept."""
    import json

    from pipeline.docblocks import read_block
    from benchmarks.ablation_table import blocks, headline, markdown
    from pipeline.evals.ablation import AblationConfig

    saved = json.loads((ROOT / "benchmarks/results" / saved_file).read_text())
    table = markdown(saved["results"], AblationConfig(**saved["results"][0]["config"]), saved["device"],
                     saved.get("long_form_notes"), saved.get("teachers"))
    (docs, *full), (readme, *short) = blocks(ROOT / "docs/results.md", ROOT / readme, block)
    assert read_block(docs, *full) == table
    if headline(saved["results"]):
        assert read_block(readme, *short) == headline(saved["results"])
    else:  # no headline recipe ran: no headline block either
        assert short[0] not in (ROOT / readme).read_text()


def test_the_chooser_against_the_table_is_rendered_from_both_results_files():
    """The chooser's W beside the table's verdicts (python -m benchmarks.window_chooser --from-json ...), in
    docs/results.md and the README, derived from the saved files, not hand-kept."""
    import json

    from benchmarks.window_chooser import END, START, SWEEPS, side_by_side, table_verdicts
    from pipeline.docblocks import read_block

    chooser = json.loads((ROOT / "benchmarks/results/window_chooser.json").read_text())
    results = json.loads((ROOT / "benchmarks/results/ablation_table.json").read_text())["results"]
    table = side_by_side(chooser, table_verdicts(results))
    assert table.count("\n") >= 4  # a row per family
    assert read_block(ROOT / "docs/results.md", START, END) == table
    assert read_block(ROOT / "README.md", START, END) == table
    # On the stronger teachers, beside their own table (docs/results.md only: --block chooser-strong).
    chooser = json.loads((ROOT / "benchmarks/results/window_chooser_strong.json").read_text())
    results = json.loads((ROOT / "benchmarks/results/ablation_table_strong.json").read_text())["results"]
    assert read_block(ROOT / "docs/results.md", "<!-- chooser-strong:start -->", "<!-- chooser-strong:end -->") == \
        side_by_side(chooser, table_verdicts(results))
    # On the sinusoidal IndexTTS teacher, beside its own table (--models indextts --block chooser-sinusoidal).
    chooser_sinusoidal = json.loads((ROOT / "benchmarks/results/window_chooser_sinusoidal.json").read_text())
    results = json.loads((ROOT / "benchmarks/results/ablation_table_sinusoidal.json").read_text())["results"]
    assert list(chooser_sinusoidal) == ["indextts"]
    assert read_block(ROOT / "docs/results.md", "<!-- chooser-sinusoidal:start -->", "<!-- chooser-sinusoidal:end -->") \
        == side_by_side(chooser_sinusoidal, table_verdicts(results))
    # And beside the longer fine-tune's window sweep, the hold schedule (--schedule hold --block chooser-strong-1200).
    results = json.loads((ROOT / "benchmarks/results/ablation_table_strong_1200.json").read_text())["results"]
    assert read_block(ROOT / "docs/results.md", "<!-- chooser-strong-1200:start -->", "<!-- chooser-strong-1200:end -->") \
        == side_by_side(chooser, table_verdicts(results, SWEEPS["hold"]), "hold")


def test_the_probe_against_the_table_is_rendered_from_its_run_and_the_sweep():
    """The fine-tune probe's W beside the 1,200-step sweep (make chooser-probe), from the saved files; the
    probe's choice is the smallest W whose saved gap is within the mark, and it covers every family."""
    import json

    from benchmarks.window_chooser import probe_side_by_side, SWEEPS, table_verdicts
    from pipeline.docblocks import read_block
    from pipeline.evals.common import FAMILIES
    from pipeline.evals.window_probe import kl_gaps, MAX_KL_GAP

    chooser = json.loads((ROOT / "benchmarks/results/window_chooser_probe.json").read_text())
    assert sorted(m for m in chooser if "probe" in chooser[m]) == sorted(FAMILIES)
    for c in chooser.values():
        probe = c["probe"]
        assert probe["max_kl_gap"] == MAX_KL_GAP and probe["windows"] == sorted(probe["windows"])
        assert probe["window_target"] == next((w for w, g in zip(probe["windows"], probe["gap"]) if g <= MAX_KL_GAP), None)
    results = json.loads((ROOT / "benchmarks/results/ablation_table_strong_1200.json").read_text())["results"]
    table = probe_side_by_side(chooser, table_verdicts(results, SWEEPS["hold"]), kl_gaps(results, SWEEPS["hold"]))
    assert read_block(ROOT / "docs/results.md", "<!-- chooser-probe:start -->", "<!-- chooser-probe:end -->") == table


def test_the_teachers_table_is_rendered_from_their_records():
    """docs/results.md's teacher table is what `python -m jobs.train_teachers --table docs/results.md`
    renders from the committed teacher.json files (which test_teachers checks against the weights)."""
    from pipeline.evals.common import FAMILIES
    from pipeline.synthetic.teacher_tables import committed_block, TABLE_END, TABLE_START
    from pipeline.docblocks import read_block
    from pipeline.synthetic.teachers import read_teacher_record

    records = [read_teacher_record(ROOT / "teachers" / name) for name in FAMILIES]
    assert all(r["heldout"].get("phoneme_starts_by_position") for r in records)  # measured, not "not in this record"
    assert read_block(ROOT / "docs/results.md", TABLE_START, TABLE_END) == committed_block(records)


def test_the_continued_teachers_block_is_rendered_from_a_chain_of_records():
    """docs/results.md's teacher-long block is what `python -m jobs.train_teachers --table docs/results.md
    --continued` renders over the records' first chain (the original stronger SparkTTS teacher and its
    three continuations on longer texts; `make teachers-long` now renders the rebuilt chain's block, the
    test below): each continuation started
    from the record before it (its source's sha256), and each was scored on the long-form rows."""
    import json

    from pipeline.docblocks import read_block
    from pipeline.synthetic.teacher_tables import LONG_END, LONG_START, long_block

    names = ("teacher_longer_wider_sparktts.json", "teacher_long_sparktts.json", "teacher_long2_sparktts.json",
             "teacher_long3_sparktts.json")
    records = [json.loads((ROOT / "benchmarks/results" / name).read_text()) for name in names]
    for source, run in zip(records, records[1:]):
        assert run["train"]["init_from"]["files"] == source["files"]
    assert all(r["long_form"]["spoken_rows"] == 64 for r in records)
    assert read_block(ROOT / "docs/results.md", LONG_START, LONG_END) == long_block(records)


# Every continuation chain the results page renders (derived from the page, not listed here).
CHAINS = sorted(set(re.findall(r"--long-block teacher-continued-([\w-]+) --continued", (ROOT / "docs/results.md").read_text())))


def chain_records(name: str) -> list[dict]:
    """The records the results page's command for chain ``name`` renders, in its order."""
    import json

    page = (ROOT / "docs/results.md").read_text()
    command = re.search(rf"--long-block teacher-continued-{name} --continued\s+(.*?)`", page, re.S).group(1)
    return [json.loads((ROOT / path).read_text()) for path in command.split()]


def test_the_results_page_renders_every_continuation_record_in_a_chain():
    """Every continuation record in benchmarks/results is in a chain the results page renders (a family
    may have more than one: IndexTTS from its random-init and from its sinusoidal-init teacher)."""
    import json

    continued = [json.loads(path.read_text()) for path in (ROOT / "benchmarks/results").glob("teacher_continued*.json")]
    rendered = [r for name in CHAINS for r in chain_records(name)]
    assert continued and all(r in rendered for r in continued)


@pytest.mark.parametrize("name", CHAINS)
def test_a_continuation_chain_and_its_projection_are_rendered_from_the_records(name):
    """docs/results.md's teacher-continued-<name> block is what the command the page names renders
    over the records it names, in that order: a committed teacher of one family (benchmarks/teachers/<set>)
    and its continuations, each from a run listed before it (its source's sha256), and under them the
    projection (pipeline/synthetic/teacher_projection.py) of where more of the recipe leads."""
    import json

    from pipeline.docblocks import read_block
    from pipeline.synthetic.teacher_tables import long_block, long_markers

    records = chain_records(name)
    (family,) = {r["model"] for r in records}
    assert len(records) >= 3 and name.split("-")[0] == family
    committed = [json.loads(p.read_text()) for p in (ROOT / "benchmarks/teachers").glob(f"*/{family}/teacher.json")]
    assert records[0] in committed
    for n, run in enumerate(records[1:], 1):  # a continuation of a run listed before it (a branch may be)
        assert run["train"]["init_from"]["files"] in [r["files"] for r in records[:n]]
    block = read_block(ROOT / "docs/results.md", *long_markers(f"teacher-continued-{name}"))
    assert block == long_block(records) and "- projection of PER over runs 1, 2, 3" in block


def test_the_rebuilt_long_form_teacher_block_is_rendered_from_the_committed_start_and_its_record():
    """docs/results.md's teacher-long-rebuilt block is what `make teachers-long` renders: the committed
    stronger SparkTTS teacher (make's STRONG) and its continuation, whose record names that very start
    (its sha256s) and was scored on the 64 long-form rows; the committed long-form teacher (make's
    LONG_TEACHER, the one `make ablation-long` starts from) is that continuation."""
    import json
    import re

    from pipeline.docblocks import read_block
    from pipeline.synthetic.teacher_tables import long_block, long_markers

    make = (ROOT / "Makefile").read_text()
    strong = re.search(r"^STRONG \?= (\S+)", make, re.M).group(1)
    committed = re.search(r"^LONG_TEACHER \?= (\S+)", make, re.M).group(1)
    record_path = re.search(r"--recipe (\S+) --init-from \$\(STRONG\)", make).group(1)
    start = json.loads((ROOT / strong / "sparktts" / "teacher.json").read_text())
    record = json.loads((ROOT / record_path).read_text())
    assert record["train"]["init_from"]["files"] == start["files"]
    assert record["long_form"]["spoken_rows"] == 64 and record["long_form"]["per"] <= 0.05
    assert json.loads((ROOT / committed / "sparktts" / "teacher.json").read_text()) == record
    assert read_block(ROOT / "docs/results.md", *long_markers("teacher-long-rebuilt")) == long_block([start, record])


def test_the_longer_teacher_block_is_rendered_from_the_records():
    """docs/results.md's "what longer training bought" block is what `python -m jobs.train_teachers
    --table docs/results.md --longer benchmarks/results/teacher_longer_*.json` renders: the committed
    teacher's record beside the longer runs', never figures typed by hand."""
    import json

    from pipeline.synthetic.teacher_tables import LONGER_END, LONGER_START, longer_block
    from pipeline.docblocks import read_block
    from pipeline.synthetic.teachers import read_teacher_record

    pairs = []
    for path in sorted((ROOT / "benchmarks/results").glob("teacher_longer_*.json")):
        longer = json.loads(path.read_text())
        committed = read_teacher_record(ROOT / "teachers" / longer["model"])
        assert longer["train"]["steps"] > committed["train"]["steps"]  # what the block is about
        assert path.name.endswith(f"_{longer['model']}.json")
        pairs.append((committed, longer))
    assert pairs, "no benchmarks/results/teacher_longer_*.json"
    assert read_block(ROOT / "docs/results.md", LONGER_START, LONGER_END) == longer_block(pairs)


def test_the_wider_teacher_block_is_rendered_from_the_records():
    """docs/results.md's "what capacity bought" block is what `python -m jobs.train_teachers --table
    docs/results.md --wider benchmarks/results/teacher_wider_*.json` renders: each committed teacher
    beside the same recipe on a wider, deeper backbone (the recipe otherwise the same)."""
    import json

    from pipeline.synthetic.teacher_tables import WIDER_END, WIDER_START, wider_block
    from pipeline.synthetic.teachers import MINI_BACKBONE
    from pipeline.docblocks import read_block
    from pipeline.synthetic.teachers import read_teacher_record

    pairs = []
    for path in sorted((ROOT / "benchmarks/results").glob("teacher_wider_*.json")):
        wider = json.loads(path.read_text())
        committed = read_teacher_record(ROOT / "teachers" / wider["model"])
        assert path.name == f"teacher_wider_{wider['model']}.json"
        assert wider["backbone"] != MINI_BACKBONE and wider["parameters"] > committed["parameters"]
        assert wider["train"]["phases"] == committed["train"]["phases"]  # only the backbone differs
        assert wider["train"]["rows_per_phase"] == committed["train"]["rows_per_phase"]
        pairs.append((committed, wider))
    assert pairs, "no benchmarks/results/teacher_wider_*.json"
    assert read_block(ROOT / "docs/results.md", WIDER_START, WIDER_END) == wider_block(pairs)


def test_the_curriculum_teacher_block_is_rendered_from_the_records():
    """docs/results.md's length-curriculum experiment block is what `python -m jobs.train_teachers --table
    docs/results.md --curriculum benchmarks/results/teacher_curriculum_*.json` renders: each committed
    teacher beside the same backbone and steps on other phases (only the curriculum differs)."""
    import json

    from pipeline.synthetic.teacher_tables import CURRICULUM_END, CURRICULUM_START, curriculum_block
    from pipeline.synthetic.teachers import MINI_BACKBONE
    from pipeline.docblocks import read_block
    from pipeline.synthetic.teachers import read_teacher_record

    pairs = []
    for path in sorted((ROOT / "benchmarks/results").glob("teacher_curriculum_*.json")):
        record = json.loads(path.read_text())
        committed = read_teacher_record(ROOT / "teachers" / record["model"])
        assert path.name == f"teacher_curriculum_{record['model']}.json"
        assert (record.get("backbone") or MINI_BACKBONE) == (committed.get("backbone") or MINI_BACKBONE)
        assert record["train"]["steps"] == committed["train"]["steps"]
        assert record["train"]["phases"] != committed["train"]["phases"]  # what the block is about
        pairs.append((committed, record))
    assert pairs, "no benchmarks/results/teacher_curriculum_*.json"
    assert read_block(ROOT / "docs/results.md", CURRICULUM_START, CURRICULUM_END) == curriculum_block(pairs)


def test_the_positions_teacher_block_is_rendered_from_the_records():
    """docs/results.md's position-init block is what `python -m jobs.train_teachers --table docs/results.md
    --positions <records>` renders, the records in pairs: each random-init run, found among
    benchmarks/results/teacher_*.json by its recipe (the flags ``--recipe`` would replay), then the run of
    the same recipe with sinusoidal positions (benchmarks/results/teacher_sinusoidal*_<family>.json)."""
    import json

    from jobs.train_teachers import recipe_of
    from pipeline.docblocks import read_block
    from pipeline.synthetic.teacher_tables import position_init, POSITIONS_END, POSITIONS_START, positions_block

    results = ROOT / "benchmarks/results"
    records = {path: json.loads(path.read_text()) for path in sorted(results.glob("teacher_*.json"))}
    recipes = {path: recipe_of(r) for path, r in records.items() if "train" in r and "init_from" not in r["train"]}
    ordered = []
    for path in sorted(results.glob("teacher_sinusoidal*_*.json")):
        record = records[path]
        assert position_init(record) == "sinusoidal" and path.name.endswith(f"_{record['model']}.json")
        same = [other for other, recipe in recipes.items()
                if recipe == {**recipes[path], "position_init": "random"}]
        assert len(same) == 1, (path.name, [p.name for p in same])  # exactly one run differs only in the init
        ordered += [records[same[0]], record]
    assert ordered, "no benchmarks/results/teacher_sinusoidal*_<family>.json"
    assert read_block(ROOT / "docs/results.md", POSITIONS_START, POSITIONS_END) == positions_block(ordered)


def test_the_testing_page_counts_the_tests_that_exist():
    """docs/testing.md's "N tests: M pass and the K `cuda` tests skip": N and K as pytest collects them,
    M the rest (CI runs every test; only the cuda ones skip without a GPU)."""
    def collected(*marker):
        out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                              *marker, "tests"], capture_output=True, text=True, timeout=300, cwd=ROOT)
        return len([line for line in out.stdout.splitlines() if "::" in line])

    said = re.search(r"\((\d+) tests: (\d+) pass and the (\d+) `cuda` tests skip",
                     (ROOT / "docs" / "testing.md").read_text())
    assert said, "docs/testing.md no longer states the suite's count"
    total, cuda = collected(), collected("-m", "cuda")
    assert total > 500 and tuple(map(int, said.groups())) == (total, total - cuda, cuda)
