"""Every public name of the package documents itself: a docstring, type hints, and for functions the
arguments, what they return and what they raise (Google style: ``Args:``, ``Returns:``/``Yields:``,
``Raises:``).

"Public" is a module-level function or class whose name has no leading underscore, and the public
methods and properties of such classes. The checks read the source with ``ast`` (nothing is
imported), so they cover modules that need optional dependencies too.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "das_sd"


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.stat().st_size)


def _section(doc: str, name: str) -> str | None:
    """The text of a Google-style section (``Args:`` ...) up to the next section, or None."""
    lines = doc.splitlines()
    heads = {"Args:", "Arguments:", "Returns:", "Yields:", "Raises:", "Attributes:", "Example:",
             "Examples:", "Note:", "Notes:"}
    for i, line in enumerate(lines):
        if line.strip() == name:
            body = []
            for rest in lines[i + 1:]:
                if rest.strip() in heads:
                    break
                body.append(rest)
            return "\n".join(body)
    return None


def _own_raises(node: ast.AST) -> bool:
    """Whether the function body raises an exception itself (not a bare re-raise, not in a nested
    function or class)."""
    stack = list(ast.iter_child_nodes(node))
    while stack:
        child = stack.pop()
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(child, ast.Raise) and child.exc is not None:
            return True
        stack.extend(ast.iter_child_nodes(child))
    return False


def _yields(node: ast.AST) -> bool:
    stack = list(ast.iter_child_nodes(node))
    while stack:
        child = stack.pop()
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(child, (ast.Yield, ast.YieldFrom)):
            return True
        stack.extend(ast.iter_child_nodes(child))
    return False


def _params(fn: ast.FunctionDef) -> list[ast.arg]:
    a = fn.args
    params = a.posonlyargs + a.args + a.kwonlyargs
    params += [p for p in (a.vararg, a.kwarg) if p is not None]
    return [p for p in params if p.arg not in ("self", "cls")]


def _is_property(fn: ast.FunctionDef) -> bool:
    names = {d.id if isinstance(d, ast.Name) else getattr(d, "attr", "") for d in fn.decorator_list}
    return bool(names & {"property", "cached_property", "setter"})


def _function_problems(fn: ast.FunctionDef, where: str) -> list[str]:
    problems = []
    doc = ast.get_docstring(fn)
    params = _params(fn)
    for p in params:
        if p.annotation is None:
            problems.append(f"{where}: parameter {p.arg!r} has no type hint")
    if fn.returns is None and fn.name != "__init__":
        problems.append(f"{where}: no return type hint")
    if not doc:
        return problems + [f"{where}: no docstring"]
    if _is_property(fn):
        return problems
    if params:
        args = _section(doc, "Args:") or _section(doc, "Arguments:")
        if args is None:
            problems.append(f"{where}: docstring has no Args: section")
        else:
            for p in params:
                if p.arg not in args:
                    problems.append(f"{where}: Args: does not describe {p.arg!r}")
    returns_value = fn.returns is not None and ast.unparse(fn.returns) not in ("None", "NoReturn")
    if _yields(fn):
        if _section(doc, "Yields:") is None:
            problems.append(f"{where}: generator docstring has no Yields: section")
    elif returns_value and fn.name != "__init__" and _section(doc, "Returns:") is None:
        problems.append(f"{where}: docstring has no Returns: section")
    if _own_raises(fn) and _section(doc, "Raises:") is None:
        problems.append(f"{where}: raises but its docstring has no Raises: section")
    return problems


def problems_in(path: Path) -> list[str]:
    """Every documentation problem of one module's public names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = path.relative_to(PACKAGE.parent)
    problems = []
    if not ast.get_docstring(tree):
        problems.append(f"{rel}: no module docstring")
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            problems += _function_problems(node, f"{rel}:{node.lineno} {node.name}")
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            where = f"{rel}:{node.lineno} {node.name}"
            if not ast.get_docstring(node):
                problems.append(f"{where}: no docstring")
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                        not item.name.startswith("_") or item.name == "__init__"):
                    if item.name == "__init__" and not _params(item):
                        continue
                    if item.name == "__init__":
                        # The class docstring documents the constructor's arguments.
                        doc = ast.get_docstring(node) or ""
                        args = _section(doc, "Args:") or _section(doc, "Attributes:") or ""
                        problems += [f"{where}: class docstring does not describe {p.arg!r}"
                                     for p in _params(item) if p.arg not in args]
                        problems += [f"{where}.__init__: parameter {p.arg!r} has no type hint"
                                     for p in _params(item) if p.annotation is None]
                        continue
                    problems += _function_problems(item, f"{rel}:{item.lineno} {node.name}.{item.name}")
    return problems


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_public_names_are_documented(path: Path) -> None:
    problems = problems_in(path)
    assert not problems, "\n".join(problems)


def test_the_checker_finds_each_kind_of_problem(tmp_path: Path) -> None:
    bad = tmp_path / "das_sd_bad.py"
    bad.write_text(
        '"""m."""\n'
        "def f(x, y: int) -> int:\n"
        '    """Adds.\n\n    Args:\n        y: a number.\n    """\n'
        "    if y < 0:\n        raise ValueError('negative')\n    return y\n"
        "def g():\n    yield 1\n"
        "class C:\n    def m(self) -> None:\n        pass\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path
    try:
        found = "\n".join(problems_in(bad))
    finally:
        PACKAGE = saved
    for expected in ("parameter 'x' has no type hint", "Args: does not describe 'x'",
                     "no Returns: section", "no Raises: section", "g: no docstring",
                     "g: no return type hint", "C: no docstring", "C.m: no docstring"):
        assert expected in found, expected
