"""The webui extension's UI builds under the gradio versions the hosts pin (3.41 A1111, 4.40 Forge).

.ci/run creates small venvs with only those gradio versions and lists their Pythons in
DAS_SD_HOST_GRADIO_PYTHONS (colon-separated); without it the test is skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from das_sd.registry import METHOD_NAMES

PYTHONS = [p for p in os.environ.get("DAS_SD_HOST_GRADIO_PYTHONS", "").split(":") if p]


@pytest.mark.skipif(not PYTHONS, reason="set DAS_SD_HOST_GRADIO_PYTHONS (.ci/run does)")
@pytest.mark.parametrize("python", PYTHONS)
def test_extension_ui_builds_under_host_gradio(python):
    assert Path(python).exists(), python
    run = subprocess.run([python, str(Path(__file__).parent / "build_webui_ui.py")], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["gradio"].split(".")[0] in ("3", "4")
    assert report["ui"] == ["Checkbox", "Slider", "Dropdown", "Textbox"]
    assert report["tabs"] == ["DAS attribution"] and "das_store" in report["settings"]
    assert report["torch_loaded"] is False
    assert report["methods"] == report["settings_methods"] == list(METHOD_NAMES)
