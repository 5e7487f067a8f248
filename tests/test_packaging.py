"""The installed layout: one import namespace, and packages layered without import cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"common": "common", "model": "model", "datamodules": "datamodules", "evaluation": "evaluation",
            "environment": "environment", "lightning_modules": "lightning_modules", "search_r3": "search_r3"}
# Which package may import which (docs/design.md, "Layers"): shared utilities at the bottom, then the model
# wrapper, the data and the RL environment side by side, evaluation, the Lightning modules, and the
# command-line entry points on top.
LAYERS = {
    "common": set(),
    "model": {"common"},
    "datamodules": {"common"},
    "environment": {"common"},
    "evaluation": {"common", "model", "datamodules"},
    "lightning_modules": {"common", "model", "datamodules", "environment", "evaluation"},
    "search_r3": {"common", "model", "datamodules", "environment", "evaluation", "lightning_modules"},
}


def test_design_card_folders_install_under_search_r3_only(tmp_path: Path) -> None:
    """Outside the repository (so the working directory cannot supply them), the generic folder names
    are not importable and the namespaced ones are."""
    code = ("import importlib.util as u, search_r3.evaluation, search_r3.model, search_r3.lightning_modules;"
            "print([n for n in ('evaluation', 'environment', 'datamodules', 'lightning_modules', 'model') "
            "if u.find_spec(n) is not None])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _package_imports() -> dict[str, set[str]]:
    """Package -> the other search_r3 packages its modules import (at any depth, lazy imports included)."""
    graph: dict[str, set[str]] = {name: set() for name in PACKAGES}
    for name, folder in PACKAGES.items():
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                for module in modules:
                    parts = module.split(".")
                    if parts[0] == "search_r3" and len(parts) > 1 and parts[1] in PACKAGES and parts[1] != name:
                        graph[name].add(parts[1])
                    elif parts[0] == "search_r3" and name != "search_r3" and (len(parts) == 1 or parts[1] not in PACKAGES):
                        graph[name].add("search_r3")
    return graph


def test_no_package_imports_one_that_imports_it_back() -> None:
    graph = _package_imports()
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != "open", f"import cycle: {' -> '.join(path + [nxt])}"
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for package in sorted(graph):
        if package not in state:
            visit(package, [package])


def test_every_package_imports_only_the_layers_below_it() -> None:
    graph = _package_imports()
    assert set(graph) == set(LAYERS)
    broken = {name: sorted(graph[name] - LAYERS[name]) for name in graph if graph[name] - LAYERS[name]}
    assert not broken, f"imports that break the layers of docs/design.md: {broken}"
