"""The shape of the package, measured from its source: lines per module, the largest functions, the
module import graph (every import statement, function-level ones included) and its cycles, and which
product modules import the embedded toy world.

    python benchmarks/layout.py [--top 10]

Nothing is imported or run: the source is parsed with ``ast``. tests/test_layout.py asserts the
layout rules on the same graph.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "das_sd"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted((root / PACKAGE).rglob("*.py"))}


def _resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the das_sd modules it imports anywhere in its body (a from-import of a submodule
    counts as importing that submodule)."""
    modules = package_modules(root)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, path.name == "__init__.py", node)
                for alias in node.names:
                    child = f"{base}.{alias.name}"
                    targets.add(child if child in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
    return found


def toy_imports(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Product modules (outside das_sd.toy) -> the toy modules they import."""
    toy = f"{PACKAGE}.toy"
    return {m: {t for t in ts if t == toy or t.startswith(toy + ".")}
            for m, ts in graph.items() if not (m == toy or m.startswith(toy + "."))
            if any(t == toy or t.startswith(toy + ".") for t in ts)}


def largest_functions(root: Path = ROOT, top: int = 10) -> list[tuple[int, str]]:
    sizes = []
    for name, path in package_modules(root).items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                sizes.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
    return sorted(sizes, reverse=True)[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    modules = package_modules()
    lines = sorted(((len(p.read_text().splitlines()), n) for n, p in modules.items()), reverse=True)
    print(f"{len(modules)} modules, {sum(n for n, _ in lines)} lines")
    print("largest modules:", ", ".join(f"{n} {m}" for n, m in lines[: args.top]))
    print("largest functions:", ", ".join(f"{n} {f}" for n, f in largest_functions(top=args.top)))
    graph = import_graph()
    found = cycles(graph)
    print(f"import cycles: {len(found)}", *(" <-> ".join(c) for c in found), sep="\n  ")
    print("product modules importing das_sd.toy:",
          ", ".join(f"{m} ({', '.join(sorted(t))})" for m, t in sorted(toy_imports(graph).items())) or "none")


if __name__ == "__main__":
    main()
