"""The import structure the README's Development section draws: one import package, layers that only import down.

    rims_rl.cli  ->  rims_rl.agents  ->  rims_rl.{rim, policies, extractors, config, tracking, allocator}
                                     ->  rims_rl.envs

Read from the source (every import statement, module level or inside a function), so a lazy import counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"rims_rl": "rims_rl", "agents": "rims_rl.agents", "envs": "rims_rl.envs", "cli": "rims_rl.cli"}
LAYER = {"rims_rl.cli": 3, "rims_rl.agents": 2, "rims_rl.envs": 1, "rims_rl": 1}
"""Higher layers may import lower ones; the model (``rims_rl``'s own modules) and the envs sit side by side at the
bottom and never import each other."""


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules ``path`` imports, by absolute name: ``from X import Y`` is X.Y where that is a module
    (a submodule), else X."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")[: -node.level] if path.stem != "__init__" else name.split(".")
                base = ".".join(parts + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return {m for m in found if m.split(".")[0] in ("rims_rl", "agents", "envs", "cli")}


def _package(module: str) -> str:
    for package in ("rims_rl.cli", "rims_rl.agents", "rims_rl.envs"):
        if module == package or module.startswith(package + "."):
            return package
    return "rims_rl"


MODULES = _modules()
GRAPH = {m: {i for i in _imports(p, m, set(MODULES)) if i in MODULES} for m, p in MODULES.items()}


def test_only_rims_rl_is_imported_never_bare_agents_envs_or_cli():
    bare = {
        m: sorted(i for i in _imports(p, m, set(MODULES)) if i.split(".")[0] != "rims_rl") for m, p in MODULES.items()
    }
    assert {m: b for m, b in bare.items() if b} == {}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module):
    here = _package(module)
    for imported in GRAPH[module]:
        there = _package(imported)
        if there == here or imported == "rims_rl":
            continue
        assert LAYER[there] < LAYER[here], f"{module} ({here}) imports {imported} ({there}): not a lower layer"


def test_no_two_modules_import_each_other():
    cycles = sorted((a, b) for a, deps in GRAPH.items() for b in deps if a < b and a in GRAPH.get(b, ()))
    assert cycles == []


def test_the_rim_module_imports_only_torch():
    tree = ast.parse((ROOT / "rims_rl" / "rim.py").read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            roots.add((node.module or "").split(".")[0])
    stdlib = {"__future__", "math", "os", "shutil", "threading", "warnings", "collections", "concurrent", "pathlib",
              "types", "typing", "functools", "dataclasses", "contextlib"}  # fmt: skip
    assert roots - stdlib <= {"torch", "rims_rl"}
