"""Sizes of source code as the layout rules count them: lines without docstrings (a documented
function is not a longer one)."""
from __future__ import annotations

import ast


def code_lines(source: str) -> int:
    """Lines of a module or function's source, its docstrings (module, class, function) left out."""
    tree = ast.parse(source)
    doc_lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) \
                and ast.get_docstring(node):
            first = node.body[0]
            doc_lines |= set(range(first.lineno, first.end_lineno + 1))
    return len(source.splitlines()) - len(doc_lines)
