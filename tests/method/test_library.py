"""`wand` on its own: the docs' plain PyTorch training step runs with only torch and transformers
(the pipeline's packages made unimportable), and really trains; the package's core dependencies
are just those."""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IMPORT_NAMES = {"pyyaml": "yaml"}  # distribution name -> module name, where they differ


def pipeline_only() -> tuple[str, ...]:
    """The modules of the [pipeline] extra (read from pyproject.toml) that transformers does not need
    itself (it requires pyyaml), plus the pipeline package: what `wand` must run without."""
    import tomllib
    from importlib.metadata import requires

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["pipeline"]
    names = {re.split(r"[<>=\[ ]", d)[0].lower() for d in extra}
    needed_by_transformers = {re.split(r"[<>=\[ ;]", r)[0].lower() for r in requires("transformers") or []
                              if "extra ==" not in r}
    return tuple(sorted(IMPORT_NAMES.get(n, n) for n in names - needed_by_transformers)) + ("pipeline",)


PIPELINE_ONLY = pipeline_only()

RUNNER = """
import sys
BLOCKED = set({blocked!r})

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
        return None

sys.meta_path.insert(0, Blocker())
import torch
torch.manual_seed(0)
namespace = {{}}
exec(compile({code!r}, "docs/wand-api.md", "exec"), namespace)
student, teacher, ids, prefix, positions = (namespace[k] for k in ("student", "teacher", "ids", "prefix", "positions"))
import wand

def ce(model):
    with torch.no_grad():
        hidden = model(input_ids=ids, prefix_lengths=prefix, window=8, output_hidden_states=True).hidden_states[-1]
        logits = model.lm_head(hidden[:, positions])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, positions + 1].flatten()).item()

before = ce(wand.enable_wand(teacher, 8))
after = ce(student)
print(f"CE at W=8: teacher weights {{before:.4f}}, trained student {{after:.4f}}")
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print("pipeline modules loaded:", loaded)
assert after < before - 0.1 and not loaded
print("OK")
"""


def docs_example() -> str:
    text = (ROOT / "docs" / "wand-api.md").read_text()
    block = re.search(r"<!-- plain-pytorch:start -->\s*```python\n(.*?)```\s*<!-- plain-pytorch:end -->", text, re.S)
    assert block, "docs/wand-api.md lost its plain PyTorch example"
    return block.group(1)


def test_the_docs_training_step_runs_with_torch_and_transformers_alone():
    code = textwrap.dedent(docs_example())
    script = RUNNER.format(blocked=PIPELINE_ONLY, code=code)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "OK" in out.stdout and "pipeline modules loaded: []" in out.stdout
    assert {"ray", "deepspeed", "mlflow", "s3fs"} <= set(PIPELINE_ONLY)  # the blocker saw the extra


def test_the_core_package_depends_on_torch_and_transformers_only():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {re.split(r"[<>=\[ ]", d)[0] for d in project["dependencies"]}
    assert core == {"torch", "transformers", "safetensors"}
    extra = {re.split(r"[<>=\[ ]", d)[0] for d in project["optional-dependencies"]["pipeline"]}
    assert {"ray", "deepspeed", "mlflow", "s3fs"} <= extra
    assert ".[pipeline,test,docs]" in (ROOT / "Makefile").read_text()


LAZY_NAMES = """
import importlib, inspect, sys
import wand, wand.models

report = {}
for package in (wand, wand.models):
    for name in package.__all__:
        value = getattr(package, name)  # AttributeError fails the test, naming the name
        home = getattr(value, "__module__", None)
        report[f"{package.__name__}.{name}"] = home
        assert name in dir(package), name
for package, name in ((wand, "no_such_name"), (wand.models, "NoSuchModel")):
    try:
        getattr(package, name)
    except AttributeError:
        pass
    else:
        raise SystemExit(f"{package.__name__}.{name} resolved")
# The old homes of the family modules hand out the very classes; `wand.generate` stays the function
# once the module that defines it is imported.
from wand.models.cosyvoice2 import CosyVoice2LM
from wand.models.indextts import IndexTTSGPT
assert CosyVoice2LM is wand.models.CosyVoice2LM and IndexTTSGPT is wand.models.IndexTTSGPT
importlib.import_module("wand.generation")
assert inspect.isfunction(wand.generate), wand.generate
print(report)
"""


def test_every_public_name_of_wand_and_wand_models_resolves_where_it_is_defined():
    """`wand`'s and `wand.models`' names load on first use (their `_HOME` / `_MODULES` tables): each
    name in `__all__` resolves, to an object defined in the module the table names (functions and
    classes), in a fresh interpreter; an unknown name is an AttributeError."""
    import ast

    import wand
    import wand.models

    run = subprocess.run([sys.executable, "-c", LAZY_NAMES], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    homes = ast.literal_eval(run.stdout.strip().splitlines()[-1])
    assert set(homes) == {f"wand.{n}" for n in wand.__all__} | {f"wand.models.{n}" for n in wand.models.__all__}
    for name, module in wand._HOME.items():
        assert homes[f"wand.{name}"] == f"wand.{module}", name
    for name, module in wand.models._MODULES.items():
        assert homes[f"wand.models.{name}"] == f"wand.models.{module}", name
    assert set(wand._HOME) == set(wand.__all__)  # no public name without a home, no home unlisted
