"""The dependency rule of docs/architecture.md, read from the source: ``fedpanfm`` imports neither
``sites`` nor ``orchestration``; those two import ``fedpanfm`` and never each other; and no
module of the three takes part in an import cycle (imports inside functions count: they are
cycles that only bite later)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedpanfm", "sites", "orchestration")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file, as absolute dotted names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            # ``from pkg import module`` imports the submodule when there is one.
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    modules = {_module_name(p): p for p in files}
    return {name: {m for m in _imports(p) if m in modules} for name, p in modules.items()}


def test_the_source_tree_is_found() -> None:
    graph = _graph()
    assert {"fedpanfm.config", "sites.client_app", "orchestration.simulate"} <= set(graph)
    # The parser sees both import forms (a regression here would make every rule below vacuous).
    assert "sites.handlers" in graph["sites.client_app"]
    assert "fedpanfm.config" in graph["orchestration.simulate"]


@pytest.mark.parametrize("package,forbidden", [
    ("fedpanfm", ("sites", "orchestration")),
    ("sites", ("orchestration",)),
    ("orchestration", ("sites",)),
])
def test_packages_import_only_what_the_rule_allows(package: str, forbidden: tuple[str, ...]) -> None:
    bad = sorted(
        f"{p.relative_to(ROOT)} imports {m}"
        for p in (ROOT / package).rglob("*.py")
        for m in _imports(p)
        if m.split(".")[0] in forbidden
    )
    assert not bad, "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle() -> None:
    cycles = _cycles(_graph())
    assert not cycles, cycles
