"""The first-party import graph, read from the source (every ``import``, at module level or inside functions).

    python -m tests.import_graph        # prints each package's imports of the others, then module cycles

The rules it lets tests/test_contract.py check: serve/ imports only serve/; train/ only itself,
serve.contract and serve.families; export/ no perf/; no module imports one that imports it back.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("train", "export", "perf", "serve")


def module_imports() -> dict[str, set[str]]:
    """``{"export.recipes": {"export.prune", "serve.contract", ...}}`` for every first-party module."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).glob("*.py")):
            name = f"{package}.{path.stem}"
            found: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    # "from export import prune" imports the module export.prune
                    found.update(
                        f"{node.module}.{a.name}" if _is_module(f"{node.module}.{a.name}") else node.module
                        for a in node.names
                    )
            graph[name] = {m for m in found if m.split(".")[0] in PACKAGES and m != name}
    return graph


def _is_module(name: str) -> bool:
    return (REPO / (name.replace(".", "/") + ".py")).is_file()


def package_edges(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Which other packages (and, for serve, which of its modules) each package imports."""
    edges: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for module, imports in graph.items():
        for target in imports:
            if target.split(".")[0] != module.split(".")[0]:
                edges[module.split(".")[0]].add(target if target.startswith("serve.") else target.split(".")[0])
    return edges


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle between modules, each as the list of modules around it."""
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


if __name__ == "__main__":
    graph = module_imports()
    for package, targets in package_edges(graph).items():
        print(f"{package:7} imports {', '.join(sorted(targets)) or 'nothing outside itself'}")
    print(f"cycles: {cycles(graph) or 'none'}")
