"""das-sd for ComfyUI: which LoRA training images made this image?

Install: put (or link) this folder in ComfyUI/custom_nodes/ and `pip install <das-sd checkout>` into
ComfyUI's Python. Nodes: "DAS Load Store" and "DAS Attribute" (category das-sd).
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
