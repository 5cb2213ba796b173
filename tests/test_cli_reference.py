"""docs/cli.md is generated from the argument parsers (das_sd.cli_reference): it must match them, and
the rendering must not depend on the machine (terminal width, paths, devices, versions)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from das_sd import __version__, cli_reference
from das_sd.cli import build_parser

PAGE = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def _all_parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """(prog, parser) of das-sd and of every command and nested command."""
    found, todo = [], [("das-sd", build_parser())]
    while todo:
        prog, parser = todo.pop()
        found.append((prog, parser))
        todo += [(f"{prog} {name}", sub) for name, _, sub in cli_reference._subcommands(parser)]
    return found


def test_docs_cli_md_matches_the_parsers() -> None:
    rendered = cli_reference.render()
    current = PAGE.read_text(encoding="utf-8") if PAGE.exists() else ""
    if current != rendered:
        old, new = current.splitlines(), rendered.splitlines()
        first = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
        pytest.fail(f"docs/cli.md is out of date with the das-sd parsers (first difference at line {first + 1}: "
                    f"{old[first] if first < len(old) else '<end>'!r} vs {new[first] if first < len(new) else '<end>'!r}); "
                    "run `make cli-docs` and commit docs/cli.md")


def test_the_rendering_does_not_depend_on_the_terminal_or_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    first = cli_reference.render()
    monkeypatch.setenv("COLUMNS", "40")
    monkeypatch.setenv("DAS_SD_HOME", "/somewhere/else")
    assert cli_reference.render() == first
    home = os.path.expanduser("~")
    assert home not in first and str(Path.cwd()) not in first
    assert f"das-sd {__version__}" not in first  # a release would otherwise change the page


def test_every_command_is_on_the_page_in_a_group() -> None:
    page = cli_reference.render()
    for prog, _ in _all_parsers():
        assert f"`{prog}`" in page, prog
    saved = cli_reference.GROUPS
    try:
        cli_reference.GROUPS = tuple((t, b, tuple(n for n in names if n != "index")) for t, b, names in saved)
        with pytest.raises(ValueError, match="index"):
            cli_reference.render()
    finally:
        cli_reference.GROUPS = saved


def test_every_option_has_help_and_a_plain_default() -> None:
    """Each flag says what it does, and its default is a literal: a default computed at run time (the
    device, free memory, a path under the home folder) would make the page differ between machines;
    such a default is None in the parser and the help text says what it becomes."""
    problems = []
    for prog, parser in _all_parsers():
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = f"{prog} {max(action.option_strings, key=len) if action.option_strings else action.dest}"
            if not action.help and not isinstance(action, argparse._VersionAction):
                problems.append(f"{name}: no help text")
            default = action.default
            values = default if isinstance(default, (list, tuple)) else [default]
            if not all(v is None or isinstance(v, (str, int, float, bool)) for v in values):
                problems.append(f"{name}: default {default!r} is not a plain literal")
            if isinstance(default, str) and (os.path.isabs(default) or default.startswith("~")):
                problems.append(f"{name}: default {default!r} is a path of this machine")
    assert not problems, "\n".join(problems)


def test_out_writes_the_page_atomically(tmp_path: Path) -> None:
    out = tmp_path / "cli.md"
    out.write_text("stale")
    assert cli_reference.main(["--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == cli_reference.render()
    assert [p.name for p in tmp_path.iterdir()] == ["cli.md"]
