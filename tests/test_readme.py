"""The README's and the docs' commands point at things that exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = "\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))


def test_quickstart_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test", "demo-generate", "test-fast", "bench", "teachers", "ablation"):
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), target
    assert "make demo" in README and "make test" in README
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_referenced_script_and_config_exists():
    paths = set(re.findall(r"\b((?:jobs|benchmarks|pipeline|wand|tests)/[\w/.-]+\.(?:py|yaml|json))", README + DOCS))
    assert len(paths) > 30, "the README and docs reference (almost) no files"
    modules = set(re.findall(r"python -m ((?:jobs|benchmarks)\.\w+)", README + DOCS))
    assert modules, "no entry point is shown as a module"
    paths |= {m.replace(".", "/") + ".py" for m in modules}
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, missing


def test_the_readme_long_form_sentence_quotes_the_rendered_long_form_table():
    """The README's long-form figures are typed, so each must appear in the results page's
    ablation-long-ft40-240 block, which tests/test_docs.py checks against its record."""
    from pipeline.docblocks import read_block

    readme = " ".join(ROOT.joinpath("README.md").read_text().split())
    sentence = readme[readme.index("**Long form, SparkTTS only**"):]
    sentence = sentence[:sentence.index("(docs/results.md))")]
    block = read_block(ROOT / "docs/results.md", "<!-- ablation-long-ft40-240:start -->",
                       "<!-- ablation-long-ft40-240:end -->")
    interval = re.search(r"[+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\]", sentence).group(0)
    assert f"| {interval} |" in block.split("Long-form claims")[1], interval
    kv = re.search(r"KV (\d[\d,]*) KiB against the teacher's (\d[\d,]*)", sentence)
    wand, teacher = (int(x.replace(",", "")) for x in kv.groups())
    assert f"{teacher} KiB -> {wand} KiB" in block, kv.group(0)
