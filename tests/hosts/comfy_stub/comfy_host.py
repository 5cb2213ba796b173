"""Stand-in for ComfyUI's custom-node loading (nodes.py load_custom_node) and v1 execution
(execution.py get_input_data / get_output_data), as described in HOSTS.md 2.1-2.2. Like the real
executor (execution.py, a125cd84, l.662), nodes run under torch.inference_mode()."""

import importlib.util
import os
import sys

import torch

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}


def load_custom_node(module_path: str) -> bool:
    """Import a custom-node folder under its directory name and register its v1 mappings."""
    name = os.path.basename(module_path.rstrip("/"))
    spec = importlib.util.spec_from_file_location(name, os.path.join(module_path, "__init__.py"),
                                                  submodule_search_locations=[module_path])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    mappings = getattr(module, "NODE_CLASS_MAPPINGS", None)
    if mappings is None:
        return False
    for node_id, cls in mappings.items():
        cls.RELATIVE_PYTHON_MODULE = f"custom_nodes.{name}"
        NODE_CLASS_MAPPINGS[node_id] = cls
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", {}))
    return True


def execute(node_id: str, inputs: dict, prompt: dict, unique_id: str = "1"):
    """Run one node: hidden inputs filled by their declared kind; returns (ui, result tuple)."""
    cls = NODE_CLASS_MAPPINGS[node_id]
    kwargs = dict(inputs)
    for key, kind in cls.INPUT_TYPES().get("hidden", {}).items():
        kwargs[key] = {"PROMPT": prompt, "UNIQUE_ID": unique_id, "EXTRA_PNGINFO": {}}.get(kind)
    with torch.inference_mode():
        output = getattr(cls(), cls.FUNCTION)(**kwargs)
    if isinstance(output, dict):
        ui, result = output.get("ui"), output.get("result", ())
    else:
        ui, result = None, output
    assert isinstance(result, tuple) and len(result) == len(cls.RETURN_TYPES), "outputs must match RETURN_TYPES"
    return ui, result
