"""The layout holds (docs/ARCHITECTURE.md): who may import whom, how big a file or function may grow, and that
tests use the public API only."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "finemed_cli"
# The packages that do one stage's job each. Only the chaining modules may use several of them.
STAGES = {"retrieval", "ttt", "generate", "eval", "synth", "export", "train", "pipeline"}
# serve/ is a front end, as cli/ is: per request it retrieves, trains and generates.
CHAINING = {"pipeline", "cli", "serve", "train/recipe.py", "__main__.py"}
FORBIDDEN = {"generate": {"ttt"}, "retrieval": {"generate"}}  # package -> packages it must not import
MAX_FILE_LINES = 350
MAX_FUNCTION_LINES = 60
LONG_ON_PURPOSE: dict[str, str] = {}  # "path:function" -> the reason it stays long


def _modules() -> list[Path]:
    return sorted(LIBRARY.rglob("*.py"))


def _package(path: Path) -> str:
    rel = path.relative_to(LIBRARY)
    return rel.parts[0] if len(rel.parts) > 1 else rel.name


def _imports(path: Path) -> set[str]:
    """Every finemed_cli module path the file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("finemed_cli"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("finemed_cli"))
    return found


def _imported_packages(path: Path) -> set[str]:
    return {m.split(".")[1] for m in _imports(path) if m.count(".") >= 1} - {_package(path)}


def test_nothing_below_the_cli_imports_it() -> None:
    bad = [str(p.relative_to(ROOT)) for p in _modules()
           if _package(p) not in ("cli", "__main__.py") and "cli" in _imported_packages(p)]
    assert not bad, f"imports finemed_cli.cli: {bad}"


def test_forbidden_imports() -> None:
    bad = [f"{p.relative_to(ROOT)} imports {sorted(_imported_packages(p) & FORBIDDEN[_package(p)])}"
           for p in _modules() if _package(p) in FORBIDDEN and _imported_packages(p) & FORBIDDEN[_package(p)]]
    assert not bad, bad


def test_only_the_pipeline_and_the_training_recipe_chain_stages() -> None:
    bad = []
    for p in _modules():
        rel = str(p.relative_to(LIBRARY))
        if _package(p) in CHAINING or rel in CHAINING:
            continue
        others = _imported_packages(p) & STAGES
        if len(others) > 1:
            bad.append(f"{rel} uses the stages {sorted(others)}")
    assert not bad, "chaining stages outside pipeline/ and the training recipe: " + "; ".join(bad)


def test_files_and_functions_stay_small() -> None:
    long_files = [f"{p.relative_to(ROOT)} ({n} lines)" for p in _modules()
                  if (n := p.read_text().count("\n")) > MAX_FILE_LINES]
    long_functions = []
    for p in [*_modules(), *sorted((ROOT / "kernels").glob("*.py"))]:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                key = f"{p.relative_to(ROOT)}:{node.name}"
                if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES and key not in LONG_ON_PURPOSE:
                    long_functions.append(f"{key} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long_files and not long_functions, (long_files, long_functions)


def _private_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    modules: set[str] = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("finemed_cli",
                                                                                             "finemed_kernels"):
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    found.append(f"{path.name}:{node.lineno}: from {node.module} import {a.name}")
                if importlib.util.find_spec(f"{node.module}.{a.name}") if _is_package(node.module) else False:
                    modules.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            modules.update((a.asname or a.name).split(".")[0] for a in node.names
                           if a.name.split(".")[0] in ("finemed_cli", "finemed_kernels"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in modules:
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def _is_package(module: str) -> bool:
    spec = importlib.util.find_spec(module)
    return spec is not None and spec.submodule_search_locations is not None


@pytest.mark.parametrize("path", sorted((ROOT / "tests").rglob("test_*.py")), ids=lambda p: p.name)
def test_tests_use_the_public_api_only(path: Path) -> None:
    assert not _private_uses(path)


def test_the_private_name_check_can_fail(tmp_path: Path) -> None:
    probe = tmp_path / "test_probe.py"
    probe.write_text("from finemed_cli.modeling.loss import _x\nfrom finemed_cli.train import recipe\nrecipe._y\n")
    assert len(_private_uses(probe)) == 2
