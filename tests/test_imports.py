"""The import graph of das_sd, read from its `import` / `from` statements (function-level ones too):
no module reaches itself again. Run as a script to print the graph's cycles:
``python tests/test_imports.py [PACKAGE_DIR]``."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "das_sd"


def module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the modules of the package it imports, wherever the statement is: a cycle through an
    import deferred into a function is still a cycle in the design. Only ``if TYPE_CHECKING:`` blocks
    are left out: they name types for the type checker and never run."""
    modules = {module_name(p, package): p for p in sorted(package.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from . import x` / `from .pkg import mod`: x may be a module itself
                targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
        graph[name] = {_owner(t, modules) for t in targets if _owner(t, modules)} - {name}
    return graph


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` outside ``if TYPE_CHECKING:`` bodies (their ``else`` runs)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _owner(target: str, modules) -> str | None:
    """The package module a dotted import resolves to (its longest prefix that is a module)."""
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_the_graph_sees_deferred_and_relative_imports_but_not_type_checking_ones(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "import os\nfrom .b import x\nfrom . import c\n",
        "b.py": "def f():\n    from .a import y  # deferred: still an edge\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import y\nelse:\n    import pkg.sub.d\n",
        "sub/__init__.py": "",
        "sub/d.py": "from ..e import f\nfrom pkg import sub\n",
        "e.py": "import json\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b", "pkg.c"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.sub.d"},
                     "pkg.sub": set(), "pkg.sub.d": {"pkg.e", "pkg.sub"}, "pkg.e": set()}
    assert cycles(graph) == [["pkg.a", "pkg.b"]]


def test_das_sd_has_no_import_cycles():
    assert cycles(import_graph()) == []


if __name__ == "__main__":
    found = cycles(import_graph(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else PACKAGE))
    for component in found:
        print(" <-> ".join(component))
    print(f"{len(found)} import cycle(s)")
    sys.exit(1 if found else 0)


# The demo entry points may start the embedded toy world; nothing else of the product imports it.
TOY_ENTRY_POINTS = {"das_sd.cli", "das_sd.app", "das_sd.app.session"}


def test_product_modules_import_the_toy_world_only_from_the_demo_entry_points():
    graph = import_graph()
    is_toy = lambda m: m == "das_sd.toy" or m.startswith("das_sd.toy.")  # noqa: E731
    importers = {m for m, targets in graph.items() if not is_toy(m) and any(is_toy(t) for t in targets)}
    assert importers <= TOY_ENTRY_POINTS, sorted(importers - TOY_ENTRY_POINTS)
    assert "das_sd.cli" in importers  # the graph does see the toy imports it allows
