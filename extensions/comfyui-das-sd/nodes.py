"""ComfyUI v1 nodes over the das_sd API (thin adapters: tensors <-> PIL, graph -> LoRA names).

The store's manifest names the base model and LoRA that das-sd loads itself; ComfyUI's MODEL object
carries no LoRA names, so the LoRAs of the generation are read from the hidden PROMPT graph (or given
as ``lora_name``) and checked against the store's LoRA; a LoRA file or checkpoint of another model
family than the store's (SD 1.x / 2.x vs SDXL) is refused. On SDXL, the size conditioning of a
CLIPTextEncodeSDXL node of the graph (width / height / crop_w / crop_h / target_width / target_height)
is the one attributed with; plain CLIPTextEncode conditions on the latent's size, uncropped, as
ComfyUI's SDXL model does.
"""

from __future__ import annotations

import os

import numpy as np

from das_sd.registry import METHOD_NAMES  # torch-free: the node list loads without torch

METHODS = list(METHOD_NAMES)
LORA_LOADERS = ("LoraLoader", "LoraLoaderModelOnly")
CHECKPOINT_LOADERS = ("CheckpointLoaderSimple", "CheckpointLoader")
SDXL_ENCODE = "CLIPTextEncodeSDXL"
SDXL_SIZE_INPUTS = ("width", "height", "crop_w", "crop_h", "target_width", "target_height")


def image_to_pil(images, index: int):
    """One image of a ComfyUI IMAGE batch (B, H, W, C float in [0, 1]) as PIL."""
    from PIL import Image

    array = (images[index].detach().cpu().float().numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(array[..., :3])


def pils_to_image(pils, size: int):
    """PIL images -> one IMAGE batch; one batch has one size, so every image is resized to ``size``."""
    import torch
    from PIL import Image

    arrays = [np.asarray(p.convert("RGB").resize((size, size), Image.Resampling.NEAREST), dtype=np.float32) / 255.0
              for p in pils]
    return torch.from_numpy(np.stack(arrays))


def loras_in_graph(prompt: dict | None) -> list[str]:
    """LoRA file names of the LoRA loader nodes in an API-format graph (the hidden PROMPT)."""
    names = []
    for node in (prompt or {}).values():
        if isinstance(node, dict) and node.get("class_type") in LORA_LOADERS:
            name = node.get("inputs", {}).get("lora_name")
            if isinstance(name, str):
                names.append(name)
    return names


def checkpoints_in_graph(prompt: dict | None) -> list[str]:
    """Checkpoint file names of the checkpoint loader nodes in an API-format graph."""
    return [node["inputs"]["ckpt_name"] for node in (prompt or {}).values()
            if isinstance(node, dict) and node.get("class_type") in CHECKPOINT_LOADERS
            and isinstance(node.get("inputs", {}).get("ckpt_name"), str)]


def sdxl_size_in_graph(prompt: dict | None, text: str):
    """The SizeConditioning of the graph's CLIPTextEncodeSDXL node for ``text`` (its text_g or
    text_l), else of the only one feeding a sampler's ``positive`` input; None when there is none,
    several, or its sizes are links rather than values."""
    from das_sd.conditioning import SizeConditioning

    nodes = {k: n for k, n in (prompt or {}).items() if isinstance(n, dict) and n.get("class_type") == SDXL_ENCODE}
    chosen = [n for n in nodes.values() if text.strip() in (str(n["inputs"].get("text_g", "")).strip(),
                                                            str(n["inputs"].get("text_l", "")).strip())]
    if not chosen:
        positive = {str(n.get("inputs", {}).get("positive", [None])[0]) for n in (prompt or {}).values()
                    if isinstance(n, dict) and isinstance(n.get("inputs", {}).get("positive"), list)}
        chosen = [n for k, n in nodes.items() if k in positive]
    if len(chosen) != 1:
        return None
    values = [chosen[0]["inputs"].get(name) for name in SDXL_SIZE_INPUTS]
    if not all(isinstance(v, (int, float)) for v in values):
        return None
    width, height, crop_w, crop_h, target_width, target_height = (int(v) for v in values)
    return SizeConditioning((width, height), (crop_w, crop_h), (target_width, target_height))


def host_path(kind: str, name: str):
    """The file of a model name in ComfyUI's ``kind`` folders ("loras", "checkpoints"), or None."""
    try:
        import folder_paths  # ComfyUI's; imported lazily so that the module loads without it

        return folder_paths.get_full_path(kind, name)
    except Exception:
        return None


def lora_path(name: str):
    """The file of a LoRA name in ComfyUI's LoRA folders, or None."""
    return host_path("loras", name)


class DASLoadStore:
    """Open a das-sd feature store (loads the base model and LoRA its manifest names)."""

    CATEGORY = "das-sd"
    RETURN_TYPES = ("DAS_STORE",)
    RETURN_NAMES = ("das_store",)
    FUNCTION = "load"
    DESCRIPTION = "Open a das-sd feature store for attribution."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"store_path": ("STRING", {"default": os.environ.get("DAS_SD_STORE", "")}),
                             "device": (["auto", "cpu", "cuda"],)}}

    @classmethod
    def IS_CHANGED(cls, store_path, device):
        manifest = os.path.join(store_path, "manifest.json")
        return os.path.getmtime(manifest) if os.path.isfile(manifest) else float("nan")

    def load(self, store_path, device):
        from das_sd.integrations.hosts import CACHE

        return (CACHE.get(store_path, None if device == "auto" else device),)


class DASAttribute:
    """Top-k LoRA training images of each input image, as an IMAGE batch plus a JSON string."""

    CATEGORY = "das-sd"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("training_images", "scores_json")
    FUNCTION = "attribute"
    OUTPUT_NODE = True
    DESCRIPTION = "Which LoRA training images made this image? (Diffusion Attribution Score)"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"das_store": ("DAS_STORE",), "images": ("IMAGE",),
                             "prompt": ("STRING", {"multiline": True, "default": ""}),
                             "method": (METHODS,),
                             "top_k": ("INT", {"default": 8, "min": 1, "max": 64})},
                "optional": {"lora_name": ("STRING", {"default": ""})},
                "hidden": {"graph": "PROMPT", "unique_id": "UNIQUE_ID"}}

    def attribute(self, das_store, images, prompt, method, top_k, lora_name="", graph=None, unique_id=None):
        from das_sd.data.images import load_image
        from das_sd.integrations.families import checkpoint_family, require_family, require_lora_families
        from das_sd.integrations.hosts import attribute_pil, attribution_json, lora_mismatch

        if not prompt.strip():
            raise ValueError("DAS Attribute: connect or type the prompt the image was generated with")
        names = [lora_name] if lora_name else loras_in_graph(graph)
        files = {n: p for n in names if (p := lora_path(n))}
        require_lora_families(das_store, files)
        for name in checkpoints_in_graph(graph):
            if (path := host_path("checkpoints", name)) is not None:
                require_family(das_store, checkpoint_family(path), f"the graph's checkpoint {name!r}")
        warning = lora_mismatch(das_store, names, files)
        size = sdxl_size_in_graph(graph, prompt)
        results, thumbs = [], []
        for i in range(images.shape[0]):
            result = attribute_pil(das_store, image_to_pil(images, i), prompt, method, int(top_k), {"index": i}, size)
            results.append(result)
            thumbs += [load_image(row.path) for row in result.results]  # size-checked before decoding
        text = attribution_json(das_store, results, warning)
        batch = pils_to_image(thumbs, int(images.shape[1]))
        return {"ui": {"text": (text,)}, "result": (batch, text)}


NODE_CLASS_MAPPINGS = {"DASLoadStore": DASLoadStore, "DASAttribute": DASAttribute}
NODE_DISPLAY_NAME_MAPPINGS = {"DASLoadStore": "DAS Load Store", "DASAttribute": "DAS Attribute"}
