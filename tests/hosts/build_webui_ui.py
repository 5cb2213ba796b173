"""Build the webui extension's UI under whatever gradio this Python has (run by test_webui_gradio_versions).

Imports neither torch nor das_sd: the extension loads das_sd only when attribution runs.
"""

import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "webui_stub"))

import gradio as gr  # noqa: E402
from modules import script_callbacks, shared  # noqa: E402

spec = importlib.util.spec_from_file_location(
    "das_attribution", HERE.parent.parent / "extensions" / "sd-webui-das-sd" / "scripts" / "das_attribution.py")
extension = importlib.util.module_from_spec(spec)
spec.loader.exec_module(extension)
for callback in script_callbacks.callbacks_ui_settings:
    callback()
with gr.Blocks():
    components = extension.DASAttributionScript().ui(False)
tabs = [t for callback in script_callbacks.callbacks_ui_tabs for t in callback()]
print(json.dumps({"gradio": gr.__version__, "ui": [type(c).__name__ for c in components],
                  "tabs": [title for _, title, _ in tabs], "settings": sorted(shared.opts.data),
                  "torch_loaded": "torch" in sys.modules}))
