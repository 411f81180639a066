"""The package's import graph: dependencies point one way, so no module imports itself back through others."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "daemon": "hexgen.daemon",
    "coordinator": "hexgen.coordinator",
    "engine": "hexgen.engine",
    "cli": "hexgen.cli",
}


def module_files() -> dict[str, Path]:
    """Every module of the installed packages: dotted name -> file."""
    files = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            files[name] = path
    return files


def imported(tree: ast.AST, modules: set[str]) -> set[str]:
    """Modules of ours that `tree` imports anywhere (function bodies and TYPE_CHECKING blocks included)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in modules:
                found.add(node.module)
            found.update(
                f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in modules
            )
    return found


def import_graph() -> nx.DiGraph:
    files = module_files()
    graph = nx.DiGraph()
    graph.add_nodes_from(files)
    for name, path in files.items():
        for target in imported(ast.parse(path.read_text(), str(path)), set(files)):
            if target != name:
                graph.add_edge(name, target)
    return graph


def test_the_graph_sees_the_packages() -> None:
    graph = import_graph()
    assert "hexgen.daemon.node" in graph
    assert graph.has_edge("hexgen.cli.node", "hexgen.daemon.node") or graph.out_degree("hexgen.cli.node") > 0


def test_no_import_cycles() -> None:
    cycles = [cycle for cycle in nx.simple_cycles(import_graph()) if len(cycle) > 1]
    shown = "\n".join(" -> ".join([*cycle, cycle[0]]) for cycle in sorted(cycles, key=len)[:20])
    assert not cycles, f"{len(cycles)} import cycles, the shortest:\n{shown}"


def test_engine_and_coordinator_do_not_import_the_daemon() -> None:
    graph = import_graph()
    upward = [
        (source, target)
        for source, target in graph.edges
        if source.startswith(("hexgen.engine", "hexgen.coordinator"))
        and target.startswith(("hexgen.daemon", "hexgen.cli"))
    ]
    assert not upward, f"lower layers import upper ones: {upward}"
