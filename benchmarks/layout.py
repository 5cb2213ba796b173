"""The shape of the package, measured from its source: lines per module, the largest functions, the
module import graph (every import statement, function-level ones included) and its cycles, and which
product modules import the embedded toy world.

    python benchmarks/layout.py [--top 10]

Nothing of das_sd is imported or run: the source is parsed with ``ast`` (the import graph is
tests/test_imports.py's, which asserts the layout rules on it).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "das_sd"


sys.path.insert(0, str(ROOT / "tests"))
from source_metrics import code_lines  # noqa: E402  (lines without docstrings, as tests/test_cli.py counts)
from test_imports import cycles, import_graph  # noqa: E402  (one graph reader: the test's)


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    modules = {}
    for p in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(p.relative_to(root).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return modules


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
    code = sorted(((code_lines(p.read_text()), n) for n, p in modules.items()), reverse=True)
    print(f"{len(modules)} modules, {sum(n for n, _ in lines)} lines, {sum(n for n, _ in code)} without docstrings")
    print("largest modules:", ", ".join(f"{n} {m}" for n, m in lines[: args.top]))
    print("largest modules without docstrings:", ", ".join(f"{n} {m}" for n, m in code[: args.top]))
    print("largest functions:", ", ".join(f"{n} {f}" for n, f in largest_functions(top=args.top)))
    graph = import_graph()
    found = cycles(graph)
    print(f"import cycles: {len(found)}", *(" <-> ".join(c) for c in found), sep="\n  ")
    print("product modules importing das_sd.toy:",
          ", ".join(f"{m} ({', '.join(sorted(t))})" for m, t in sorted(toy_imports(graph).items())) or "none")


if __name__ == "__main__":
    main()
