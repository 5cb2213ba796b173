"""The ComfyUI nodes, loaded and executed by a stand-in of ComfyUI's custom-node loader and executor.

Expectations come from das_sd's own API on the same images; the graph is a recorded API-format
workflow (LoadCheckpoint -> LoraLoader -> KSampler -> VAEDecode -> DAS nodes -> PreviewImage).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from das_sd.attribute import Attributor
from das_sd.generation import GenerationSettings, generate

HERE = Path(__file__).parent
NODES = HERE.parent.parent / "extensions" / "comfyui-das-sd"
GRAPH = json.loads((HERE / "comfy_graph.json").read_text())
PROMPT = GRAPH["6"]["inputs"]["text"]


@pytest.fixture()
def comfy(monkeypatch, tmp_path, demo):
    monkeypatch.syspath_prepend(str(HERE / "comfy_stub"))
    for name in ("comfy_host", "folder_paths", "comfyui-das-sd", "comfyui-das-sd.nodes"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import comfy_host
    import folder_paths

    loras = tmp_path / "loras"
    loras.mkdir()
    shutil.copy(demo["lora"], loras / "demo_style.safetensors")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", [str(loras)])
    assert comfy_host.load_custom_node(str(NODES))
    return comfy_host


def comfy_images(pipe, seeds) -> torch.Tensor:
    """What VAEDecode hands on: IMAGE = (B, H, W, 3) float32 in [0, 1]."""
    images = [generate(pipe, GenerationSettings(prompt=PROMPT, seed=s)).images[0] for s in seeds]
    return torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) / 255.0 for i in images]))


def test_stand_in_matches_the_recorded_host_contract(comfy):
    """The stand-in against facts recorded from a real ComfyUI checkout (comfy_facts.json)."""
    import inspect

    import folder_paths

    facts = json.loads((HERE / "comfy_facts.json").read_text())
    for name, recorded in facts["folder_paths.py"].items():
        assert list(inspect.signature(getattr(folder_paths, name)).parameters) == recorded, name
    # the real loader is async with keyword extras; the stand-in keeps its first, positional parameter
    assert list(inspect.signature(comfy.load_custom_node).parameters)[0] == facts["nodes.py"]["load_custom_node"][0]
    executed = facts["execution.py"]
    assert executed["runs_under_inference_mode"] and executed["splits_ui_and_result"]
    assert "with torch.inference_mode():" in inspect.getsource(comfy.execute)
    used = {kind for cls in comfy.NODE_CLASS_MAPPINGS.values() for kind in cls.INPUT_TYPES().get("hidden", {}).values()}
    assert used <= set(executed["hidden_kinds"])


def test_nodes_register_with_prefixed_ids(comfy):
    assert set(comfy.NODE_CLASS_MAPPINGS) == {"DASLoadStore", "DASAttribute"}
    for cls in comfy.NODE_CLASS_MAPPINGS.values():
        assert cls.CATEGORY == "das-sd" and callable(getattr(cls, cls.FUNCTION))
    assert comfy.NODE_DISPLAY_NAME_MAPPINGS["DASAttribute"] == "DAS Attribute"


def test_attribute_node_returns_top_k_images_and_scores(comfy, demo):
    graph = json.loads(json.dumps(GRAPH).replace("STORE", demo["store"]))
    _, (store,) = comfy.execute("DASLoadStore", graph["11"]["inputs"], graph)
    images = comfy_images(store.pipe, (7, 8))
    inputs = {k: v for k, v in graph["12"]["inputs"].items() if k not in ("das_store", "images")}
    ui, (batch, text) = comfy.execute("DASAttribute", {**inputs, "das_store": store, "images": images}, graph, "12")

    report = json.loads(text)
    assert ui == {"text": (text,)} and report["warning"] is None  # the graph's LoRA is the store's
    assert batch.shape == (2 * 4, 32, 32, 3) and batch.dtype == torch.float32
    assert 0.0 <= float(batch.min()) and float(batch.max()) <= 1.0
    reference = Attributor(demo["store"], device="cpu")
    for i in range(2):
        pil = generate(reference.pipe, GenerationSettings(prompt=PROMPT, seed=7 + i)).images[0]
        expected = reference.attribute_image(pil, prompt=PROMPT, method=inputs["method"], top_k=4)
        got = report["attributions"][i]["results"]
        assert [r["key"] for r in got] == [r.key for r in expected.results]
        # each image with its share of the influence (das_sd.shares), computed the same way in-process
        np.testing.assert_allclose([r["share"] for r in got], [r.share for r in expected.results], rtol=1e-5)
        # the IMAGE batch holds those training images, in order
        first = np.asarray(Image.open(expected.results[0].path).convert("RGB"), dtype=np.float32) / 255.0
        np.testing.assert_allclose(batch[4 * i].numpy(), first, atol=1e-6)


def test_lora_from_graph_is_checked_against_the_store(comfy, demo, tmp_path):
    from das_sd.integrations.hosts import CACHE

    from_graph = sys.modules["comfyui-das-sd.nodes"].loras_in_graph(GRAPH)
    assert from_graph == ["demo_style.safetensors"]
    CACHE.clear()  # loaded by the node under inference_mode below, as in ComfyUI
    graph = json.loads(json.dumps(GRAPH).replace("STORE", demo["store"]))
    _, (store,) = comfy.execute("DASLoadStore", graph["11"]["inputs"], graph)
    with torch.inference_mode():  # IMAGE tensors made by upstream nodes are inference tensors
        images = comfy_images(store.pipe, (3,))
    other = json.loads(json.dumps(GRAPH).replace("demo_style.safetensors", "someone_else.safetensors"))
    _, (_, text) = comfy.execute("DASAttribute", {"das_store": store, "images": images, "prompt": PROMPT,
                                                  "method": "dtrak", "top_k": 2}, other)
    report = json.loads(text)
    assert "not found" in report["warning"] and report["attributions"][0]["method"] == "dtrak"
    with pytest.raises(ValueError, match="prompt"):
        comfy.execute("DASAttribute", {"das_store": store, "images": images, "prompt": " ", "method": "das",
                                       "top_k": 2}, GRAPH)


# ---- SDXL: CLIPTextEncodeSDXL size conditioning, LoRA / checkpoint families ----------------------

SDXL_PROMPT = "zorblat, a red circle on a blue background"


def sdxl_graph(store: str, lora: str, ckpt: str = "sdxl.safetensors") -> dict:
    """An API-format SDXL graph: checkpoint -> LoraLoader -> CLIPTextEncodeSDXL (size, crop, target)
    -> KSampler -> VAEDecode -> DAS nodes (input names as ComfyUI's nodes_clip_sdxl.py has them)."""
    encode = {"width": 24, "height": 20, "crop_w": 2, "crop_h": 3, "target_width": 16, "target_height": 16,
              "clip": ["10", 1]}
    return {
        "3": {"class_type": "KSampler", "inputs": {"model": ["10", 0], "positive": ["6", 0], "negative": ["7", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "6": {"class_type": "CLIPTextEncodeSDXL", "inputs": {**encode, "text_g": SDXL_PROMPT, "text_l": SDXL_PROMPT}},
        "7": {"class_type": "CLIPTextEncodeSDXL", "inputs": {**encode, "text_g": "", "text_l": ""}},
        "10": {"class_type": "LoraLoader", "inputs": {"lora_name": lora, "model": ["4", 0], "clip": ["4", 1]}},
        "11": {"class_type": "DASLoadStore", "inputs": {"store_path": store, "device": "cpu"}},
        "12": {"class_type": "DASAttribute", "inputs": {"das_store": ["11", 0], "images": ["8", 0],
                                                        "prompt": SDXL_PROMPT, "method": "das", "top_k": 4}},
    }


@pytest.fixture()
def comfy_sdxl(comfy, sdxl_demo, base_path, tmp_path, monkeypatch):
    import folder_paths
    from safetensors.torch import save_file

    from das_sd.models.loading import load_pipeline
    from helpers import random_lora

    loras, checkpoints = tmp_path / "sdxl_loras", tmp_path / "checkpoints"
    loras.mkdir()
    checkpoints.mkdir()
    shutil.copy(sdxl_demo["lora_file"], loras / "sdxl_style.safetensors")
    save_file(random_lora(load_pipeline(base_path, device="cpu"), rank=2), loras / "sd_style.safetensors")
    one = torch.zeros(1)  # header-only stand-ins of single-file checkpoints (the keys tell the family)
    save_file({"conditioner.embedders.1.model.ln_final.weight": one}, checkpoints / "sdxl.safetensors")
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": one}, checkpoints / "v15.safetensors")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", [str(loras)])
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "checkpoints", [str(checkpoints)])
    return comfy


def test_sdxl_graph_is_attributed_with_its_clip_text_encode_sdxl_sizes(comfy_sdxl, sdxl_demo):
    from sdxl_store import diffusers_conditioning

    graph = sdxl_graph(str(sdxl_demo["store"]), "sdxl_style.safetensors")
    _, (store,) = comfy_sdxl.execute("DASLoadStore", graph["11"]["inputs"], graph)
    images = torch.from_numpy(np.stack([np.asarray(generate(store.pipe, GenerationSettings(prompt=SDXL_PROMPT, seed=s))
                                                   .images[0], dtype=np.float32) / 255.0 for s in (4, 5)]))
    inputs = {k: v for k, v in graph["12"]["inputs"].items() if k not in ("das_store", "images")}
    _, (_, text) = comfy_sdxl.execute("DASAttribute", {**inputs, "das_store": store, "images": images}, graph, "12")
    report = json.loads(text)
    assert report["warning"] is None  # the graph's LoRA file is the store's

    reference = Attributor(sdxl_demo["store"], device="cpu")
    # ComfyUI's SDXL ADM: [height, width, crop_h, crop_w, target_height, target_width]
    cond = diffusers_conditioning(reference.pipe, SDXL_PROMPT, (20, 24), (3, 2), (16, 16))
    for i in range(2):
        pil = Image.fromarray((images[i].numpy() * 255.0).round().astype(np.uint8))
        expected = reference.attribute_latents(reference.encode_image(pil), [SDXL_PROMPT], "das", 4, cond=cond)[0]
        got = report["attributions"][i]["results"]
        assert [r["key"] for r in got] == [r.key for r in expected.results]
        assert [r["score"] for r in got] == pytest.approx([r.score for r in expected.results], rel=1e-6)


def test_sdxl_store_refuses_an_sd_lora_or_checkpoint_in_the_graph(comfy_sdxl, sdxl_demo):
    store_path = str(sdxl_demo["store"])
    graph = sdxl_graph(store_path, "sd_style.safetensors")
    _, (store,) = comfy_sdxl.execute("DASLoadStore", graph["11"]["inputs"], graph)
    images = torch.zeros(1, 16, 16, 3)
    inputs = {"das_store": store, "images": images, "prompt": SDXL_PROMPT, "method": "das", "top_k": 2}
    with pytest.raises(ValueError, match=f"the das-sd store {re.escape(store_path)} was built for an SDXL model .*"
                                         r"LoRA 'sd_style.safetensors' \(sd_style.safetensors\) is SD 1.x / 2.x"):
        comfy_sdxl.execute("DASAttribute", inputs, graph)
    with pytest.raises(ValueError, match=f"{re.escape(store_path)} .*checkpoint 'v15.safetensors' is SD 1.x / 2.x"):
        comfy_sdxl.execute("DASAttribute", inputs, sdxl_graph(store_path, "sdxl_style.safetensors", "v15.safetensors"))
