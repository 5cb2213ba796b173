"""The webui extension's install.py: installs das-sd from a checkout without a shell command line."""

from __future__ import annotations

import runpy
import subprocess
import sys
import types
from pathlib import Path

INSTALL = Path(__file__).resolve().parents[2] / "extensions" / "sd-webui-das-sd" / "install.py"


def test_install_passes_the_checkout_path_as_one_argument(tmp_path, monkeypatch):
    source = tmp_path / 'das-sd"; touch pwned; echo "$(id)'  # a path a shell command line would run
    source.mkdir()
    (source / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    monkeypatch.setenv("DAS_SD_SOURCE", str(source))
    monkeypatch.setitem(sys.modules, "das_sd", None)  # "not installed": the import raises ImportError
    shell_commands: list[str] = []
    launch = types.ModuleType("launch")  # the webui's helpers; run_pip builds a shell command line
    launch.run_pip = lambda command, desc=None: shell_commands.append(command)
    monkeypatch.setitem(sys.modules, "launch", launch)
    calls: list = []
    monkeypatch.setattr(subprocess, "run", lambda args, **kwargs: calls.append((args, kwargs)))

    runpy.run_path(str(INSTALL))

    assert shell_commands == []
    assert calls == [([sys.executable, "-m", "pip", "install", str(source)], {"check": True})]
