"""The layout holds (docs/ARCHITECTURE.md): who may import whom, how big a file or function may grow, that every
package is installed, and that tests use the public API only.

Each rule is a function over a file set (relative path -> source) or one file's source; the real test applies it
to the repository and a second test applies it to a small tree that breaks it, so no rule can pass by seeing
nothing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "finemed_cli"
# Bottom to top. A package imports only packages on a lower floor: never one on its own floor or above, so the
# order is acyclic by construction. `__init__` is finemed_cli/__init__.py (the version), `errors`, `paths`,
# … the top-level modules.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("__init__", "errors", "paths", "runtime", "console"),  # import nothing of finemed's
    ("backends", "hub", "gguf"),  # llama-cpp-python detected, hub ids resolved, GGUF read
    ("data",),
    ("manifest", "plots", "modeling", "parallel"),
    ("checkpoints",),
    ("config", "envinfo"),
    ("export", "retrieval"),  # the stages start here
    ("generate", "ttt", "train"),
    ("eval", "synth"),
    ("pipeline",),  # chains stages
    ("serve",),  # front ends
    ("cli",),
    ("__main__",),
)
STAGES = {"retrieval", "ttt", "generate", "eval", "synth", "export", "train", "pipeline", "serve", "cli"}
BASE = {p for floor in LAYERS for p in floor} - STAGES - {"__main__"}
CHAINING = {"pipeline", "serve", "cli", "__main__"}  # may use any number of stages
# A stage package uses at most one other stage; these use exactly the stages listed, for the reason given.
STAGE_EXCEPTIONS: dict[str, tuple[set[str], str]] = {
    "synth": ({"generate", "retrieval"}, "the LLM it asks (generate) and the embedder behind the report's map of "
                                         "questions (retrieval.embed)"),
}
MAX_FILE_LINES = 350
MAX_FUNCTION_LINES = 60
# State that travels through a loop travels in one object (STYLE.md rule 12). click commands are exempt: their
# options arrive as arguments by design.
MAX_PARAMETERS = 8
LONG_ON_PURPOSE: dict[str, str] = {}  # "path:function" -> the reason it stays long
# Private attributes of other libraries' objects that tests read on purpose: name -> why.
THIRD_PARTY_PRIVATE = {"_attn_implementation": "transformers' PretrainedConfig field: which attention kernel runs"}

Sources = dict[str, str]  # path relative to the library root ("data/jsonl.py") -> its text
Graph = dict[str, dict[str, set[str]]]  # package -> package it imports -> the files that do


def read_tree(root: Path) -> Sources:
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*.py"))}


def package_of(rel: str) -> str:
    parts = rel.split("/")
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


def _module_parts(rel: str) -> list[str]:
    parts = ["finemed_cli", *rel.removesuffix(".py").split("/")]
    return parts[:-1] if parts[-1] == "__init__" else parts


def _absolute(rel: str, module: str | None, level: int) -> str:
    """The absolute name of `from <level dots><module> import …` written in the file `rel`."""
    if not level:
        return module or ""
    here = _module_parts(rel)
    package = here if rel.endswith("__init__.py") else here[:-1]
    base = package[:len(package) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _import_module_name(rel: str, node: ast.Call) -> str | None:
    """The literal module named by `importlib.import_module(...)` or `__import__(...)`, made absolute."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    if name not in ("import_module", "__import__") or not node.args:
        return None
    arg = node.args[0]
    if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
        return None
    if not arg.value.startswith("."):
        return arg.value
    package = next((k.value.value for k in node.keywords if k.arg == "package" and isinstance(k.value, ast.Constant)),
                   None)
    if not isinstance(package, str):
        return None
    level = len(arg.value) - len(arg.value.lstrip("."))
    parts = package.split(".")
    return ".".join([*parts[:len(parts) - (level - 1)], *([arg.value[level:]] if arg.value[level:] else [])])


def imported_modules(rel: str, source: str) -> set[str]:
    """Every finemed_cli module the file imports: absolute, relative, inside functions, or through a literal
    `importlib.import_module`."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            module = _absolute(rel, node.module, node.level)
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.Call) and (name := _import_module_name(rel, node)):
            found.add(name)
    return {m for m in found if m.startswith("finemed_cli.")}


def package_graph(sources: Sources) -> Graph:
    packages = {package_of(rel) for rel in sources}
    graph: Graph = {p: {} for p in packages}
    for rel, source in sources.items():
        here = package_of(rel)
        for module in imported_modules(rel, source):
            parts = module.split(".")
            target = parts[1] if len(parts) > 1 and parts[1] in packages else "__init__"
            if target != here:
                graph[here].setdefault(target, set()).add(rel)
    return graph


def _floor(package: str) -> int | None:
    return next((i for i, floor in enumerate(LAYERS) if package in floor), None)


def layer_violations(graph: Graph) -> list[str]:
    """Packages with no floor, and every import of a package on the same floor or above."""
    bad = [f"{p} is on no floor of LAYERS" for p in sorted(graph) if _floor(p) is None]
    for p, targets in sorted(graph.items()):
        for t, files in sorted(targets.items()):
            here, there = _floor(p), _floor(t)
            if here is not None and there is not None and there >= here:
                bad.append(f"{p} (floor {here}) imports {t} (floor {there}): {sorted(files)}")
    return bad


def base_imports_of_stages(graph: Graph) -> list[str]:
    return [f"{p} imports the stage {t}: {sorted(files)}" for p, targets in sorted(graph.items()) if p in BASE
            for t, files in sorted(targets.items()) if t in STAGES]


def import_cycles(graph: Graph) -> list[str]:
    """Each set of packages that reach each other through imports (Tarjan's strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(p: str) -> None:
        index[p] = low[p] = len(index)
        stack.append(p)
        for t in graph.get(p, {}):
            if t not in index:
                visit(t)
                low[p] = min(low[p], low[t])
            elif t in stack:
                low[p] = min(low[p], index[t])
        if low[p] == index[p]:
            members = []
            while (t := stack.pop()) != p:
                members.append(t)
            if members:
                cycles.append(" <-> ".join(sorted([p, *members])))

    for p in sorted(graph):
        if p not in index:
            visit(p)
    return cycles


def stage_chaining(graph: Graph) -> list[str]:
    """Stage packages that use more than one other stage (the union over their files), beyond STAGE_EXCEPTIONS."""
    bad = []
    for p, targets in sorted(graph.items()):
        if p not in STAGES or p in CHAINING:
            continue
        used = set(targets) & STAGES
        allowed = STAGE_EXCEPTIONS[p][0] if p in STAGE_EXCEPTIONS else None
        if (allowed is None and len(used) > 1) or (allowed is not None and not used <= allowed):
            bad.append(f"{p} uses the stages {sorted(used)}: " + "; ".join(
                f"{t} in {sorted(targets[t])}" for t in sorted(used)))
    return bad


def long_files(sources: Sources) -> list[str]:
    return [f"{rel} ({n} lines)" for rel, s in sources.items() if (n := s.count("\n")) > MAX_FILE_LINES]


def long_functions(sources: Sources) -> list[str]:
    bad = []
    for rel, source in sources.items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and f"{rel}:{node.name}" not in LONG_ON_PURPOSE:
                    bad.append(f"{rel}:{node.name} ({n} lines)")
    return bad


def many_parameters(sources: Sources) -> list[str]:
    """Functions taking more than MAX_PARAMETERS (self and cls not counted), outside cli/."""
    bad = []
    for rel, source in sources.items():
        if rel.startswith("cli/"):
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
                n = len(args) - (1 if args and args[0].arg in ("self", "cls") else 0)
                if n > MAX_PARAMETERS:
                    bad.append(f"{rel}:{node.name} ({n} parameters)")
    return bad


def unlisted_packages(pyproject: str, sources: Sources) -> list[str]:
    """Packages of the tree missing from pyproject's `packages` (absent from a wheel), and listed ones that
    are not there."""
    block = re.search(r"^packages = \[(.*?)\]", pyproject, re.S | re.M)  # tomllib is 3.11+; finemed runs on 3.10
    listed = {p for p in re.findall(r'"([\w.]+)"', block.group(1) if block else "") if p.startswith("finemed_cli")}
    present = {".".join(_module_parts(rel)) for rel in sources if rel.endswith("__init__.py")}
    return [f"{p} is not in pyproject's packages" for p in sorted(present - listed)] + [
        f"{p} is listed in pyproject but has no __init__.py" for p in sorted(listed - present)]


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(name: str, source: str) -> list[str]:
    """Private names of finemed a test reaches: imported, read through a module or an instance (`w._fd`),
    named in a string (`monkeypatch.setattr("finemed_cli.x._y", …)`) or to setattr/getattr."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("finemed_cli",
                                                                                             "finemed_kernels"):
            found += [f"{name}:{node.lineno}: from {node.module} import {a.name}" for a in node.names
                      if _private(a.name)]
        elif (isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in THIRD_PARTY_PRIVATE
              and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
            found.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and re.fullmatch(r"finemed_(cli|kernels)(\.\w+)*\._(?!_)\w*", node.value)):
            found.append(f"{name}:{node.lineno}: {node.value!r}")
        elif (isinstance(node, ast.Call) and _call_name(node) in ("setattr", "getattr", "delattr", "hasattr")
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str) and _private(node.args[1].value)
              and node.args[1].value not in THIRD_PARTY_PRIVATE):
            found.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    return found


def _call_name(node: ast.Call) -> str:
    return node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")


def collected_test_files(root: Path) -> list[Path]:
    """The files pytest runs and imports itself: test modules and every conftest.py."""
    return sorted(p for p in root.rglob("*.py") if p.name.startswith("test_") or p.name == "conftest.py")


@pytest.fixture(scope="module")
def graph() -> Graph:
    return package_graph(read_tree(LIBRARY))


def test_every_import_points_to_a_lower_floor(graph: Graph) -> None:
    assert not layer_violations(graph)


def test_base_packages_import_no_stage(graph: Graph) -> None:
    assert not base_imports_of_stages(graph)


def test_packages_import_each_other_without_cycles(graph: Graph) -> None:
    assert not import_cycles(graph)


def test_a_stage_uses_at_most_one_other_stage(graph: Graph) -> None:
    assert not stage_chaining(graph)


def test_files_and_functions_stay_small() -> None:
    kernels = {f"kernels/{p.name}": p.read_text() for p in sorted((ROOT / "kernels").glob("*.py"))}
    assert not long_files(read_tree(LIBRARY))
    assert not long_functions({**read_tree(LIBRARY), **kernels})


def test_functions_take_few_parameters() -> None:
    assert not many_parameters(read_tree(LIBRARY))


def test_pyproject_installs_every_package() -> None:
    assert not unlisted_packages((ROOT / "pyproject.toml").read_text(), read_tree(LIBRARY))


@pytest.mark.parametrize("path", collected_test_files(ROOT / "tests"), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_tests_use_the_public_api_only(path: Path) -> None:
    assert not private_uses(path.name, path.read_text())


# Each rule can fail: a small tree that breaks it, read as the repository is.

def _tree(tmp_path: Path, files: dict[str, str]) -> Graph:
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return package_graph(read_tree(tmp_path))


def test_the_layer_rule_sees_relative_imports_and_importlib(tmp_path: Path) -> None:
    graph = _tree(tmp_path, {
        "data/__init__.py": "", "data/a.py": "from ..pipeline import answer\n",
        "data/b.py": "from .. import serve\n",
        "data/c.py": "import importlib\nimportlib.import_module('finemed_cli.cli.main')\n",
        "pipeline/__init__.py": "", "pipeline/answer.py": "from . import runner\nfrom .runner import x\n",
        "pipeline/runner.py": "", "serve/__init__.py": "", "cli/__init__.py": "", "cli/main.py": "",
        "attic/__init__.py": "",
    })
    bad = layer_violations(graph)
    assert any(v.startswith("data (floor 2) imports pipeline") and "data/a.py" in v for v in bad)
    assert any(v.startswith("data (floor 2) imports serve") for v in bad)
    assert any(v.startswith("data (floor 2) imports cli") and "data/c.py" in v for v in bad)
    assert "attic is on no floor of LAYERS" in bad
    assert not [v for v in bad if v.startswith("pipeline")]  # pipeline/'s own relative imports stay inside


def test_the_base_rule_can_fail(tmp_path: Path) -> None:
    graph = _tree(tmp_path, {"config/__init__.py": "", "config/a.py": "def f():\n    import finemed_cli.ttt.lora\n",
                             "ttt/__init__.py": "", "ttt/lora.py": ""})
    assert base_imports_of_stages(graph) == ["config imports the stage ttt: ['config/a.py']"]


def test_the_cycle_rule_can_fail(tmp_path: Path) -> None:
    graph = _tree(tmp_path, {"data/__init__.py": "", "data/a.py": "from finemed_cli.hub import x\n",
                             "hub.py": "from finemed_cli.modeling import y\n",
                             "modeling/__init__.py": "from finemed_cli.data.a import z\n", "errors.py": ""})
    assert import_cycles(graph) == ["data <-> hub <-> modeling"]


def test_the_chaining_rule_counts_the_whole_package(tmp_path: Path) -> None:
    graph = _tree(tmp_path, {"eval/__init__.py": "", "eval/a.py": "from finemed_cli.generate import hf\n",
                             "eval/b.py": "from finemed_cli.retrieval.index import CorpusIndex\n",
                             "synth/a.py": "from finemed_cli.ttt import lora\n",
                             "generate/hf.py": "", "retrieval/index.py": "", "ttt/lora.py": ""})
    bad = stage_chaining(graph)
    assert len(bad) == 2 and bad[0].startswith("eval uses the stages ['generate', 'retrieval']")
    assert bad[1].startswith("synth uses the stages ['ttt']")  # outside its listed exception


def test_the_size_rules_can_fail() -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    assert long_functions({"a.py": f"def f():\n{body}"}) == [f"a.py:f ({MAX_FUNCTION_LINES + 1} lines)"]
    assert long_files({"a.py": "\n" * (MAX_FILE_LINES + 1)}) == [f"a.py ({MAX_FILE_LINES + 1} lines)"]
    params = ", ".join(f"p{i}" for i in range(MAX_PARAMETERS))
    assert many_parameters({"a.py": f"def f({params}, *, extra): pass\nclass C:\n    def m(self, {params}): pass\n",
                            "cli/c.py": f"def cmd({params}, extra): pass\n"}) == [
        f"a.py:f ({MAX_PARAMETERS + 1} parameters)"]


def test_the_install_rule_can_fail(tmp_path: Path) -> None:
    _tree(tmp_path, {"__init__.py": "", "ttt/__init__.py": "", "ttt/ggml/__init__.py": ""})
    pyproject = '[tool.setuptools]\npackages = ["finemed_cli", "finemed_cli.ttt", "finemed_cli.gone"]\n'
    assert unlisted_packages(pyproject, read_tree(tmp_path)) == [
        "finemed_cli.ttt.ggml is not in pyproject's packages",
        "finemed_cli.gone is listed in pyproject but has no __init__.py"]


@pytest.mark.parametrize("name", ["test_probe.py", "conftest.py"])
def test_the_private_name_rule_can_fail(tmp_path: Path, name: str) -> None:
    probe = tmp_path / name
    probe.write_text("from finemed_cli.modeling.loss import _x\nfrom finemed_cli.train import recipe\nrecipe._y\n"
                     "w = recipe.Writer()\nw._fd\n"
                     "def test(monkeypatch):\n    monkeypatch.setattr('finemed_cli.data.jsonl._open', None)\n"
                     "    monkeypatch.setattr(recipe, '_z', None)\n"
                     "class Fake:\n    def f(self):\n        return self._mine, model.config._attn_implementation\n")
    assert collected_test_files(tmp_path) == [probe]
    assert len(private_uses(probe.name, probe.read_text())) == 5

