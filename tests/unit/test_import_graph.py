"""Dependencies point one way: no import cycle between the gateway's modules, nor between its packages (imports made
only for type checking excluded, as they never run)."""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

GATEWAY = Path(__file__).resolve().parents[2] / "gateway"


def _module_name(path: Path) -> str:
    parts = path.relative_to(GATEWAY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    typing_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "gateway":
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "gateway"}
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(path): _runtime_imports(path) for path in GATEWAY.rglob("*.py")}


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _a_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` (depth-first search with colours), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for successor in graph.get(node, ()):
            if state.get(successor) == 1:
                return [*path[path.index(successor) :], successor]
            if successor not in state:
                found = visit(successor, [*path, successor])
                if found:
                    return found
        state[node] = 2
        return None

    for start in graph:
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def _between_packages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for module, imports in graph.items():
        edges: Iterable[str] = (_package(i) for i in imports)
        packages.setdefault(_package(module), set()).update(p for p in edges if p != _package(module))
    return packages


def test_no_module_imports_itself_back() -> None:
    graph = _graph()
    assert len(graph) > 50
    assert _a_cycle(graph) is None


def test_no_package_imports_itself_back() -> None:
    assert _a_cycle(_between_packages(_graph())) is None


def test_the_check_finds_a_cycle() -> None:
    assert _a_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _a_cycle({"a": {"b"}, "b": set()}) is None
