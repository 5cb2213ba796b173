"""Build the webui extension's UI under whatever gradio this Python has (run by test_webui_gradio_versions).

Imports no torch: at start-up the extension imports only das_sd.registry (torch-free, taken from this
checkout: the host-gradio venvs hold gradio alone), the rest of das_sd when attribution runs.
"""

import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "webui_stub"))
sys.path.insert(1, str(HERE.parent.parent))

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


def values(choices) -> list:
    """A Dropdown's choices as values (gradio 3 keeps strings, gradio 4 and later (label, value) pairs)."""
    return [c[1] if isinstance(c, (list, tuple)) else c for c in choices]


dropdown = next(c for c in components if isinstance(c, gr.Dropdown))
option = shared.opts.data_labels["das_method"]
print(json.dumps({"gradio": gr.__version__, "ui": [type(c).__name__ for c in components],
                  "tabs": [title for _, title, _ in tabs], "settings": sorted(shared.opts.data),
                  "methods": values(dropdown.choices), "method_default": dropdown.value,
                  "settings_methods": list(option.component_args["choices"]), "settings_method_default": option.default,
                  "torch_loaded": "torch" in sys.modules}))
