"""wand/ is the method: importable and usable without ray or mlflow (dependencies point one way)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wand_never_imports_ray_or_mlflow():
    offenders = []
    for path in (ROOT / "wand").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("ray", "mlflow", "pipeline")]
    assert not offenders, offenders


def test_wand_imports_with_ray_and_mlflow_blocked():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('ray', 'mlflow'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import wand, wand.masks, wand.cache, wand.patch, wand.generation, wand.profiling\n"
        "print('ok', sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok []"


CODE = ("wand", "pipeline", "jobs", "benchmarks")


def imports_of(path: Path) -> set[str]:
    """The modules ``path`` imports (absolute names; relative imports resolved against its package)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_pipeline_modules_import_no_circle():
    """Module-level and function-level imports alike: no module of ours reaches itself again."""
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for folder in ("wand", "pipeline") for p in (ROOT / folder).rglob("*.py")}
    graph = {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}
    circles = []

    def visit(node: str, trail: list[str]) -> None:
        for nxt in graph[node]:
            if nxt in trail:
                circles.append(trail[trail.index(nxt):] + [nxt])
            elif len(trail) < 30:
                visit(nxt, trail + [nxt])

    for name in graph:
        visit(name, [name])
    assert not circles, sorted({" -> ".join(c) for c in circles})[:5]


def test_no_code_file_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for folder in CODE for p in (ROOT / folder).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_entry_points_run_as_modules_and_never_import_each_other():
    for folder in ("jobs", "benchmarks"):
        for path in (ROOT / folder).glob("*.py"):
            text = path.read_text()
            assert "sys.path.insert" not in text and "sys.path.append" not in text, path.name
            assert not {m for m in imports_of(path) if m.split(".")[0] in ("jobs", "benchmarks")}, path.name
    for path in (ROOT / "pipeline").rglob("*.py"):  # and the layers below never import them
        assert not {m for m in imports_of(path) if m.split(".")[0] in ("jobs", "benchmarks", "tests")}, path.name
