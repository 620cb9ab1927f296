"""The shape of the code: dependencies point one way (api and indexer use atlas; atlas uses
neither) and no module imports another that imports it back, at module level or inside a
function."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("atlas", "api", "indexer")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _project_modules(root: Path) -> dict[str, Path]:
    return {_module_name(p, root): p for package in PACKAGES for p in (root / package).rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules `path` imports anywhere in it (top level and inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def _graph(root: Path = ROOT) -> nx.DiGraph:
    modules = _project_modules(root)
    graph = nx.DiGraph()
    for name, path in modules.items():
        graph.add_node(name)
        for imported in _imports(path, modules) - {name}:
            # A package's __init__ importing its own submodules is how a package is assembled.
            if not imported.startswith(name + "."):
                graph.add_edge(name, imported)
    return graph


def test_no_import_cycles_anywhere():
    cycles = list(nx.simple_cycles(_graph()))
    assert cycles == [], f"import cycles: {cycles}"


def test_atlas_imports_neither_api_nor_indexer():
    graph = _graph()
    wrong = [(a, b) for a, b in graph.edges if a.startswith("atlas") and b.split(".")[0] in ("api", "indexer")]
    assert wrong == []


def test_api_does_not_use_the_batch_jobs_directly():
    """The service starts rebuilds as processes of the `cellatlas` command; it imports no job code."""
    graph = _graph()
    assert [(a, b) for a, b in graph.edges if a.startswith("api") and b.startswith("indexer")] == []


def test_the_layout_check_sees_a_cycle_hidden_inside_a_function(tmp_path):
    (tmp_path / "atlas").mkdir()
    (tmp_path / "atlas" / "__init__.py").write_text("")
    (tmp_path / "atlas" / "a.py").write_text("def f():\n    from atlas.b import g\n    return g\n")
    (tmp_path / "atlas" / "b.py").write_text("import atlas.a\n\n\ndef g():\n    return atlas.a\n")
    (tmp_path / "atlas" / "c.py").write_text("from atlas import a\n")
    graph = _graph(tmp_path)
    assert sorted(map(sorted, nx.simple_cycles(graph))) == [["atlas.a", "atlas.b"]]
    assert graph.has_edge("atlas.c", "atlas.a")  # `from package import module` counts too
